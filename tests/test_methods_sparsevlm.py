"""Tests for SparseVLM: no-op at full budget, drop == mask, cached == recomputed, batch == rows, the
scaled schedule, raters / ranking / recycling by hand, composition with PAI, bad arguments."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import PAI, SparseVLM
from attnkit.methods.sparsevlm import (
    SCHEDULES,
    dpc_knn_clusters,
    expected_image_counts,
    recycle_count,
    scale_layers,
    text_raters,
)
from attnkit.models import get_adapter

from . import lm_by_hand
from .conftest import PADDED_PROMPTS, check_batch_equals_rows, extend_inputs


@functools.lru_cache(maxsize=None)
def _deep(family: str):
    return testing.tiny_model(family, num_layers=4, seed=1)


def _n_image(model, inputs) -> int:
    return int(get_adapter(model).image_mask(inputs["input_ids"])[0].sum())


def _hand_counts(budget: int, n: int, recycle: bool) -> list[int]:
    """The test's own schedule arithmetic: ceil(c * n / 576) kept, plus floor((floor(0.3 d) + 1) / 10) + 1
    merged tokens for d dropped."""
    live, out = n, []
    for c in SCHEDULES[budget]:
        keep = min(math.ceil(c * n / 576), live)
        d = live - keep
        if d and recycle:
            keep += (int(d * 0.3) + 1) // 10 + 1
        live = keep
        out.append(live)
    return out


# -- no-op ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("budget", [576, 1000])
def test_full_budget_equals_unwrapped_model(family, budget):
    model, inputs = _deep(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        method = SparseVLM(budget=budget)
        with attnkit.wrap(model, method) as handle:
            out = model(**inputs).logits
            assert handle.state.drops == [] and handle.state.keep == []
            assert method.layers(handle.ctx) == set()  # every layer keeps fused sdpa
            wrapped = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(wrapped, gen)
    assert method.report.tokens_per_layer == [inputs["input_ids"].shape[1]] * 4
    assert method.report.flops_ratio == 1.0


# -- drop == mask --------------------------------------------------------------------------------
def _run(model, inputs, method):
    with torch.no_grad(), attnkit.wrap(model, method) as handle:
        out = model(**inputs, use_cache=True)
        return out, list(handle.state.drops), method.merged_tokens(handle.ctx)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen3_vl", "internvl", "idefics3"])
@pytest.mark.parametrize("recycle", [False, True])
def test_drop_equals_mask_on_kept_positions(family, recycle):
    model, inputs = _deep(family)
    dropper = SparseVLM(budget=192, recycle=recycle)
    dropped, drops, merged = _run(model, inputs, dropper)
    masked, mdrops, mmerged = _run(model, inputs, SparseVLM(budget=192, recycle=recycle, mode="mask"))
    assert mdrops == [] and len(drops) >= 2
    assert len(merged) == len(mmerged)
    kept = drops[-1][1]
    assert dropped.logits.shape[1] == kept.shape[1] < inputs["input_ids"].shape[1]
    ref = masked.logits.gather(1, kept[..., None].expand(-1, -1, masked.logits.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, kept)
    torch.testing.assert_close(dropped.logits[real], ref[real], atol=1e-4, rtol=0)


# -- cached generate == recomputation, batch == rows ----------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_cached_generate_equals_full_recomputation(family):
    model, inputs = _deep(family)
    n_new = 4
    with torch.no_grad(), attnkit.wrap(model, SparseVLM(budget=128)):
        out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        for t in range(n_new):
            full = model(**extend_inputs(inputs, new[:, :t]), use_cache=False).logits
            assert torch.equal(full[:, -1].argmax(-1), new[:, t]), f"step {t}"


@pytest.mark.parametrize(
    "family,spec",
    [("llava", {}), ("llava", {"mode": "mask"}), ("qwen2_vl", {}), ("qwen2_vl", {"mode": "mask"}),
     ("llava", {"positions": "official"}), ("internvl", {"positions": "official"})],
    ids=["llava-drop", "llava-mask", "qwen2_vl-drop", "qwen2_vl-mask", "llava-official", "internvl-official"],
)
def test_batch_equals_rows_alone(family, spec):
    """With positions="official" the padded row's layer masks are causal in the official order."""
    model, _ = _deep(family)
    check_batch_equals_rows(model, family, SparseVLM(budget=192, **spec))


