"""Contrast rows (methods.base.Contrast, hooks/branch.py): a toy method records the contrast logits of each
kind; the user's logits and tokens are the unwrapped model's, the contrast logits are the model's on the
variant batch run by hand (prefill and decode steps), and the errors are one line."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import errors
from attnkit.methods.base import Contrast, Method
from attnkit.models import get_adapter

from .conftest import _tiny, extend_inputs

N = 3  # new tokens


class Toy(Method):
    """Records the contrast logits; returns the user's logits unchanged."""

    name = "toy_contrast"

    def __init__(self, contrast: Contrast) -> None:
        super().__init__()
        self.contrast = contrast
        self.seen: list[torch.Tensor] = []

    def logits(self, view, logits, contrast=None):
        assert contrast is not None and contrast.shape == logits.shape
        self.seen.append(contrast.clone())
        return logits


def noise(pv: torch.Tensor) -> torch.Tensor:
    """A deterministic alteration of any pixel layout (VCD would add noise)."""
    return pv.flip(-1) * 0.5 + 0.25


def shorter(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An altered prompt one token shorter: the third-last (text) token dropped, the second-last replaced."""
    out = torch.cat([ids[:, :-3], ids[:, -2:]], 1)
    out[:, -2] = ids[:, -4]
    return out, torch.cat([mask[:, :-3], mask[:, -2:]], 1)


def _generate(model, inputs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False, return_dict_in_generate=True, output_logits=True
        )


def _run(model, inputs, contrast):
    """(prefill logits, generate output, recorded contrast logits of the prefill, of generate's steps)."""
    toy = Toy(contrast)
    with attnkit.wrap(model, toy), torch.no_grad():
        first = model(**inputs).logits
        prefill = toy.seen[-1]
        gen = _generate(model, inputs)
    return first, gen, prefill, toy.seen[1:]


def _check_user_rows(model, inputs, first, gen):
    """(a): the user's logits and tokens are the unwrapped model's."""
    with torch.no_grad():
        ref_first = model(**inputs).logits
    ref = _generate(model, inputs)
    assert first.shape == ref_first.shape, "the contrast rows leaked"
    torch.testing.assert_close(first, ref_first, atol=2e-5, rtol=0)
    assert torch.equal(gen.sequences, ref.sequences)
    for a, b in zip(gen.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def _check_steps(model, variant, prefill, steps, tokens):
    """(b): the contrast logits equal the model on the variant batch, at prefill and at every decode step
    (fed the user's tokens, recomputed from scratch)."""
    with torch.no_grad():
        torch.testing.assert_close(prefill, model(**variant).logits, atol=1e-4, rtol=0)
        assert len(steps) == N
        for t in range(N):
            want = model(**extend_inputs(variant, tokens[:, :t])).logits[:, -1]
            torch.testing.assert_close(steps[t][:, -1], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3", "gemma3"])
def test_pixels(family):
    model, inputs = _tiny(family)
    first, gen, prefill, steps = _run(model, inputs, Contrast("pixels", pixels=noise))
    _check_user_rows(model, inputs, first, gen)
    variant = dict(inputs, pixel_values=noise(inputs["pixel_values"]))
    tokens = gen.sequences[:, inputs["input_ids"].shape[1] :]
    _check_steps(model, variant, prefill, steps, tokens)
    assert (prefill - first).abs().max() > 1e-3, "the altered pixels must change the contrast logits"
    assert "get_image_features" not in vars(model.base_model), "remove() takes the shadow off"


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "internvl"])
def test_pixels_identity_gives_user_logits(family):
    """(c): identity pixels: the contrast rows are the user's rows (mRoPE positions and rope deltas line up
    through generate's decode steps)."""
    model, inputs = _tiny(family)
    first, gen, prefill, steps = _run(model, inputs, Contrast("pixels", pixels=lambda pv: pv))
    torch.testing.assert_close(prefill, first, atol=2e-5, rtol=0)
    for got, user in zip(steps, gen.logits):
        torch.testing.assert_close(got[:, -1], user, atol=2e-5, rtol=0)
    _check_user_rows(model, inputs, first, gen)


def _prompt_variant(family, model, inputs):
    """The altered prompt run alone: left-padded to the prompt length, with the same images."""
    adapter = get_adapter(model)
    ids, mask = shorter(inputs["input_ids"], inputs["attention_mask"])
    q = inputs["input_ids"].shape[1]
    pad = q - ids.shape[1]
    ids = torch.cat([ids.new_full((ids.shape[0], pad), adapter.pad_id), ids], 1)
    mask = torch.cat([mask.new_zeros(mask.shape[0], pad), mask], 1)
    variant = dict(inputs, input_ids=ids, attention_mask=mask)
    if "token_type_ids" in inputs:  # gemma3: 1 on the image tokens
        variant["token_type_ids"] = adapter.image_mask(ids).to(inputs["token_type_ids"].dtype)
    return variant


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])
def test_prompt(family):
    model, inputs = _tiny(family)
    first, gen, prefill, steps = _run(model, inputs, Contrast("prompt", prompt=shorter))
    _check_user_rows(model, inputs, first, gen)
    tokens = gen.sequences[:, inputs["input_ids"].shape[1] :]
    _check_steps(model, _prompt_variant(family, model, inputs), prefill, steps, tokens)
    assert (prefill[:, -1] - first[:, -1]).abs().max() > 1e-3, "the altered prompt must change the contrast logits"


