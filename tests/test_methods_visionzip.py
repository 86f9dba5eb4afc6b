"""VisionZip: no-op at full count, exact per-image counts through generate with left padding, batch ==
rows alone, KV-cached generate == full recomputation, the selection and the contextual merge against
independent computations (eager vision attentions; a merge worked out by hand), remove() restores."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import VisionZip
from attnkit.methods.visionzip import visionzip_merge

from .conftest import extend_inputs, greedy, logits

FAMILIES = ("llava", "gemma3")
N_IMAGE = 16  # image tokens per image in the tiny models (4x4)


def tiny(family: str):
    from .conftest import _tiny

    return _tiny(family)


def image_id(model) -> int:
    return int(model.config.image_token_id)


def suppressed_argmax(model, logits_last: torch.Tensor) -> torch.Tensor:
    """Greedy choice as generate makes it: the tiny models suppress their multimodal tokens, and
    ``greedy`` sets min_new_tokens, which suppresses EOS."""
    out = logits_last.clone()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out[..., list(model.generation_config.suppress_tokens or []) + eos] = float("-inf")
    return out.argmax(-1)


def row_alone(inputs: dict, r: int) -> dict:
    """Row r of a left-padded batch as a batch of one, without its padding."""
    real = inputs["attention_mask"][r].bool()
    out = {}
    for key, value in inputs.items():
        if key == "pixel_values":
            out[key] = value[r : r + 1]
        elif isinstance(value, torch.Tensor) and value.shape[:2] == inputs["input_ids"].shape:
            out[key] = value[r][real][None]
        else:
            out[key] = value
    return out


class LMInputs:
    """Records the input_ids the top-level model's inner module (after the wrap's pre-hook) receives."""

    def __init__(self, model):
        self.ids: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.h = model.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids.append(ids.clone())
        mask = kwargs.get("attention_mask")
        self.masks.append(None if mask is None else mask.clone())

    def remove(self):
        self.h.remove()


def recorded_greedy(model, inputs, n: int = 6) -> tuple[LMInputs, torch.Tensor]:
    """(what the LM received at each step, the greedy tokens) of an n-token greedy generate."""
    rec = LMInputs(model)
    try:
        return rec, greedy(model, inputs, n=n)
    finally:
        rec.remove()


class ProjectorInput:
    """Records the image tokens entering the projector (after the method's reduction)."""

    def __init__(self, model, family):
        proj = model.model.multi_modal_projector
        target = proj if family == "llava" else proj.mm_soft_emb_norm
        self.seen: list[torch.Tensor] = []
        self.h = target.register_forward_pre_hook(lambda m, a: self.seen.append(a[0].detach().clone()))

    def remove(self):
        self.h.remove()


def test_bad_arguments_one_line():
    for kwargs in ({"dominant": 0}, {"dominant": 2.5}, {"contextual": -1}, {"contextual": "3"}, {"ratio": 1}):
        with pytest.raises(errors.MethodArgumentError) as err:
            VisionZip(**kwargs)
        assert "\n" not in str(err.value) and str(err.value).startswith("visionzip:")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "instructblip"])
def test_unsupported_family(family):
    model, inputs = tiny(family)
    with pytest.raises(errors.UnsupportedModelError) as err:
        attnkit.wrap(model, "visionzip")
    msg = str(err.value)
    assert "\n" not in msg and "visionzip" in msg and family in msg
    with attnkit.wrap(model, []):  # left unwrapped: wrapping again works
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_full_count_equals_unwrapped(family):
    model, inputs = tiny(family)
    ref_logits, ref_tokens = logits(model, inputs), greedy(model, inputs)
    for dominant, contextual in ((N_IMAGE, 0), (10, 6), (12, 9)):
        with attnkit.wrap(model, VisionZip(dominant=dominant, contextual=contextual)) as h:
            torch.testing.assert_close(logits(model, inputs), ref_logits, atol=1e-5, rtol=0)
            assert torch.equal(greedy(model, inputs), ref_tokens)
            assert h.methods[0].report.flops_ratio == 1.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dominant,contextual", [(3, 2), (6, 0), (1, 4)])
