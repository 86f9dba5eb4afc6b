"""FastV and PyramidDrop: zero strength == unwrapped, drop == mask, cached == recomputed, batch == rows,
rankings checked against eager attention computed independently, layer scaling, report, composition."""

from __future__ import annotations

import functools

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import PAI, FastV, Method, PyramidDrop
from attnkit.methods.pruning import LayerShape, flops_ratio
from attnkit.models import get_adapter

from . import lm_by_hand
from .conftest import extend_inputs, greedy, logits

FAMILIES = ["llava", "qwen2_vl", "internvl", "idefics3"]


@functools.lru_cache(maxsize=None)
def _deep(family: str):
    return testing.tiny_model(family, num_layers=4, seed=2)


def _spec(kind: str, mode: str = "drop", **kw):
    if kind == "fastv":
        return FastV(k=kw.get("k", 2), r=kw.get("r", 0.5), mode=mode)
    positions = "official" if kind == "pdrop-official" else "original"
    return PyramidDrop(layers=kw.get("layers", (8, 16, 24)), ratio=kw.get("ratio", 0.5), mode=mode, positions=positions)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind,zero", [("fastv", {"r": 0.0}), ("pdrop", {"ratio": 1.0})])
def test_zero_strength_equals_unwrapped(family, kind, zero):
    model, inputs = _deep(family)
    ref, ref_tokens = logits(model, inputs), greedy(model, inputs, 6)
    with attnkit.wrap(model, _spec(kind, **zero)) as handle:
        got, tokens = logits(model, inputs), greedy(model, inputs, 6)
        assert handle.state.drops == []
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def _run(model, inputs, method):
    with torch.no_grad(), attnkit.wrap(model, method) as handle:
        out = model(**inputs).logits
        drops = list(handle.state.drops)
        keep = list(handle.state.keep)
    return out, drops, keep


@pytest.mark.parametrize("family", FAMILIES + ["qwen3_vl"])
@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_drop_equals_mask(family, kind):
    model, inputs = _deep(family)
    kw = {}
    if family == "qwen3_vl":  # DeepStack: no drop before its last feature-injection layer
        first = get_adapter(model).first_droppable_layer
        kw = {"k": max(2, first)} if kind == "fastv" else {"layers": (24,)}
    masked, _, keep = _run(model, inputs, _spec(kind, "mask", **kw))
    dropped, drops, _ = _run(model, inputs, _spec(kind, "drop", **kw))
    kept = drops[-1][1]
    assert kept.shape[1] < inputs["input_ids"].shape[1]
    # the same tokens: mask mode's keep masks, combined, leave exactly the dropped run's positions
    combined = functools.reduce(torch.logical_and, [k for _, k in keep])
    assert torch.equal(combined.nonzero()[:, 1].view(kept.shape), kept)
    ref = masked.gather(1, kept[..., None].expand(-1, -1, masked.shape[-1]))
    real = inputs["attention_mask"].bool().gather(1, kept)
    torch.testing.assert_close(dropped[real], ref[real], atol=1e-4, rtol=0)


class Replay(Method):
    """Masks (from layer ``at``) exactly the positions a pruning run dropped, whatever the input length."""

    name = "replay"

    def __init__(self, stages, prompt_len):
        super().__init__()
        self.stages, self.prompt_len = stages, prompt_len

    def select(self, ctx, hidden):
        layer = ctx.layer
        for at, kept in self.stages:
            if at == layer:
                keep = torch.ones(kept.shape[0], ctx.q_len, dtype=torch.bool)
                keep[:, : self.prompt_len] = False
                return keep.scatter(1, kept, True)
        return None


@pytest.mark.parametrize("family,kind", [("llava", "fastv"), ("qwen2_vl", "pdrop"), ("internvl", "fastv")])
def test_cached_generate_equals_full_recomputation(family, kind):
    """Decoding over the pruned KV cache gives the tokens that full forwards over the whole sequence give
    with the same selection (FastV/PyramidDrop rank once, at prefill, from the last prompt token)."""
    model, inputs = _deep(family)
    n = 5
    with torch.no_grad(), attnkit.wrap(model, _spec(kind)) as handle:
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        stages = list(handle.state.drops)
    new = out[:, inputs["input_ids"].shape[1] :]
    with torch.no_grad(), attnkit.wrap(model, Replay(stages, inputs["input_ids"].shape[1])):
        for t in range(n):
            full = model(**extend_inputs(inputs, new[:, :t]), use_cache=False).logits
            assert torch.equal(full[:, -1].argmax(-1), new[:, t]), f"step {t}"
    with torch.no_grad(), attnkit.wrap(model, _spec(kind, "mask")):
        masked = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    assert torch.equal(masked, out)