def longer(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An altered prompt two tokens longer: the row's first two real tokens repeated after its first one (as
    ICD puts its instruction in), so every row grows."""
    start = (mask == 0).sum(1)  # left padding
    q = ids.shape[1]
    rows = []
    for r in range(ids.shape[0]):
        s = int(start[r])
        real = ids[r, s:]
        rows.append(torch.cat([ids[r, :s], real[:1], real[:2], real[1:]]))
    out_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 2)], 1).sort(1).values  # left-padded, q + 2 wide
    assert out_mask.shape[1] == q + 2
    return torch.stack(rows), out_mask


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_prompt_longer(family):
    """An altered prompt longer than the user's (q' = q + 2): the user's rows are padded inside the forward and
    stay the unwrapped model's (logits at their q positions, tokens); the contrast logits are the variant's
    (its last q positions at prefill, then every decode step); hidden states and attentions keep the user's
    shapes."""
    model, inputs = _tiny(family)
    first, gen, prefill, steps = _run(model, inputs, Contrast("prompt", prompt=longer))
    _check_user_rows(model, inputs, first, gen)
    adapter = get_adapter(model)
    ids, mask = longer(inputs["input_ids"], inputs["attention_mask"])
    variant = dict(inputs, input_ids=ids, attention_mask=mask)
    if "token_type_ids" in inputs:
        variant["token_type_ids"] = adapter.image_mask(ids).to(inputs["token_type_ids"].dtype)
    q = inputs["input_ids"].shape[1]
    tokens = gen.sequences[:, q:]
    with torch.no_grad():
        torch.testing.assert_close(prefill, model(**variant).logits[:, -q:], atol=1e-4, rtol=0)
    with torch.no_grad():
        assert len(steps) == N
        for t in range(N):
            want = model(**extend_inputs(variant, tokens[:, :t])).logits[:, -1]
            torch.testing.assert_close(steps[t][:, -1], want, atol=1e-4, rtol=0)
        ref = model(**inputs, output_hidden_states=True, output_attentions=True)
        with attnkit.wrap(model, Toy(Contrast("prompt", prompt=longer))):
            got = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert [h.shape for h in got.hidden_states] == [h.shape for h in ref.hidden_states]
    bsz, heads = inputs["input_ids"].shape[0], get_adapter(model).num_heads
    assert {tuple(a.shape) for a in got.attentions} == {(bsz, heads, q, q)}  # sdpa unwrapped returns none
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.hidden_states[-1][keep], ref.hidden_states[-1][keep], atol=2e-5, rtol=0)
    assert (prefill[:, -1] - first[:, -1]).abs().max() > 1e-3, "the altered prompt must change the contrast logits"


def test_errors():
    f = lambda x: x  # noqa: E731
    with pytest.raises(errors.MethodArgumentError, match="not supported"):
        Contrast("bogus")
    with pytest.raises(errors.MethodArgumentError, match="needs a callable pixels="):
        Contrast("pixels")
    with pytest.raises(errors.MethodArgumentError, match="needs a callable prompt="):
        Contrast("prompt", prompt=3)
    with pytest.raises(errors.MethodArgumentError, match="takes no pixels="):
        Contrast("no_image", pixels=f)
    assert Contrast("pixels", pixels=f) == Contrast("pixels", pixels=f) != Contrast("pixels", pixels=noise)

    model, inputs = _tiny("instructblip")
    with pytest.raises(errors.UnsupportedModelError, match="instructblip"):
        attnkit.wrap(model, Toy(Contrast("pixels", pixels=f)))
    assert "get_image_features" not in vars(model.base_model)
    model, inputs = _tiny("qwen2_vl")
    with pytest.raises(errors.UnsupportedModelError, match="mRoPE"):
        attnkit.wrap(model, Toy(Contrast("prompt", prompt=shorter)))

    model, inputs = _tiny("llava")
    with pytest.raises(errors.MethodArgumentError, match="different contrast rows"):
        attnkit.wrap(model, [Toy(Contrast("no_image")), Toy(Contrast("pixels", pixels=f))])
    no_image = lambda ids, m: (ids[:, -4:], m[:, -4:])  # noqa: E731
    cases = [
        (Contrast("prompt", prompt=longer, decode=False), "longer than the prompt .* needs Contrast\\(decode=True\\)"),
        (Contrast("prompt", prompt=no_image), "image tokens per row"),
        (Contrast("pixels", pixels=lambda pv: pv[:1]), "same shape"),
    ]
    for contrast, message in cases:
        with attnkit.wrap(model, Toy(contrast)), torch.no_grad():
            with pytest.raises(errors.InputError, match=message) as e:
                model(**inputs)
            assert "\n" not in str(e.value)
            with pytest.raises(errors.InputError, match=message):
                _generate(model, inputs)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        with attnkit.wrap(model, Toy(Contrast("pixels", pixels=noise))):
            wrapped = model(**inputs, output_hidden_states=True)
    assert [h.shape for h in wrapped.hidden_states] == [h.shape for h in out.hidden_states], "hidden states leaked"


# -- prefill-only contrast rows (Contrast(decode=False)): packed or padded, dropped after the prefill ------
class Once(Method):
    """Records the contrast logits of each forward (None at decode steps) and the batch of every attention call."""

    name = "toy_contrast_once"
    contrast = Contrast("no_image", decode=False)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor | None] = []

    def logits(self, view, logits, contrast=None):
        self.seen.append(None if contrast is None else contrast.clone())
        return logits


def _image_free(model, inputs):
    """The image-free prompts run alone (the adapter's text-only inputs, left-padded by it)."""
    adapter = get_adapter(model)
    return adapter.text_only_inputs({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]})


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_prefill_only_rows(family, packed):
    """generate() with a Contrast(decode=False): the user's tokens and logits are the unwrapped model's; the
    prefill's contrast logits (last position) are the image-free prompt's own; decode steps get None and run
    on the user's rows only (the cache and Qwen's rope deltas cut to them)."""
    from attnkit.hooks.kernel import KernelOptions

    model, inputs = _tiny(family)
    toy = Once()
    batches = []
    attn = get_adapter(model).attention_modules()[0]
    spy = attn.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape), with_kwargs=True)
    try:
        with attnkit.wrap(model, toy, options=KernelOptions(packed_contrast=packed)):
            gen = _generate(model, inputs)
    finally:
        spy.remove()
    ref = _generate(model, inputs)
    assert torch.equal(gen.sequences, ref.sequences)
    for a, b in zip(gen.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    bsz, q = inputs["input_ids"].shape
    free = _image_free(model, inputs)
    width = free["input_ids"].shape[1]
    prefill_shape = (bsz, q + width) if packed else (2 * bsz, q)
    assert tuple(batches[0][:2]) == prefill_shape
    assert all(tuple(s[:2]) == (bsz, 1) for s in batches[1:]), "decode steps carry only the user's rows"
    assert toy.seen[0] is not None and all(s is None for s in toy.seen[1:])
    with torch.no_grad():
        alone = model(**free).logits[:, -1]
    torch.testing.assert_close(toy.seen[0][:, -1], alone, atol=1e-4, rtol=0)


def test_prefill_only_rows_direct_calls():
    """A direct prefill call (no position ids: the padded layout) leaves a cache of the user's rows, so a decode
    step by hand continues the user's sequence as the unwrapped model does; Qwen's stored rope deltas are cut
    to the user's rows too."""
    from attnkit.hooks import compat

    model, inputs = _tiny("llava")
    kw = compat.cache_keyword(model)  # "cache" from transformers 5.24, "past_key_values" before
    with torch.no_grad():
        ref = model(**inputs, use_cache=True)
        nxt = ref.logits[:, -1].argmax(-1, keepdim=True)
        step = dict(input_ids=nxt, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1))
        ref2 = model(**step, **{kw: compat.output_cache(ref)}, use_cache=True).logits
        with attnkit.wrap(model, Once()):
            out = model(**inputs, use_cache=True)
            cache = compat.output_cache(out)
            assert cache.layers[0].keys.shape[0] == inputs["input_ids"].shape[0]
            got2 = model(**step, **{kw: cache}, use_cache=True).logits
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=0)
    torch.testing.assert_close(got2, ref2, atol=2e-5, rtol=0)

    model, inputs = _tiny("qwen2_vl")
    with attnkit.wrap(model, Once()), torch.no_grad():
        model(**inputs, use_cache=True)
        assert model.base_model.rope_deltas.shape[0] == inputs["input_ids"].shape[0]


