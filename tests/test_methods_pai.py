"""PAI: the score rewrite by hand, image attention mass rises only in the chosen layers and only for the
last row; the CFG step equals its formula on separately computed image and image-free runs, step by
step through generate (the branch's own KV cache), and batches equal rows alone."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.hooks.context import ForwardState, View
from attnkit.methods.base import Contrast
from attnkit.methods import PAI
from attnkit.models import get_adapter

from .conftest import extend_inputs, greedy
from .test_methods_common import Recorder, deep

MIN = torch.finfo(torch.float32).min


def test_score_rewrite_by_hand():
    pai = PAI(alpha=0.5, start_layer=0)
    state = ForwardState(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, batch_size=1, q_len=3, past_len=2)
    state.image_mask = torch.tensor([[False, True, True, True, False]])
    state.begin()
    pai._states = state.states
    visible = torch.ones(1, 1, 2, 5, dtype=torch.bool)
    visible[0, 0, 1, 3] = False  # e.g. a pruned image token
    ctx = View(state, 0).at(torch.tensor([1, 2]), visible)  # a block holding rows 1 and 2 of q_len 3: row 2 is the last
    scores = torch.tensor(
        [
            [[0.4, 1.0, -2.0, 0.3, 0.2], [-1.0, 2.0, -3.0, MIN, 1.0]],
            [[0.1, 0.2, 0.3, 0.4, 0.5], [1.5, -0.5, 0.0, MIN, -2.0]],
        ]
    )[None]
    out = pai.scores(ctx, scores.clone())
    expected = scores.clone()
    expected[0, 0, 1] = torch.tensor([-1.0, 3.0, -1.5, MIN, 1.0])  # 2 + 1, -3 + 1.5; a masked column stays
    expected[0, 1, 1] = torch.tensor([1.5, -0.25, 0.0, MIN, -2.0])
    assert torch.equal(out, expected)
    ctx = View(state, 0).at(torch.tensor([0, 1]), visible)  # a block without the last row: untouched
    assert torch.equal(pai.scores(ctx, scores.clone()), scores)
    assert pai.rows(ctx).tolist() == [2]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_image_mass_rises_in_chosen_layers_only(family):
    model, inputs = deep(family)
    rec = Recorder()
    with attnkit.wrap(model, [rec, PAI(alpha=0.5, start_layer=1, end_layer=3)]) as h, torch.no_grad():
        for step in ("prefill", "decode"):
            if step == "prefill":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
                assert not h.ctx.is_prefill
            image = h.ctx.image_mask_kv()
            for layer in range(4):
                after = Recorder.assemble(rec.post, layer)
                before = torch.softmax(Recorder.assemble(rec.pre_scores, layer), dim=-1)
                before = before * (after.sum(-1, keepdim=True) > 0)  # padding rows attend to nothing
                live = image.any(1)
                if layer not in (1, 2):
                    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
                    continue
                torch.testing.assert_close(after[:, :, :-1], before[:, :, :-1], atol=1e-6, rtol=0)
                mass_before = (before[:, :, -1] * image[:, None]).sum(-1)[live]
                mass_after = (after[:, :, -1] * image[:, None]).sum(-1)[live]
                assert (mass_after > mass_before + 1e-4).all(), (step, layer, mass_before, mass_after)


def _cfg(logp: torch.Tensor, logp_noimg: torch.Tensor, gamma: float) -> torch.Tensor:
    """The CFG step written out: guidance, then the 0.1 x max plausibility cutoff."""
    out = gamma * (logp - logp_noimg) + logp_noimg
    keep = logp.exp() >= 0.1 * logp.exp().max(-1, keepdim=True).values
    return torch.where(keep, out, torch.full_like(out, -math.inf))




CFG_FAMILIES = ["llava", "qwen2_vl", "instructblip", "internvl", "gemma3"]


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_cfg_equals_formula_through_generate(family):
    """Wrapped greedy generate == a loop that recomputes both prompts from scratch at every step."""
    model, inputs = testing.tiny_model(family)
    adapter = get_adapter(model)
    text = adapter.text_only_inputs(inputs)
    suppress = torch.tensor(model.generation_config.suppress_tokens)
    gamma, n = 1.5, 5
    with torch.no_grad():
        with attnkit.wrap(model, PAI(alpha=0.0, start_layer=0, cfg_gamma=gamma)):
            gen = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
        tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
        for t in range(n):
            logp = torch.log_softmax(model(**extend_inputs(inputs, tokens[:, :t])).logits[:, -1], -1)
            logp_noimg = torch.log_softmax(
                adapter.text_only_model()(**extend_inputs(text, tokens[:, :t])).logits[:, -1], -1
            )
            want = _cfg(logp, logp_noimg, gamma)
            got = gen.logits[t]
            assert torch.equal(torch.isinf(got), torch.isinf(want)), f"step {t}: plausibility set differs"
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=0)
            pick = want.index_fill(1, suppress, -math.inf).argmax(-1)
            assert torch.equal(pick, tokens[:, t]), f"step {t}"
        plain = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    if family != "gemma3":  # gemma3's tiny model repeats one token whatever is done to it
        assert not torch.equal(plain[:, -n:], tokens), "CFG must change the greedy choice somewhere"


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "instructblip"])
def test_cfg_batch_rows_equal_rows_alone(family):
    model, _ = testing.tiny_model(family)
    prompts = ["Is there a dog in the image?", "Please describe this image in detail and answer yes or no."]
    images = testing.sample_images(2)
    batch = testing.tiny_inputs(family, prompts=prompts, images=images)
    assert (batch["attention_mask"] == 0).any()
    with attnkit.wrap(model, PAI(alpha=0.5, start_layer=0, cfg_gamma=1.1)) as h:
        got = greedy(model, batch)
        assert h.state.contrast_rows == 2 and h.ctx.batch_size == 4
        for r in range(2):
            alone = testing.tiny_inputs(family, prompts=[prompts[r]], images=[images[r]])
            assert torch.equal(greedy(model, alone)[0], got[r]), f"row {r} differs when batched"
        assert got.shape == (2, 8)


def test_cfg_plain_forward_and_errors():
    model, inputs = testing.tiny_model("llava")
    with attnkit.wrap(model, PAI(alpha=0.2, start_layer=0, cfg_gamma=1.1)):
        with torch.no_grad():
            out = model(**inputs)
        assert out.logits.shape[0] == 2, "the contrast rows never leave the wrap"
        with pytest.raises(errors.InputError, match="beam search"):
            model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert PAI(cfg_gamma=1.0).contrast is None and PAI().contrast is None
    assert PAI(cfg_gamma=1.1).contrast == Contrast("no_image")
