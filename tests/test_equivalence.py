"""Equivalence backbone on all 10 families: the toolkit's eager path equals fused sdpa, remove()
restores the exact original, batches equal rows alone, KV-cached decoding equals recomputation."""

from __future__ import annotations

import torch

import attnkit
from attnkit import testing
from attnkit.hooks import dispatch

from .conftest import extend_inputs, greedy, logits, valid_positions


def _impls(model) -> dict[str, str]:
    out = {"": model.config._attn_implementation}
    for key in model.config.sub_configs:
        sub = getattr(model.config, key, None)
        if sub is not None:
            out[key] = sub._attn_implementation
    return out


def test_identity_equals_unwrapped_sdpa(tiny):
    model, inputs = tiny
    ref = logits(model, inputs)
    ref_tokens = greedy(model, inputs)
    with attnkit.wrap(model, "identity") as h:
        assert h.methods_for_layer(0), "identity must route every layer through the eager path"
        got = logits(model, inputs)
        got_tokens = greedy(model, inputs)
    keep = valid_positions(inputs)
    assert ref.abs().max() > 1.0, "fixture too weak: logits barely move"
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)
    assert torch.equal(got_tokens, ref_tokens)


def test_remove_restores_exact_original(tiny):
    model, inputs = tiny
    before_impl = _impls(model)
    before = logits(model, inputs)
    hooks_before = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    h = attnkit.wrap(model, "identity")
    assert model.config.get_text_config()._attn_implementation == dispatch.NAME
    for key, impl in before_impl.items():
        if key not in ("", "text_config"):
            assert _impls(model)[key] == impl, f"{key} must keep its attention implementation"
    h.remove()
    assert _impls(model) == before_impl
    hooks_after = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()}
    assert hooks_after == hooks_before
    assert not any(dispatch.HANDLE_ATTR in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, inputs), before)


def test_batch_rows_equal_rows_alone(family):
    model, _ = testing.tiny_model(family)
    prompts = ["Is there a dog in the image?", "Please describe this image in detail and answer yes or no."]
    images = testing.sample_images(2)
    batch = testing.tiny_inputs(family, prompts=prompts, images=images)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    with attnkit.wrap(model, "identity"):
        batch_tokens = greedy(model, batch)
        for r in range(2):
            alone = testing.tiny_inputs(family, prompts=[prompts[r]], images=[images[r]])
            assert torch.equal(greedy(model, alone)[0], batch_tokens[r]), f"row {r} differs when batched"




def test_kv_cached_generate_equals_full_recomputation(tiny):
    model, inputs = tiny
    n = 6
    with attnkit.wrap(model, "identity"), torch.no_grad():
        gen = model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )
        tokens = gen.sequences[:, inputs["input_ids"].shape[1] :]
        for t in range(n):
            full = model(**extend_inputs(inputs, tokens[:, :t])).logits[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=1e-4, rtol=0)
            allowed = torch.isfinite(gen.scores[t])  # the same suppressed ids as generate
            pick = full.masked_fill(~allowed, float("-inf")).argmax(-1)
            assert torch.equal(pick, tokens[:, t]), f"step {t}: cached decode != recomputation"


def test_decode_context_tracks_steps(tiny):
    """ForwardContext: prefill first, then one decode step per new token, image positions kept."""
    model, inputs = tiny
    seen = []

    class Recorder(attnkit.methods.Identity):
        name = "recorder"

        def begin_forward(self, ctx):
            seen.append((ctx.is_prefill, ctx.step, ctx.past_len, ctx.q_len, [p.tolist() for p in ctx.image_positions]))

    with attnkit.wrap(model, Recorder()):
        greedy(model, inputs, n=4)
    prompt_len = inputs["input_ids"].shape[1]
    assert [s[:4] for s in seen] == [(True, 0, 0, prompt_len)] + [
        (False, i, prompt_len + i - 1, 1) for i in range(1, 4)
    ]
    assert all(s[4] == seen[0][4] for s in seen)
    assert all(len(p) > 0 for p in seen[0][4]), "every row has image tokens"