def test_prefill_only_flag():
    with pytest.raises(errors.MethodArgumentError, match="decode"):
        Contrast("no_image", decode="no")
    assert Contrast("no_image", decode=False) != Contrast("no_image")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip", "idefics3"])
def test_packed_prefill_of_decoding_rows_equals_padded_rows(family):
    """Image-free rows that go on decoding (PAI's CFG) run packed at prefill, then their KV cache is turned into
    rows: generate gives the tokens and the (finite) logits of the padded-rows layout, and the prefill really ran
    packed."""
    from attnkit.hooks import dispatch
    from attnkit.hooks.kernel import KernelOptions
    from attnkit.methods import PAI

    model, inputs = _tiny(family)
    runs = {}
    for packed in (True, False):
        seen = []
        original = dispatch._packed

        def spy(*args, **kwargs):
            seen.append(args[2])
            return original(*args, **kwargs)

        dispatch._packed = spy
        try:
            with attnkit.wrap(model, PAI(alpha=0.5, start_layer=0, cfg_gamma=1.5),
                              options=KernelOptions(packed_contrast=packed)):  # fmt: skip
                runs[packed] = (_generate(model, inputs), len(seen))
        finally:
            dispatch._packed = original
    (a, n_a), (b, n_b) = runs[True], runs[False]
    assert n_a == len(get_adapter(model).attention_modules()) and n_b == 0
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
        torch.testing.assert_close(x[torch.isfinite(x)], y[torch.isfinite(y)], atol=1e-4, rtol=0)