def test_counts_through_generate_and_batch_equals_rows(family, dominant, contextual):
    model, inputs = tiny(family)
    kept = dominant + contextual
    method = VisionZip(dominant=dominant, contextual=contextual)
    seq = inputs["input_ids"].shape[1]
    with attnkit.wrap(model, method):
        rec, tokens = recorded_greedy(model, inputs, n=6)
        # the prefill saw exactly `kept` placeholders per row, and every decode step a mask over the pruned prompt
        assert (rec.ids[0] == image_id(model)).sum(1).tolist() == [kept, kept]
        assert rec.ids[0].shape[1] == seq - (N_IMAGE - kept)
        for step, mask in enumerate(rec.masks[1:], start=1):
            assert mask.shape[1] == seq - (N_IMAGE - kept) + step
        assert torch.equal(rec.masks[0], inputs["attention_mask"][:, : seq - (N_IMAGE - kept)])  # padding kept on the left
        rep = method.report
        assert rep.image_tokens == N_IMAGE and rep.full_tokens == seq
        assert rep.image_kept_per_layer == [kept] * len(rep.tokens_per_layer)
        assert rep.tokens_per_layer[0] == seq - (N_IMAGE - kept) and rep.flops_ratio < 1.0
        batch_logits = logits(model, inputs)
        for r in range(2):
            alone = row_alone(inputs, r)
            assert torch.equal(greedy(model, alone, n=6)[0], tokens[r])
            torch.testing.assert_close(logits(model, alone)[0, -1], batch_logits[r, -1], atol=1e-4, rtol=0)


def check_cached_generate(model, inputs, method, n: int = 6) -> None:
    """Under ``method``, each greedy token of a cached generate is the argmax of a full recomputation."""
    with attnkit.wrap(model, method):
        tokens = greedy(model, inputs, n=n)
        for i in range(n):
            full = logits(model, extend_inputs(inputs, tokens[:, :i]))
            assert torch.equal(suppressed_argmax(model, full[:, -1]), tokens[:, i]), i


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generate_equals_full_recomputation(family):
    model, inputs = tiny(family)
    check_cached_generate(model, inputs, VisionZip(dominant=3, contextual=2))


def reference_tower(family: str):
    """The same tiny model with eager vision attention, to read the attention weights independently."""
    model, _ = testing.tiny_model(family, seed=0)
    model.model.vision_tower.set_attn_implementation("eager")
    return model


