"""Method base class and the callback contract the hook manager calls.

A method is a config dataclass (validated on construction) plus a class with the
callbacks it needs. Every callback is optional; the manager only routes a layer
through the eager path when some active method has an attention-level callback for
it (``scores``, ``probs``, ``head_output``, ``observe``), so an unused layer keeps the
fused sdpa kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import MethodArgumentError
from .config import MethodConfig, build_config, check_int, check_range  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from ..hooks.context import ForwardContext
    from ..hooks.manager import Handle


class Method:
    """A training-free intervention. Subclasses set ``name``, ``Config`` and the callbacks they need.

    Callbacks (all optional, all receive the handle's ForwardContext):

    - ``scores(ctx, layer, scores) -> scores``: pre-softmax logits (B, H, r, K'), mask already added.
    - ``collect(ctx, layer, probs) -> None``: read-only first pass over the probabilities of every
      requested row (after ``scores`` callbacks, before any ``probs`` callback of the layer), for
      rewrites that need statistics over all rows (ACT's column means). Costs a second QK^T when
      the rows do not fit in one chunk; ``scores`` callbacks then run twice and must be pure.
    - ``column_sums(ctx, layer, sums, counts) -> None``: read-only statistics over every requested row,
      before any rewrite of the layer: ``sums`` (B, H, K') fp32, the probability each key column gets
      summed over the rows; ``counts`` (B|1, 1, K') fp32, how many of the rows see the column. May be
      called once per row chunk (add them up). Cheaper than ``collect`` on the column path (below),
      which computes them in one scores-and-softmax pass without P@V. A method may define both
      (``collect`` for the plain path, e.g. for callers that hand it probabilities); the dispatcher
      then calls exactly one of them per chunk.
    - ``probs(ctx, layer, probs) -> probs``: post-softmax probabilities (B, H, r, K').
    - Column rewrite, ``sparse_columns(ctx, layer) -> cols | None`` and ``sparse_probs(ctx, layer,
      probs_j, cols) -> (factor, new_j)``: declares that the method's ``probs`` rewrite has the form
      P'[i, j] = factor_i * P[i, j] on every key column except a few special ones ``cols`` (a 1-D long
      tensor of key positions, sorted, distinct, shared by the batch, asked for after ``column_sums``;
      None or empty = nothing changes),
      where it gives the new values. ``probs_j`` (B, H, r, |cols|, fp32) holds the probabilities at
      those columns (0 where a row cannot see the column; a row that sees no key is all 0), each row
      of the full P summing to 1; ``factor`` is (B, H, r, 1) and ``new_j`` (B, H, r, |cols|).
      ``ctx.visible`` is then the (B|1, 1, r, |cols|) visibility of the columns or None.
      When every method of a layer allows it (no ``scores``, ``observe``, ``head_output``, ``collect``
      without ``column_sums``, ``probs`` without a column rewrite, at most one column rewrite; no
      softcap, dropout or output_attentions) and at least COLUMN_MIN_ROWS rows are requested, the
      dispatcher takes the column path: one pass per row chunk gives the scores, softmax, column
      sums, P@V and each row's logsumexp; P at ``cols`` is recomputed from q.k_j and the logsumexp,
      and the output is corrected as out'_i = factor_i * out_i + sum_{j in cols} (new_ij - factor_i *
      P_ij) V_j (rows whose factor exceeds dispatch.COLUMN_MAX_FACTOR are computed again with
      ``probs`` on full rows: the correction's rounding grows with the factor). Otherwise it calls
      ``probs``, which must give the same result (the tests compare both paths).
    - ``head_output(ctx, layer, out) -> out``: per-head attention output (B, q, H, D) before o_proj.
    - ``observe(ctx, layer, probs) -> None``: read-only look at the final probabilities.

    ``scores`` and ``probs`` callbacks may rewrite their tensor in place and return it; ``collect``
    and ``observe`` must clone what they keep. ``rows`` returns sorted, distinct indices.

    The attention-level tensors cover a chunk of r query rows (``ctx.query_rows`` holds their
    indices among this forward's new tokens) and the key columns [0, K'), K' <= ``ctx.kv_len``:
    slice per-column masks with ``[..., :probs.shape[-1]]``. ``ctx.visible`` says which of those
    keys each row may attend to.
    - ``select(ctx, layer, hidden) -> keep | None``: called at prefill before decoder layer ``layer``
      with its input hidden states (B, q, d); a returned (B, q) bool tensor says which prompt
      positions stay from this layer on (pruning). With ``drops_tokens`` False they are masked out
      as keys of this and every later layer; with it True they are removed: hidden states,
      attention mask, rotary embeddings, position ids and the KV cache of the later layers shrink
      (every row must keep the same count). After a drop, the context describes each layer's own
      compacted sequence (``ForwardContext.enter_layer``), so every callback of a later layer sees
      only the kept tokens. Kept tokens keep their original positions, unless the method sets
      ``renumbers_positions``: then from the drop on they are renumbered 0..n-1 as a prompt of n
      tokens would be (the attention mask causal in the new order), and at decode steps each such
      layer's new token takes the position that follows the layer's own length (the official code of
      PyramidDrop and SparseVLM). Such a method may also return, instead of the bool mask, a (B, n)
      long tensor of the rows kept in their new order (SparseVLM puts its merged tokens after the
      kept image tokens).
    - ``logits(ctx, logits) -> logits``: rewrite the model's output logits (decoding-level methods).

    ``layers(ctx)`` says which layers need the eager path (None = all); ``rows(ctx, layer)`` which
    query rows need probabilities (None = all rows; fused sdpa computes the others).

    ``text_branch = True`` asks the manager to append, to every forward, the same prompts without
    their images as extra batch rows with their own KV cache (``ctx.branch_rows``); the ``logits``
    callbacks see both halves and the manager returns only the user's rows.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Set (on the class or the instance) to run the image-free branch rows alongside the batch.
    text_branch: bool = False
    #: Config arguments with which the method changes nothing (its zero strength, e.g. PAI alpha=0): the
    #: common test suite checks that the wrapped model then equals the unwrapped one. None: no such setting.
    neutral: ClassVar[dict[str, Any] | None] = None
    #: The model families the method supports (None = every family); wrap() raises UnsupportedModelError
    #: for the others.
    families: ClassVar[tuple[str, ...] | None] = None
    #: False where cached decoding differs from recomputation by design (the common suite then skips that check).
    cache_exact: ClassVar[bool] = True
    #: Set when ``select`` removes tokens (drop mode) instead of masking them.
    drops_tokens: bool = False
    #: Set (with ``drops_tokens``) to renumber the kept tokens' positions after a drop (see ``select``).
    renumbers_positions: bool = False

    scores = None
    collect = None
    column_sums = None
    probs = None
    sparse_columns = None
    sparse_probs = None
    head_output = None
    observe = None
    select = None
    logits = None

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise MethodArgumentError(f"{self.name}: pass either a config object or keyword arguments, not both")
        if config is None:
            config = build_config(self.Config, self.name, kwargs)
        elif not isinstance(config, self.Config):
            raise MethodArgumentError(
                f"{self.name}: config must be {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # -- lifecycle -------------------------------------------------------------------------
    def attach(self, handle: Handle) -> None:
        """Called once by wrap(): the handle gives the adapter and model geometry."""

    def detach(self) -> None:
        """Called by Handle.remove(): drop any per-model state."""

    def begin_forward(self, ctx: ForwardContext) -> None:
        """Called at the start of every top-level forward (prefill or decode step)."""

    # -- routing ---------------------------------------------------------------------------
    @classmethod
    def attention_callbacks(cls) -> bool:
        return any(
            getattr(cls, cb) is not None
            for cb in ("scores", "collect", "column_sums", "probs", "sparse_probs", "head_output", "observe")
        )

    def layers(self, ctx: ForwardContext) -> set[int] | None:
        """Layers that need the eager path in this forward (None = all layers)."""
        return None if self.attention_callbacks() else set()

    def rows(self, ctx: ForwardContext, layer: int) -> torch.Tensor | None:
        """Query rows (indices into the q dimension) that need eager probabilities; None = all."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{type(self).__name__}({args})"