# -- the schedule ----------------------------------------------------------------------------------
def test_official_counts_for_a_576_token_image():
    # LLaVA-1.5 at budget 192: 300 / 200 / 110 kept, plus 9 / 4 / 3 merged tokens
    assert recycle_count(576 - 300) == (83, 9)
    assert recycle_count(309 - 200) == (33, 4)
    assert recycle_count(204 - 110) == (29, 3)
    assert expected_image_counts(192, 576) == [309, 204, 113]
    assert expected_image_counts(192, 576, recycle=False) == [300, 200, 110]
    for budget in SCHEDULES:
        for n in (12, 16, 70, 80, 576, 1000):
            for recycle in (False, True):
                assert expected_image_counts(budget, n, recycle) == _hand_counts(budget, n, recycle)


def test_layer_scaling():
    assert scale_layers((2, 6, 15), 32, 32) == (2, 6, 15)
    assert scale_layers((2, 6, 15), 32, 28) == (2, 5, 13)
    assert scale_layers((2, 6, 15), 32, 4) == (0, 1, 2)
    assert scale_layers((2, 6, 15), 32, 5, first_droppable=2) == (1, 2, 3)  # selection from layer 2 on
    with pytest.raises(errors.MethodArgumentError, match="need a next layer"):
        scale_layers((2, 6, 15), 32, 4, first_droppable=2)
    assert scale_layers((0, 1, 2), None, 4) == (0, 1, 2)
    with pytest.raises(errors.MethodArgumentError, match="need a next layer"):
        scale_layers((2, 6, 15), None, 4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_next", "idefics3", "qwen3_vl"])
@pytest.mark.parametrize("budget", [64, 96, 128, 192])
@pytest.mark.parametrize("recycle", [True, False])
def test_kept_counts_follow_the_scaled_schedule(family, budget, recycle):
    model, inputs = _deep(family)
    n = _n_image(model, inputs)
    method = SparseVLM(budget=budget, recycle=recycle)
    _, drops, merged = _run(model, inputs, method)
    assert method.stage_layers == (0, 1, 2)  # (2, 6, 15) scaled to 4 layers
    want = _hand_counts(budget, n, recycle)
    rep = method.report
    assert rep.image_tokens == n and rep.full_tokens == inputs["input_ids"].shape[1]
    assert rep.image_kept_per_layer == [n, *want]
    seq, tokens = inputs["input_ids"].shape[1], []
    live = n
    for kept in want:
        seq -= live - kept
        live = kept
        tokens.append(seq)
    assert rep.tokens_per_layer == [inputs["input_ids"].shape[1], *tokens]
    assert 0 < rep.flops_ratio < 1
    # the drop stages the machinery saw agree with the report (stages that drop nothing are skipped)
    widths = {layer: pos.shape[1] for layer, pos in drops}
    for layer, width in widths.items():
        assert rep.tokens_per_layer[layer] == width
    image = get_adapter(model).image_mask(inputs["input_ids"])
    assert int(image.gather(1, drops[-1][1])[0].sum()) == want[-1]
    if not recycle:
        assert all(not stage for _, stage in merged)


def test_report_in_mask_mode_matches_drop_mode():
    model, inputs = _deep("llava")
    a, b = SparseVLM(budget=128), SparseVLM(budget=128, mode="mask")
    _run(model, inputs, a)
    _run(model, inputs, b)
    assert a.report.to_dict() == b.report.to_dict()


# -- raters, ranking and recycling by hand ------------------------------------------------------------
def test_text_raters_by_hand():
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 0.5], [1.0, 1.0], [-1.0, 0.0]])
    sim = [[sum(v * t for v, t in zip(vr, tr)) for tr in text.tolist()] for vr in visual.tolist()]
    soft = [[math.exp(x) / sum(math.exp(y) for y in row) for x in row] for row in sim]
    rel = [sum(soft[v][t] for v in range(3)) / 3 for t in range(4)]
    mean = sum(rel) / 4
    assert text_raters(visual, text).tolist() == [r > mean for r in rel] == [True, False, True, False]
    # one text token (or all equal): every text token rates
    assert text_raters(visual, text[:1]).tolist() == [True]


