"""SparseVLM: text-guided, progressive visual-token pruning inside the language model, with recycling.

Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang. "SparseVLM: Visual
Token Sparsification for Efficient Vision-Language Model Inference." ICML 2025 (arXiv 2410.04417).
Official code: github.com/Gumpest/SparseVLMs (algorithm v1.5: branch ``v1.5``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import MethodArgumentError
from ..hooks.context import View
from .base import MethodConfig, check_int
from .pruning import PruningMethod, check_mode, check_positions, keep_top
from .registry import register

#: Image tokens of one LLaVA-1.5 image (336 px, 14 px patches): the image size the schedules are for.
REFERENCE_IMAGE_TOKENS = 576
#: Decoder depth the default stage layers are for (LLaVA-1.5-7B / Vicuna-7B).
REFERENCE_DEPTH = 32

#: Image tokens kept after each stage (before recycling) for a 576-token image, per budget.
#: 192, 128, 64: ``sparse_token_dict`` in llava/model/language_model/score.py of the official
#: ``v1.5`` branch; 96: the same dict on the ``main`` branch (its default ``USE_VERSION=1_0`` mode,
#: i.e. the v1.5 algorithm). For reference, ``main``'s SparseVLM+ (``USE_VERSION=2_0``) uses
#: 192: [300, 200, 118], 128: [238, 108, 60], 96: [246, 54, 28], 64: [66, 34, 20] (not used here).
SCHEDULES: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
#: Share of a stage's dropped tokens that are recycled (the best-related ones), official ``0.3``.
RECYCLE_SHARE = (3, 10)
#: Recycled tokens per cluster: ``floor(m / 10) + 1`` clusters for m recycled tokens (official).
TOKENS_PER_CLUSTER = 10


@dataclasses.dataclass
class SparseVLMConfig(MethodConfig):
    """budget: image tokens retained for a 576-token image (64, 96, 128, 192 = the official schedules;
    any value >= 576 keeps everything); layers: the layers whose attention ranks the image tokens
    (tokens go from the next layer on), given for a ``depth``-layer model (None = absolute indices);
    recycle: merge the best-related dropped tokens into cluster tokens; mode: "drop" or "mask";
    positions: "original" (kept tokens keep their positions, a merged token its centre's) or "official"
    (merged tokens after the kept image tokens, all renumbered after each stage; drop mode)."""

    budget: int = MethodConfig.option(192, help="image tokens kept of 576: 64, 96, 128, 192 (or >= 576: all)", lo=1)
    layers: tuple[int, ...] = MethodConfig.option(
        (2, 6, 15), help="3 increasing layers whose attention ranks the image tokens", lo=0)
    depth: int | None = MethodConfig.option(
        REFERENCE_DEPTH, help="depth the layers are given for (none = absolute indices), > layers[-1] + 1", lo=1)
    recycle: bool = MethodConfig.option(True, help="merge the best-related dropped tokens into cluster tokens")
    mode: str = MethodConfig.option("drop", help="drop: remove the tokens; mask: mask them as keys", choices=("drop", "mask"))
    positions: str = MethodConfig.option(
        "original", help="kept tokens keep their positions, or official: renumbered (drop mode)",
        choices=("original", "official"))

    def validate(self) -> None:
        check_int("sparsevlm", "budget", self.budget, 1, None)
        if self.budget not in SCHEDULES and self.budget < REFERENCE_IMAGE_TOKENS:
            valid = ", ".join(str(b) for b in sorted(SCHEDULES))
            raise MethodArgumentError(
                f"sparsevlm: budget={self.budget!r} has no official schedule (valid: {valid}, or >= "
                f"{REFERENCE_IMAGE_TOKENS} to keep every token)"
            )
        if isinstance(self.layers, list):
            self.layers = tuple(self.layers)
        if not isinstance(self.layers, tuple) or len(self.layers) != 3:
            raise MethodArgumentError(f"sparsevlm: layers={self.layers!r} must be 3 increasing layer indices")
        for layer in self.layers:
            check_int("sparsevlm", "layers", layer, 0, None)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise MethodArgumentError(f"sparsevlm: layers={self.layers!r} must be strictly increasing")
        if self.depth is not None:
            check_int("sparsevlm", "depth", self.depth, self.layers[-1] + 2, None)
        if not isinstance(self.recycle, bool):
            raise MethodArgumentError(f"sparsevlm: recycle={self.recycle!r} must be True or False")
        check_mode("sparsevlm", self.mode)
        check_positions("sparsevlm", self.positions, self.mode)


def scale_layers(layers: tuple[int, ...], depth: int | None, num_layers: int, first_droppable: int = 0) -> tuple[int, ...]:
    """Stage layers for a ``num_layers``-deep model: ``round(l * num_layers / depth)`` (Python's
    round, as PyramidDrop scales its layers), then each at least one past the previous one and at least ``first_droppable - 1`` (so its selection,
    at the next layer, may drop); ``depth=None`` keeps them as given. Raises when the last stage has
    no next layer."""
    if depth is None:
        out = list(layers)
    else:
        out = []
        for layer in layers:
            scaled = int(round(layer * num_layers / depth))
            scaled = max(scaled, first_droppable - 1, out[-1] + 1 if out else 0)
            out.append(scaled)
    if out[-1] > num_layers - 2:
        raise MethodArgumentError(
            f"sparsevlm: stage layers {tuple(out)} need a next layer; this model has {num_layers} layers "
            f"(at most {num_layers - 2})"
        )
    return tuple(out)


def scale_count(count: int, n_image: int) -> int:
    """A schedule count for a 576-token image, scaled to ``n_image`` tokens: ``ceil(count * n / 576)``."""
    return -(-count * n_image // REFERENCE_IMAGE_TOKENS)


def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the text tokens chosen as raters (official: at the embedding layer's output).

    ``visual`` (V, d) and ``text`` (T, d) hidden states; relevance of text token t =
    mean over v of softmax_t(visual @ text^T); the raters are the tokens above the mean relevance.
    When none is (one text token, or all equal), every text token rates."""
    sim = visual.float() @ text.float().T  # (V, T)
    relevance = sim.softmax(dim=1).mean(dim=0)  # (T,)
    raters = relevance > relevance.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def dpc_knn_clusters(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (the official ``cluster_and_merge``).

    x (m, d), rows in rank order (the first is the best-related token). Returns ``centers`` (c,) row
    indices in centre order and ``assign`` (m,) the cluster (index into ``centers``) of each row.
    Distances are Euclidean / sqrt(d); density = exp(-mean squared distance to the k = c nearest rows,
    the row itself included); each row's "delta" is its distance to the nearest row of higher density
    (the largest distance in the matrix for the densest row); centres are the c rows of largest
    delta x density; every row joins its nearest centre (the first one on a tie), a centre its own.
    Ties in density are broken by rank (the official code adds 1e-6 random noise instead)."""
    m = x.shape[0]
    x = x.float()
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[1])
    near = dist.topk(n_clusters, dim=1, largest=False).values
    density = (-(near**2).mean(dim=1)).exp()
    idx = torch.arange(m, device=x.device)
    higher = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )  # higher[i, j]: j is denser than i
    delta = torch.where(higher, dist, dist.max()).min(dim=1).values
    score = delta * density
    centers = torch.sort(score, descending=True, stable=True).indices[:n_clusters]
    assign = dist[centers].argmin(dim=0)  # (m,)
    assign[centers] = torch.arange(n_clusters, device=x.device)
    return centers, assign


def recycle_count(n_dropped: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for a stage that dropped ``n_dropped`` tokens (official:
    ``int(0.3 d) + 1`` tokens, ``int(m / 10) + 1`` clusters)."""
    m = n_dropped * RECYCLE_SHARE[0] // RECYCLE_SHARE[1] + 1
    return m, m // TOKENS_PER_CLUSTER + 1


def expected_image_counts(budget: int, n_image: int, recycle: bool = True) -> list[int]:
    """Image tokens per row after each stage for one image of ``n_image`` tokens (what the report's
    ``image_kept_per_layer`` shows after each stage): e.g. [309, 204, 113] for 576 tokens at budget 192."""
    if budget >= REFERENCE_IMAGE_TOKENS:
        return [n_image] * 3
    live, out = n_image, []
    for count in SCHEDULES[budget]:
        keep = min(scale_count(count, n_image), live)
        if keep < live and recycle:
            keep += recycle_count(live - keep)[1]
        live = keep
        out.append(live)
    return out


def official_order(
    keep: torch.Tensor, live: torch.Tensor, merged: list[tuple[int, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """(B, n) rows kept by a stage in the official layout: the kept rows in order, each row's merged
    tokens (``merged``: (row, centre rows in cluster order, values)) moved right after its last kept
    image token (``live``: the image rows before the stage; with none kept, where its image was)."""
    centres = {b: rows for b, rows, _ in merged}
    out = []
    for b in range(keep.shape[0]):
        rows = keep[b].nonzero().flatten()
        c = centres.get(b)
        if c is None or c.numel() == 0:
            out.append(rows)
            continue
        c = c.to(rows.device)
        rest = rows[~torch.isin(rows, c)]
        image = live[b, rest].nonzero().flatten()
        at = int(image[-1]) + 1 if image.numel() else int((rest < live[b].nonzero().min()).sum())
        out.append(torch.cat([rest[:at], c, rest[at:]]))
    return torch.stack(out)


@register
class SparseVLM(PruningMethod):
    """SparseVLM v1.5 (Zhang et al., ICML 2025): text raters rank the image tokens at three layers.

    Raters (official: ``LlamaDynamicvitModel.forward`` in llava/model/language_model/
    modelling_sparse_llama.py, v1.5 branch): from the hidden states entering the first decoder layer
    (the embeddings with the image features in place), per row, V = its image tokens, T = its text
    tokens after its last image token (padding excluded); the raters are the text tokens whose
    relevance (``text_raters``) exceeds the mean. Chosen once per prompt.

    Stages: at each stage layer L the raters' attention probabilities (that layer's own, over the
    sequence it holds; only the rater rows leave fused sdpa) are averaged over heads, then over raters,
    giving each image token still present a relevance; before layer L + 1 the top ``count`` stay
    (official ``attn_postprocess_topk`` in score.py: the official layer L runs on every token and its
    output is pruned, which is layer L + 1's input). ``count`` is the budget's schedule entry
    (``SCHEDULES``) scaled to the row's image-token count: ``ceil(count * n_image / 576)`` (576 = one
    LLaVA-1.5 image), at most the tokens still present (the official code keeps ``n - 1`` when the
    schedule reaches ``n``; here the stage then drops nothing). Merged tokens of an earlier stage are
    ranked like the others, as in the official code. ``budget >= 576`` keeps every token.

    Recycling (official: the same forward and ``cluster_and_merge`` in utils.py): of the d image tokens
    a stage drops, the ``int(0.3 d) + 1`` most relevant are clustered (``dpc_knn_clusters``, on the
    hidden states entering layer L + 1) into ``int(m / 10) + 1`` clusters, and each cluster becomes
    one token: the plain mean of its members' hidden states; each merged token takes the row of its
    cluster's centre (that token is kept and ``select`` overwrites its hidden state in place, in the
    tensor the layer then receives). Image tokens kept per stage: ``count + clusters``. The overwrite
    happens in mask mode too, so drop == mask with or without recycling; ``merged_tokens(view)`` lists
    them.

    Positions (``positions``): by default every kept token keeps its original position and a merged
    token its centre's. The official code lays the sequence out anew after each stage: the text
    before the image, the kept image tokens (in order), the merged tokens (in cluster order), the
    text after, renumbered 0..n-1; at a decode step each layer's new token takes the position that
    follows that layer's own length. ``positions="official"`` (drop mode, 1-D RoPE models) reproduces
    that layout (several images in a row: the merged tokens follow the row's last kept image token),
    and later stages rank and merge on it; ``view.positions()`` then lists the kept positions in that order.

    Layers: ``layers=(2, 6, 15)`` (official ``pruning_loc``) are given for ``depth=32`` layers and
    scaled to the wrapped model by ``scale_layers`` (``round(l * N / 32)``, kept strictly increasing
    and, in drop mode, late enough that the selection layer may drop, e.g. after Qwen3-VL's DeepStack
    layers): 2, 6, 15 on 32 layers; 0, 1, 2 on 4. ``depth=None`` takes them as absolute indices.

    Batches: every row ranks its own image tokens with its own raters (the official code handles
    batch size 1). In drop mode rows drop the same number of tokens per stage, the smallest any row
    would drop (``keep_top``), so rows with different image counts keep a little more in the larger
    rows; in mask mode each row keeps its own count.

    Defaults: budget=192 (the official README's default ``RETAIN_TOKN``), layers=(2, 6, 15),
    recycle=True (the official inference path), mode="drop", positions="original" (the README says why).
    Deviations: original positions unless positions="official" (above); density ties in the clustering
    broken by relevance rank instead of 1e-6 random noise; exact cluster means (official: sum / (count
    + 1e-6)). ``self.report`` (a PruneReport) describes the last prompt;
    in mask mode it counts the tokens each layer would hold had they been dropped.
    """

    name = "sparsevlm"
    Config = SparseVLMConfig
    neutral = {"budget": 100000}
    cache_exact = False

    def __init__(self, config: SparseVLMConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.stage_layers: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        return self.config.budget < REFERENCE_IMAGE_TOKENS

    def attach(self, handle: Any) -> None:
        super().attach(handle)
        adapter = handle.adapter
        first = adapter.first_droppable_layer if self.drops_tokens else 0
        self.stage_layers = scale_layers(self.config.layers, self.config.depth, adapter.num_layers, first)
        for layer in self.stage_layers:
            self.check_layer("layers", layer + 1, adapter.num_layers)

    def _state(self, view: View) -> dict:
        return self.state(view)

    # -- routing -------------------------------------------------------------------------------
    def layers(self, view: View) -> set[int]:
        if not view.is_prefill or not self.active or view.image_mask is None or not bool(view.image_mask.any()):
            return set()
        return set(self.stage_layers)

    def _raters_here(self, view: View, layer: int) -> torch.Tensor | None:
        """(B, q) bool: the raters among the rows ``layer`` holds."""
        raters = self._state(view).get("raters")
        if raters is None:
            return None
        pos = view.positions(layer)
        return raters if pos is None else raters.gather(1, pos.to(raters.device))

    def rows(self, view: View) -> torch.Tensor:
        layer = view.layer
        raters = self._raters_here(view, layer)
        if raters is None:
            return torch.tensor([view.q_len - 1])
        return raters.any(0).nonzero().flatten()

    def observe(self, view: View, probs: torch.Tensor) -> None:
        layer = view.layer
        if not view.is_prefill or layer not in self.stage_layers or view.rows is None:
            return
        raters = self._raters_here(view, layer)
        if raters is None:
            return
        st = self._state(view)
        acc = st.get("acc")
        if acc is None or acc[0] != layer:
            acc = st["acc"] = (layer, torch.zeros(probs.shape[0], view.q_len, dtype=torch.float32, device=probs.device))
        weight = raters[:, view.rows.to(raters.device)].to(probs.device, torch.float32)  # (B, r)
        part = torch.einsum("bhrk,br->bk", probs.float(), weight) / probs.shape[1]
        acc[1][:, : part.shape[-1]] += part

    # -- selection -----------------------------------------------------------------------------
    def select(self, view: View, hidden: torch.Tensor) -> torch.Tensor | None:
        layer = view.layer
        if not self.active or view.image_mask is None or not bool(view.image_mask.any()):
            return None
        if layer == 0:
            if self.drops_tokens and view.contrast_rows:  # keep_top would silently drop nothing
                raise MethodArgumentError(
                    "sparsevlm: mode='drop' cannot run with a method that adds contrast rows "
                    "(PAI's cfg_gamma); use mode='mask'"
                )
            self._state(view)["raters"] = self.raters(view, hidden)
            return None
        if layer - 1 not in self.stage_layers:
            return None
        return self._stage(view, layer, hidden, self.stage_layers.index(layer - 1))

    def raters(self, view: View, hidden: torch.Tensor) -> torch.Tensor:
        """(B, q) bool: each row's raters, from the hidden states entering the first layer."""
        image = view.image_mask
        real = view.attention_mask[:, -view.q_len :] if view.attention_mask is not None else torch.ones_like(image)
        raters = torch.zeros_like(image)
        for b in range(image.shape[0]):
            pos = image[b].nonzero().flatten()
            if pos.numel() == 0:
                continue
            text = (real[b] & ~image[b]).clone()
            text[: int(pos[-1]) + 1] = False
            tpos = text.nonzero().flatten()
            if tpos.numel() == 0:  # the prompt ends with its image: the last token rates
                raters[b, -1] = True
                continue
            chosen = text_raters(hidden[b, pos.to(hidden.device)], hidden[b, tpos.to(hidden.device)])
            raters[b, tpos[chosen.to(tpos.device)]] = True
        return raters

    def relevance(self, view: View, layer: int) -> torch.Tensor | None:
        """(B, q) the raters' mean attention (head mean) at the last stage layer, over ``layer``'s rows."""
        st = self._state(view)
        acc = st.pop("acc", None)
        if acc is None:
            return None
        src, dst = view.positions(acc[0]), view.positions(layer)
        rel = acc[1] / self._raters_here(view, acc[0]).sum(1, keepdim=True).clamp(min=1).to(acc[1])
        if src is dst:
            return rel
        full = rel.new_zeros(rel.shape[0], view.prompt_len)
        if src is None:
            full[:] = rel[:, : view.prompt_len]
        else:
            full.scatter_(1, src.to(rel.device), rel[:, : src.shape[1]])
        return full if dst is None else full.gather(1, dst.to(rel.device))

    def _stage(self, view: View, layer: int, hidden: torch.Tensor, stage: int) -> torch.Tensor | None:
        rel = self.relevance(view, layer)
        live = view.live_image_mask()
        if rel is None or live is None or not bool(live.any()):
            return None
        live = live.to(hidden.device)
        rel = rel.to(hidden.device)[:, : live.shape[1]]
        schedule = SCHEDULES[self.config.budget]
        n_image = view.prompt_image_mask.sum(1).tolist()
        n_live = live.sum(1)
        n_keep = torch.tensor([min(scale_count(schedule[stage], int(n)), int(k)) for n, k in zip(n_image, n_live)])
        if self.drops_tokens:
            keep = keep_top(rel, live, n_keep.to(live.device))
        else:  # mask mode: every row its own count (rows without image tokens, e.g. PAI's CFG rows, keep all)
            keep = torch.ones_like(live)
            for b in range(live.shape[0]):
                cand = live[b].nonzero().flatten()
                order = torch.sort(rel[b, cand], descending=True, stable=True).indices
                keep[b, cand[order[int(n_keep[b]) :]]] = False
        dropped = live & ~keep
        if not bool(dropped.any()):
            return None
        merged = []
        if self.config.recycle:
            for b in range(live.shape[0]):
                cand = dropped[b].nonzero().flatten()
                if cand.numel() == 0:
                    continue
                order = torch.sort(rel[b, cand], descending=True, stable=True).indices
                m, clusters = recycle_count(cand.numel())
                members = cand[order[:m]]
                x = hidden[b, members].float()
                centers, assign = dpc_knn_clusters(x, clusters)
                sums = x.new_zeros(clusters, x.shape[1]).index_add_(0, assign, x)
                means = sums / torch.bincount(assign, minlength=clusters).to(x)[:, None]
                merged.append((b, members[centers], means.to(hidden.dtype)))
            for b, rows, values in merged:
                hidden[b, rows] = values  # the merged tokens take their centres' rows, from this layer on
                keep[b, rows] = True
        self._state(view).setdefault("merged", []).append((layer, merged))
        keep = self.record(layer, keep, live)
        return official_order(keep, live, merged) if self.renumbers_positions else keep

    def merged_tokens(self, view: View) -> list[tuple[int, list[tuple[int, torch.Tensor, torch.Tensor]]]]:
        """The recycled tokens of the last prefill, per stage: (selection layer, [(row, positions in that
        layer's rows, merged hidden states)])."""
        return list(self._state(view).get("merged", []))