def independent_stats(family: str, inputs: dict, layer: int):
    """(tokens, cls, cls_attn, mean_attn, keys) per LLM token from the eager tower's own attentions."""
    ref = reference_tower(family)
    tower = ref.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        attn = out.attentions[layer]  # (B, H, S, S)
        enc = tower.encoder.layers[layer]
        normed = enc.layer_norm1(out.hidden_states[layer])
        bsz, seq, _ = normed.shape
        keys = enc.self_attn.k_proj(normed).view(bsz, seq, enc.self_attn.num_heads, -1).mean(2)
    if family == "llava":
        feats = out.hidden_states[-2]
        return feats[:, 1:], feats[:, 0], attn[:, :, 0, 1:].sum(1), attn.mean(1).mean(1)[:, 1:], keys[:, 1:]
    # gemma3: 8x8 patches pooled 2x2 into 4x4 cells, as the projector pools its input
    def pool(x):  # (B, 64, C) -> (B, 16, C), row-major cells
        return x.view(bsz, 4, 2, 4, 2, -1).mean((2, 4)).reshape(bsz, 16, -1)

    feats = pool(out.last_hidden_state)
    return feats, None, None, pool(attn.mean(1).mean(1)[..., None])[..., 0], pool(keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_against_eager_attention(family):
    model, inputs = tiny(family)
    dominant, contextual = 5, 3
    with attnkit.wrap(model, VisionZip(dominant=dominant, contextual=contextual)):
        rec = ProjectorInput(model, family)
        try:
            logits(model, inputs)
        finally:
            rec.remove()
    got = rec.seen[0]
    layer = 0 if family == "llava" else 1  # llava: hidden_states[-2] = output of layer 0 of 2; gemma3: last layer
    tokens, cls, cls_attn, mean_attn, keys = independent_stats(family, inputs, layer)
    if family == "llava":
        top = cls_attn.topk(dominant - 1, dim=1).indices.sort(1).values
        expected = visionzip_merge(tokens, cls_attn, keys, dominant - 1, contextual, cls=cls)
        torch.testing.assert_close(got[:, 0], cls, atol=1e-5, rtol=0)  # [CLS] first, as the official code keeps it
        torch.testing.assert_close(got[:, 1:dominant], tokens.gather(1, top[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=0)
    else:
        expected = visionzip_merge(tokens, mean_attn, keys, dominant, contextual)
        top = mean_attn.topk(dominant, dim=1).indices.sort(1).values
        torch.testing.assert_close(got[:, :dominant], tokens.gather(1, top[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=0)
    assert got.shape == (2, dominant + contextual, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_contextual_merge_by_hand():
    # 6 tokens, 2-d; dominant = the 2 best scores (indices 1 and 4); remaining (0, 2, 3, 5) in order
    tokens = torch.tensor([[[1.0, 0.0], [9.0, 9.0], [0.0, 2.0], [3.0, 0.0], [8.0, 8.0], [0.0, 5.0]]])
    score = torch.tensor([[0.1, 0.9, 0.2, 0.0, 0.8, 0.3]])
    # keys: token 0 and 3 point along x, token 2 and 5 along y
    keys = torch.tensor([[[2.0, 0.1], [0.0, 0.0], [0.1, 1.0], [1.0, 0.0], [0.0, 0.0], [0.2, 3.0]]])
    out = visionzip_merge(tokens, score, keys, n_dominant=2, n_contextual=2)
    # R = 4, step = 2: targets = remaining[0] (token 0) and remaining[2] (token 3)
    # token 2 -> cos with token 0 (0.1*2+1*0.1)/.. vs with token 3 (0.1): both small, token 0 wins (0.3/2.0 > 0.1/1.0)
    # token 5 -> with token 0: (0.4+0.3)/(|k0||k5|) = 0.7/(2.0025*3.0067) ~ 0.116; with token 3: 0.2/3.0067 ~ 0.067 -> token 0
    expected_ctx0 = tokens[0, 0] + (tokens[0, 2] + tokens[0, 5]) / 2  # target + mean of its assigned tokens
    expected_ctx1 = tokens[0, 3]  # nothing assigned: the target alone
    expected = torch.stack([tokens[0, 1], tokens[0, 4], expected_ctx0, expected_ctx1])[None]
    torch.testing.assert_close(out, expected)
    # with [CLS]: it comes first, the dominant tokens keep their original order
    cls = torch.tensor([[7.0, 7.0]])
    out = visionzip_merge(tokens, score, keys, n_dominant=2, n_contextual=0, cls=cls)
    assert torch.equal(out, torch.stack([cls[0], tokens[0, 1], tokens[0, 4]])[None])


def hook_counts(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_exact_original(family):
    model, inputs = tiny(family)
    before_logits, before_tokens, before_hooks = logits(model, inputs), greedy(model, inputs), hook_counts(model)
    handle = attnkit.wrap(model, VisionZip(dominant=2, contextual=1))
    greedy(model, inputs)  # a wrapped, pruned generate in between
    assert hook_counts(model) != before_hooks
    handle.remove()
    assert hook_counts(model) == before_hooks
    assert torch.equal(logits(model, inputs), before_logits)
    assert torch.equal(greedy(model, inputs), before_tokens)


@pytest.mark.parametrize("method", [VisionZip(dominant=3, contextual=2), "hiprune"])
def test_rows_with_different_image_counts(method):
    """Two back-to-back images in row 0, one in row 1: rows drop different numbers of placeholders, so the
    pruned batch is left-padded again; each row still equals itself alone, cached == recomputed."""
    from attnkit.methods import HiPrune

    method = HiPrune(budget=6, alpha=0.5) if method == "hiprune" else method
    kept = 5 if isinstance(method, VisionZip) else 6
    model, _ = tiny("llava")
    processor = testing.tiny_processor("llava")
    texts = ["USER: <image>\n<image>\nAre they the same? ASSISTANT:", "USER: <image>\nIs there a dog? ASSISTANT:"]
    inputs = dict(processor(text=texts, images=testing.sample_images(3), padding=True, return_tensors="pt"))
    with attnkit.wrap(model, method):
        rec, tokens = recorded_greedy(model, inputs, n=6)
        assert (rec.ids[0] == image_id(model)).sum(1).tolist() == [2 * kept, kept]
        assert method.report.image_tokens == 2 * N_IMAGE and method.report.image_kept_per_layer[0] == 2 * kept
        batch_logits = logits(model, inputs)
        for r, images in ((0, slice(0, 2)), (1, slice(2, 3))):
            alone = row_alone(inputs, r)
            alone["pixel_values"] = inputs["pixel_values"][images]
            assert torch.equal(greedy(model, alone, n=6)[0], tokens[r])
            torch.testing.assert_close(logits(model, alone)[0, -1], batch_logits[r, -1], atol=1e-4, rtol=0)
        for i in range(6):
            full = logits(model, extend_inputs(inputs, tokens[:, :i]))
            assert torch.equal(suppressed_argmax(model, full[:, -1]), tokens[:, i]), i