def test_dpc_knn_clusters_by_hand():
    # two well-separated blobs: one centre in each, every point joins its blob's centre
    a = torch.tensor([[0.0, 0.0], [0.3, 0.0], [0.0, 0.5], [0.4, 0.6]])
    x = torch.cat([a, a + 10.0, torch.tensor([[0.1, 0.05]])])
    centers, assign = dpc_knn_clusters(x, 2)
    blob = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0])
    assert sorted(blob[centers].tolist()) == [0, 1]
    assert torch.equal(blob[centers[assign]], blob)
    assert torch.equal(assign[centers], torch.arange(2))
    # density with k = 2: exp(-d_nn^2 / 2) (d = distance / sqrt(2)); rows 0 and 8 are the closest pair
    # (a tie, broken by rank: row 0 is the denser), row 0 the blob's peak and a centre
    dist = torch.cdist(x, x) / math.sqrt(2)
    nn = dist.masked_fill(torch.eye(9, dtype=torch.bool), float("inf")).min(1).values
    assert nn[0] == nn[8] == nn.min()
    assert 0 in centers.tolist()
    # one cluster: k = 1 makes every density exp(0), so the centre is the first (most relevant) row
    centers, assign = dpc_knn_clusters(x[[2, 1, 0]], 1)
    assert centers.tolist() == [0] and assign.tolist() == [0, 0, 0]


@pytest.mark.parametrize("recycle", [False, True])
def test_raters_ranking_and_recycling_by_hand(recycle):
    model, _ = _deep("llava")
    inputs = testing.tiny_inputs("llava", prompts=[PADDED_PROMPTS[1]], images=testing.sample_images(1))
    image = get_adapter(model).image_mask(inputs["input_ids"])[0]
    n = int(image.sum())
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        h0, h1 = ref.hidden_states[0], ref.hidden_states[1]
        probs = lm_by_hand.layer_probs(model, 0, h0[0], torch.arange(h0.shape[1]))[None]
    # raters: text tokens after the image, relevance > mean, from the embeddings
    img_pos = image.nonzero().flatten()
    text_pos = torch.arange(int(img_pos[-1]) + 1, image.numel())
    sim = h0[0, img_pos] @ h0[0, text_pos].T
    rel_t = sim.softmax(1).mean(0)
    raters = text_pos[rel_t > rel_t.mean()]
    assert 0 < raters.numel() < text_pos.numel()
    # ranking at layer 0 (the first stage on 4 layers): head mean, then rater mean
    rel = probs[0].mean(0)[raters][:, img_pos].mean(0)
    count = math.ceil(300 * n / 576)
    order = rel.argsort(descending=True)
    top = img_pos[order[:count]]
    dropped = img_pos[order[count:]]  # by relevance
    m = int(dropped.numel() * 0.3) + 1
    members = dropped[:m]

    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("h", (args[0] if args else kwargs["hidden_states"]).clone())

    layer1 = get_adapter(model).decoder_layers()[1]
    method = SparseVLM(budget=192, recycle=recycle)
    with torch.no_grad(), attnkit.wrap(model, method) as handle:
        hook = layer1.register_forward_pre_hook(grab, with_kwargs=True)  # after attnkit's: sees its result
        try:
            model(**inputs)
        finally:
            hook.remove()
        assert torch.equal(method.state()["raters"][0].nonzero().flatten(), raters)
        first = handle.state.drops[0]
        merged = method.merged_tokens(handle.ctx)
    assert first[0] == 1
    kept_image = [p for p in first[1][0].tolist() if image[p]]
    if not recycle:
        assert kept_image == sorted(top.tolist())
        assert merged[0] == (1, [])
        return
    layer, stage = merged[0]
    assert layer == 1 and len(stage) == 1
    row, centers, values = stage[0]
    clusters = m // 10 + 1
    assert row == 0 and centers.numel() == clusters == 1
    center = int(centers[0])
    assert center in members.tolist()
    assert kept_image == sorted(top.tolist() + [center])
    mean = h1[0, members].mean(0)
    torch.testing.assert_close(values[0], mean, atol=1e-5, rtol=0)
    # the layer received the merged token at the centre's row, the other rows unchanged
    at = first[1][0].tolist().index(center)
    torch.testing.assert_close(seen["h"][0, at], mean, atol=1e-5, rtol=0)
    others = [i for i, p in enumerate(first[1][0].tolist()) if p != center]
    torch.testing.assert_close(seen["h"][0, others], h1[0, first[1][0][others]], atol=1e-5, rtol=0)