@pytest.mark.parametrize(
    "family,kind", [("llava", "pdrop"), ("qwen2_vl", "fastv"), ("idefics3", "fastv"), ("idefics3", "pdrop-official")]
)
def test_batch_equals_rows_alone(family, kind):
    """pdrop-official: renumbered positions in a left-padded batch."""
    model, _ = _deep(family)
    prompts = ["Is there a dog in the image?", "Please describe this image in detail and answer yes or no."]
    images = testing.sample_images(2)
    batch = testing.tiny_inputs(family, prompts=prompts, images=images)
    assert (batch["attention_mask"] == 0).any()
    with attnkit.wrap(model, _spec(kind)):
        got = greedy(model, batch, 5)
        for r in range(2):
            alone = testing.tiny_inputs(family, prompts=[prompts[r]], images=[images[r]])
            assert torch.equal(greedy(model, alone, 5)[0], got[r]), f"row {r}"


def _eager_attention(model, inputs):
    """Every layer's attention probabilities from transformers' own eager path (no attnkit)."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    att = getattr(out, "attentions", None) or out.language_model_outputs.attentions
    return att


def _expected_keep(att_row: torch.Tensor, image: torch.Tensor, n_keep: int) -> list[list[int]]:
    """Positions kept per row: everything but the image tokens outside the top n_keep of att_row."""
    rows = []
    for b in range(image.shape[0]):
        img = image[b].nonzero().flatten()
        top = img[att_row[b, img].topk(n_keep).indices]
        keep = (~image[b]).clone()
        keep[top] = True
        rows.append(keep.nonzero().flatten().tolist())
    return rows


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_ranks_by_last_token_attention_at_layer_k_minus_1(family):
    model, inputs = _deep(family)
    att = _eager_attention(model, inputs)[0]  # layer k-1 = 0 for k=1
    image = get_adapter(model).image_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    n_img = int(image[0].sum())
    want = _expected_keep(att[:, :, -1].mean(1), image, round(0.25 * n_img))
    _, drops, _ = _run(model, inputs, FastV(k=1, r=0.75))
    assert drops[0][0] == 1
    assert drops[0][1].tolist() == want


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_pdrop_ranks_by_the_stage_layers_own_attention(family):
    """Stage 1 (layer 8 of 32 -> 1 of 4) ranks with layer 1's attention of the last prompt token over the
    unpruned sequence, which the eager model computes at layer 1 itself; keeps int(n * 0.5)."""
    model, inputs = _deep(family)
    att = _eager_attention(model, inputs)[1]
    image = get_adapter(model).image_mask(inputs["input_ids"]) & inputs["attention_mask"].bool()
    n_img = int(image[0].sum())
    want = _expected_keep(att[:, :, -1].mean(1), image, int(n_img * 0.5))
    method = PyramidDrop()
    _, drops, _ = _run(model, inputs, method)
    assert [layer for layer, _ in drops] == [1, 2, 3] == list(method.stage_layers)
    assert drops[0][1].tolist() == want
    kept_images = [int(image.gather(1, pos)[0].sum()) for _, pos in drops]
    assert kept_images == [int(n_img * 0.5), int(n_img * 0.25), int(n_img * 0.125)]


def test_pdrop_layer_scaling_and_errors():
    model, inputs = _deep("llava")
    with attnkit.wrap(model, PyramidDrop(layers=(8, 16, 24))) as h:
        assert h.methods[0].stage_layers == (1, 2, 3)
    with pytest.raises(errors.MethodArgumentError, match=r"scale to \[1, 1, 2\]"):
        attnkit.wrap(model, PyramidDrop(layers=(6, 8, 16)))
    with pytest.raises(errors.MethodArgumentError, match="out of range"):
        attnkit.wrap(model, PyramidDrop(layers=(2,)))  # scales to 0
    for bad, match in [({"layers": (16, 8)}, "strictly increasing"), ({"ratio": 0.0}, "ratio"), ({"mode": "cut"}, "mode"),
                       ({"layers": "8"}, "list of layer"), ({"positions": 1}, "positions=1 must be one of original"),
                       ({"positions": "official", "mode": "mask"}, "positions='official' .* needs mode='drop'")]:
        with pytest.raises(errors.MethodArgumentError, match=match):
            PyramidDrop(**bad)
    for bad, match in [({"k": 0}, "k=0"), ({"r": 1.5}, "r=1.5"), ({"mode": None}, "mode")]:
        with pytest.raises(errors.MethodArgumentError, match=match):
            FastV(**bad)
    with pytest.raises(errors.MethodArgumentError, match="k gives layer 4"):
        attnkit.wrap(model, FastV(k=4))
    # Qwen3-VL adds DeepStack features after its first len(deepstack_visual_indexes) layers
    qwen3 = testing.tiny_model("qwen3_vl", num_layers=4)[0]
    qwen3.config.vision_config.deepstack_visual_indexes = [0, 1]
    assert get_adapter(qwen3).first_droppable_layer == 2
    with pytest.raises(errors.MethodArgumentError, match="adds image features to the hidden states up to layer 1"):
        attnkit.wrap(qwen3, FastV(k=1, mode="drop"))
    attnkit.wrap(qwen3, FastV(k=1, mode="mask")).remove()  # mask mode has no such limit
    with pytest.raises(errors.UnsupportedModelError, match="qwen3_vl has 3-D mRoPE positions"):
        attnkit.wrap(qwen3, PyramidDrop(layers=(24,), positions="official"))


def test_report_counts_tokens_and_flops():
    model, inputs = _deep("llava")
    method = FastV(k=2, r=0.5)
    _run(model, inputs, method)
    rep = method.report
    s = inputs["input_ids"].shape[1]
    n_img = int(get_adapter(model).image_mask(inputs["input_ids"])[0].sum())
    dropped = n_img - round(0.5 * n_img)
    assert rep.full_tokens == s and rep.image_tokens == n_img
    assert rep.tokens_per_layer == [s, s, s - dropped, s - dropped]
    assert rep.image_kept_per_layer == [n_img, n_img, n_img - dropped, n_img - dropped]
    shape = LayerShape.from_adapter(get_adapter(model))
    assert rep.flops_ratio == pytest.approx(flops_ratio(rep.tokens_per_layer, s, shape))
    assert 0 < rep.flops_ratio < 1
    masked = FastV(k=2, r=0.5, mode="mask")
    _run(model, inputs, masked)
    assert masked.report.to_dict()["tokens_per_layer"] == rep.tokens_per_layer


class SpyPAI(PAI):
    """PAI that records how many image columns it amplifies at each layer."""

    def scores(self, ctx, scores):
        layer = ctx.layer
        self.seen = getattr(self, "seen", [])
        self.seen.append((layer, int(ctx.image_mask_kv()[0].sum()), scores.shape[-1]))
        return super().scores(ctx, scores)


@pytest.mark.parametrize("kind", ["fastv", "pdrop"])
def test_composes_with_pai(kind):
    model, inputs = _deep("llava")
    n_img = int(get_adapter(model).image_mask(inputs["input_ids"])[0].sum())
    alone, _, _ = _run(model, inputs, _spec(kind))
    pai_only, _, _ = _run(model, inputs, PAI(alpha=1.0, start_layer=1))
    spy = SpyPAI(alpha=1.0, start_layer=1)
    both, drops, _ = _run(model, inputs, [_spec(kind), spy])
    prefill = {layer: (img, width) for layer, img, width in spy.seen}
    for layer, pos in drops:
        assert prefill[layer] == (int(get_adapter(model).image_mask(inputs["input_ids"]).gather(1, pos)[0].sum()), pos.shape[1])
    first_stage = drops[0][0]
    assert all(img == n_img for layer, (img, _) in prefill.items() if layer < first_stage)  # before any drop: all
    assert not torch.allclose(both[:, -1], alone[:, -1]) and not torch.allclose(both[:, -1], pai_only[:, -1])


# -- positions="official": the official layout, against the language model run by hand ----------------
def _pdrop_by_hand(model, inputs, renumber: bool, new: torch.Tensor, stages=(1, 2, 3), ratio=0.5):
    """PyramidDrop written out by hand on one unpadded row followed by the generated tokens ``new``: before
    stage layer s, the last prompt token's head-mean attention at that layer (its own q/k at the
    positions the layer has) ranks the image tokens present; the top int(n * ratio^(s+1)) stay, in order.
    Returns the logits of every row left and the prompt positions kept before each stage layer."""
    prompt = inputs["input_ids"][0]
    image = prompt == model.config.image_token_id
    n_img, s_len = int(image.sum()), prompt.numel()
    hidden = torch.cat([lm_by_hand.prompt_embeddings(model, inputs), lm_by_hand.token_embeddings(model, new)])
    kept = {}

    def before(i, h, ids, prev):
        if i not in stages:
            return h, ids
        positions = torch.arange(len(ids)) if renumber else torch.tensor(ids)
        att = lm_by_hand.layer_probs(model, i, h, positions)[:, ids.index(s_len - 1)].mean(0)
        live = [j for j, t in enumerate(ids) if t < s_len and image[t]]
        n_keep = int(n_img * ratio ** (stages.index(i) + 1))
        top = {live[k] for k in att[live].topk(n_keep).indices.tolist()}
        rows = [j for j in range(len(ids)) if j not in live or j in top]
        kept[i] = [ids[j] for j in rows if ids[j] < s_len]
        return h[rows], [ids[j] for j in rows]

    out, _ = lm_by_hand.run(model, hidden, list(range(s_len + new.numel())), before, renumber)
    return out, kept


def test_pdrop_official_positions_against_the_model_run_by_hand():
    """positions="official" renumbers the kept tokens 0..n-1 after each drop and places each decode step at
    the layer's own length: the cached generate gives, at every step, the logits of the model run layer by
    layer on the whole sequence written out that way (a full recomputation); the default keeps the
    original positions (also checked by hand), and the two differ."""
    model, _ = _deep("llava")
    inputs = testing.tiny_inputs("llava", prompts=["Please describe this image in detail."], images=testing.sample_images(1))
    s_len = inputs["input_ids"].shape[1]
    plain, _ = lm_by_hand.run(model, lm_by_hand.prompt_embeddings(model, inputs), list(range(s_len)),
                              lambda i, h, ids, prev: (h, ids), renumber=False)
    torch.testing.assert_close(plain[-1], logits(model, inputs)[0, -1], atol=1e-5, rtol=0)  # the helper is sound
    last = lm_by_hand.check_both_layouts(model, inputs, lambda positions: PyramidDrop(positions=positions), _pdrop_by_hand)
    assert (last["official"] - last["original"]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "gemma3", "instructblip"])
def test_capture_standins_give_the_whole_modules_probabilities(family, monkeypatch):
    """PyramidDrop's capture computes Q for the ranked row only and skips V and O (capture._standins): its
    probabilities equal those of the whole attention module, and the module gets its projections back
    (the ranking itself is checked against eager attention above)."""
    from attnkit.hooks import capture

    model, inputs = _deep(family)
    attn = model.get_decoder().layers[1].self_attn
    before = {name: getattr(attn, name, None) for name in capture.STANDIN_PROJECTIONS}
    assert capture._standins(attn, torch.tensor([0])) is not None  # the families' modules take the stand-ins
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    original = capture.layer_attention

    def recording(*args, **kwargs):
        probs = original(*args, **kwargs)
        seen[capture.STANDIN].append(probs)
        return probs

    monkeypatch.setattr(capture, "layer_attention", recording)
    out = {}
    for standin in (True, False):
        monkeypatch.setattr(capture, "STANDIN", standin)
        out[standin], drops, keep = _run(model, inputs, PyramidDrop(mode="mask"))  # mask mode: every family
        assert keep and not drops
    assert len(seen[True]) == len(seen[False]) == len(PyramidDrop(layers=(8, 16, 24)).config.layers)
    for a, b in zip(seen[True], seen[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
    assert {name: getattr(attn, name, None) for name in capture.STANDIN_PROJECTIONS} == before