def test_recycle_gives_the_documented_number_of_merged_tokens():
    model, inputs = _deep("internvl")  # 80 image tokens per row
    n = _n_image(model, inputs)
    method = SparseVLM(budget=192)
    _, _, merged = _run(model, inputs, method)
    live = n
    for (layer, stage), c in zip(merged, SCHEDULES[192]):
        keep = math.ceil(c * n / 576)
        d = live - keep
        clusters = (int(d * 0.3) + 1) // 10 + 1
        assert [row for row, _, _ in stage] == [0, 1]
        assert all(rows.numel() == values.shape[0] == clusters for _, rows, values in stage)
        live = keep + clusters


# -- composition --------------------------------------------------------------------------------------
class CountingPAI(PAI):
    """PAI that records how many image columns it lifts at each layer of the prefill."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: dict[int, int] = {}

    def scores(self, ctx, scores):
        layer = ctx.layer
        if ctx.is_prefill:
            self.seen[layer] = int(ctx.image_mask_kv()[0, : scores.shape[-1]].sum())
        return super().scores(ctx, scores)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_composes_with_pai(family):
    model, inputs = _deep(family)
    n = _n_image(model, inputs)
    with torch.no_grad():
        with attnkit.wrap(model, SparseVLM(budget=192)):
            sparse = model(**inputs).logits[:, -1]
        with attnkit.wrap(model, PAI(alpha=0.5, start_layer=0)):
            pai = model(**inputs).logits[:, -1]
        counting = CountingPAI(alpha=0.5, start_layer=0)
        with attnkit.wrap(model, [SparseVLM(budget=192), counting]):
            both = model(**inputs).logits[:, -1]
            gen = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 3
    assert not torch.allclose(both, sparse, atol=1e-4)
    assert not torch.allclose(both, pai, atol=1e-4)
    # PAI sees only the image tokens still present at each layer
    assert [counting.seen[i] for i in range(4)] == [n, *_hand_counts(192, n, True)]


# -- errors ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 100}, "budget=100 has no official schedule"),
        ({"budget": 0}, "budget=0 is out of range"),
        ({"budget": 1.5}, "budget=1.5 must be an integer"),
        ({"layers": (2, 6)}, "must be 3 increasing layer indices"),
        ({"layers": (2, 2, 15)}, "must be strictly increasing"),
        ({"layers": (2, -1, 15)}, "layers=-1 is out of range"),
        ({"depth": 10}, "depth=10 is out of range"),
        ({"recycle": "yes"}, "recycle='yes' must be True or False"),
        ({"mode": "prune"}, "mode='prune' must be one of drop, mask"),
        ({"ratio": 0.5}, "unknown argument 'ratio'"),
        ({"positions": "renumbered"}, "positions='renumbered' must be one of original, official"),
        ({"positions": "official", "mode": "mask"}, "positions='official' renumbers the tokens a drop keeps; it needs mode='drop'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(errors.MethodArgumentError, match=match) as info:
        SparseVLM(**kwargs)
    assert "\n" not in str(info.value)


def test_official_positions_need_1d_rotary_positions():
    model, inputs = _deep("qwen2_vl")
    with pytest.raises(errors.UnsupportedModelError, match="qwen2_vl has 3-D mRoPE positions; use positions='original'"):
        attnkit.wrap(model, SparseVLM(positions="official"))
    assert not model._forward_pre_hooks, "a failed wrap leaves the model alone"


def test_layers_that_do_not_fit_the_model():
    model, inputs = _deep("llava")
    with pytest.raises(errors.MethodArgumentError, match="need a next layer") as info:
        attnkit.wrap(model, SparseVLM(layers=(2, 6, 15), depth=None))
    assert "\n" not in str(info.value)
    with torch.no_grad():  # the failed wrap left the model clean
        ref = model(**inputs).logits
        with attnkit.wrap(model, SparseVLM(layers=(0, 1, 2), depth=None)) as handle:
            model(**inputs)
            assert [layer for layer, _ in handle.state.drops] == [1, 2, 3]
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)
    assert attnkit.methods.make_method("sparsevlm", budget=64).config.budget == 64


def test_mask_mode_with_pai_cfg_rows():
    """PAI's image-free CFG rows have no image tokens: mask mode prunes only the user's rows."""
    model, inputs = _deep("llava")
    n = _n_image(model, inputs)
    seq = inputs["input_ids"].shape[1]
    method = SparseVLM(budget=192, mode="mask")
    with torch.no_grad(), attnkit.wrap(model, [method, PAI(cfg_gamma=1.1)]) as handle:
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        keeps = [keep.sum(1).tolist() for _, keep in handle.state.keep]
    assert out.shape[1] == seq + 3
    want = _hand_counts(192, n, True)
    # each stage's keep masks the tokens that stage removes
    assert keeps == [[seq - (prev - k)] * 2 + [seq] * 2 for prev, k in zip([n, *want], want)]
    with pytest.raises(errors.MethodArgumentError, match="cannot run with a method that adds contrast rows"):
        with torch.no_grad(), attnkit.wrap(model, [SparseVLM(), PAI(cfg_gamma=1.1)]):
            model(**inputs)


# -- positions="official": the official layout, against the language model run by hand ----------------
def _sparsevlm_by_hand(model, inputs, renumber: bool, new: torch.Tensor, budget=192, stages=(0, 1, 2)):
    """SparseVLM written out by hand on one unpadded row followed by the generated tokens ``new`` (a fixture
    where every stage recycles into one cluster, whose centre is its most relevant member): raters from the
    embeddings; after stage layer L, the raters' head-mean attention at L (its own q/k at the positions it
    has) ranks the image tokens present, the top ceil(count * n / 576) stay and the int(0.3 d) + 1 best of
    the d dropped are merged into their mean. Official layout (``renumber``): kept image tokens, then the
    merged token, positions 0..n-1; else every token at its own position, the merged one at its centre's.
    Returns the logits of every row left and the prompt positions held after each stage, in order."""
    prompt = inputs["input_ids"][0]
    image = prompt == model.config.image_token_id
    n_img, s_len = int(image.sum()), prompt.numel()
    h0 = lm_by_hand.prompt_embeddings(model, inputs)
    img_pos = image.nonzero().flatten()
    text_pos = torch.arange(int(img_pos[-1]) + 1, s_len)
    rel_t = (h0[img_pos] @ h0[text_pos].T).softmax(1).mean(0)
    raters = set(text_pos[rel_t > rel_t.mean()].tolist())
    hidden = torch.cat([h0, lm_by_hand.token_embeddings(model, new)])
    kept = {}

    def before(i, h, ids, prev):
        if i - 1 not in stages:
            return h, ids
        h_in, positions = prev
        probs = lm_by_hand.layer_probs(model, i - 1, h_in, positions).mean(0)  # head mean
        rows = [j for j, t in enumerate(ids) if t in raters]
        live = [j for j, t in enumerate(ids) if t < s_len and image[t]]
        rel = probs[rows][:, live].mean(0)
        count = min(math.ceil(SCHEDULES[budget][stages.index(i - 1)] * n_img / 576), len(live))
        order = [live[k] for k in rel.argsort(descending=True).tolist()]
        top, dropped = set(order[:count]), order[count:]
        members = dropped[: int(len(dropped) * 0.3) + 1]
        assert len(members) // 10 + 1 == 1, "the fixture must merge into one cluster per stage"
        merged = h[members].mean(0, keepdim=True)
        if renumber:
            last_img = max(j for j in top)
            seq = [j for j in range(len(ids)) if j <= last_img and (j not in live or j in top)]
            tail = [j for j in range(len(ids)) if j > last_img and j not in live]
            out_h = torch.cat([h[seq], merged, h[tail]])
            out_ids = [ids[j] for j in seq] + [ids[members[0]]] + [ids[j] for j in tail]
        else:
            seq = [j for j in range(len(ids)) if j not in live or j in top or j == members[0]]
            out_h = h[seq].clone()
            out_h[seq.index(members[0])] = merged[0]
            out_ids = [ids[j] for j in seq]
        kept[i] = [t for t in out_ids if t < s_len]
        return out_h, out_ids

    out, _ = lm_by_hand.run(model, hidden, list(range(s_len + new.numel())), before, renumber)
    return out, kept


def test_official_positions_against_the_model_run_by_hand():
    """positions="official" lays the sequence out as the official code after each stage (kept image tokens,
    the merged token, then the text; positions 0..n-1; decode steps at each layer's own length): the cached
    generate gives, at every step, the logits of the model run layer by layer on the whole sequence written
    out that way (a full recomputation). The default layout (original positions, merged token at its
    centre's) is checked the same way, and the two differ."""
    model, _ = _deep("llava")
    inputs = testing.tiny_inputs("llava", prompts=[PADDED_PROMPTS[1]], images=testing.sample_images(1))
    last = lm_by_hand.check_both_layouts(
        model, inputs, lambda positions: SparseVLM(budget=192, positions=positions), _sparsevlm_by_hand
    )
    assert (last["official"] - last["original"]).abs().max() > 1e-2
