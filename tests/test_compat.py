"""attnkit on whatever transformers 5.x is installed: decode steps recognised without trusting keyword
names, static caches and torch.compile refused with a clear error, output_attentions honoured,
set_attn_implementation after wrap() detected. The suite runs on the oldest and newest accepted releases
(make test-oldest / make test)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.hooks import compat
from attnkit.methods import ACT, ICD, PAI, VAR, VCD, VHR, FastV, HiPrune, Identity, Method, PyramidDrop, SparseVLM, VisionZip

from .conftest import extend_inputs
from .test_methods_common import SINK_DIM, TAU, plant_sinks
from .test_methods_visionzip import suppressed_argmax

N_NEW = 5


@functools.lru_cache(maxsize=None)
def deep(family: str):
    return testing.tiny_model(family, num_layers=4, seed=2)


def one_row(family: str) -> dict:
    """A single unpadded row with no attention_mask at all (what transformers >= 5.24 passes for it)."""
    inputs = testing.tiny_inputs(family, prompts=["Is there a dog in the image?"], images=testing.sample_images(1))
    assert bool(inputs.pop("attention_mask").all())
    return inputs


#: Every registered method, with settings that act on a tiny 4-layer model: (family, method factory).
#: A newly registered method must be added here (test_every_registered_method_is_covered).
METHODS = {
    "identity": ("llava", lambda: Identity()),
    "var": ("llava", lambda: VAR(p=0.2, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0)),
    "pai": ("qwen2_vl", lambda: PAI(alpha=1.0, start_layer=1)),
    "act": ("gemma3", lambda: ACT(beta=0.2, threshold=0.05, start_layer=1)),
    "fastv": ("llava", lambda: FastV(k=2, r=0.5)),
    "pdrop": ("qwen2_vl", lambda: PyramidDrop(ratio=0.5)),
    "sparsevlm": ("llava", lambda: SparseVLM(budget=128)),
    "visionzip": ("llava", lambda: VisionZip(dominant=3, contextual=2)),
    "hiprune": ("gemma3", lambda: HiPrune(budget=4)),
    "vhr": ("qwen2_vl", lambda: VHR()),
    "vcd": ("llava", lambda: VCD()),
    "icd": ("llava", lambda: ICD(disturbance_ids=[150, 151, 152, 153])),
}
#: Methods whose rewrite applies to the new token at every decode step (the others act at prefill only).
ACTS_AT_DECODE = {"identity", "var", "pai", "act", "vhr"}
#: Methods whose cached generate equals full recomputation (PAI lifts the last row of each forward, so a
#: recomputation lifts other rows; the LLM-side pruning methods rank at prefill and their own tests
#: replay that selection in the recomputation instead).
RECOMPUTABLE = {"identity", "visionzip", "hiprune", "vcd", "icd"}
CALLBACKS = ("scores", "column_stats", "probs", "columns", "reweight", "head_output", "observe")


def test_every_registered_method_is_covered():
    assert set(attnkit.list_methods()) == set(METHODS)


class Counted:
    """Records, per forward, what the manager told the method (begin_forward) and which attention
    callbacks ran at which step, by wrapping the method instance's own callbacks."""

    def __init__(self, method):
        self.forwards: list[tuple[bool, int, int, int]] = []
        self.calls: list[tuple[str, int, bool]] = []
        begin = method.begin_forward

        def begin_forward(ctx):
            self.forwards.append((ctx.is_prefill, ctx.step, ctx.past_len, ctx.q_len))
            begin(ctx)

        method.begin_forward = begin_forward
        for name in CALLBACKS:
            fn = getattr(method, name)
            if fn is not None:
                setattr(method, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(ctx, *args):
            self.calls.append((name, ctx.step, ctx.is_prefill))
            return fn(ctx, *args)

        return counted

    def decode_steps(self) -> set[int]:
        return {step for _, step, prefill in self.calls if not prefill}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_single_unpadded_row_without_mask_decodes_every_step(name):
    """The bug transformers 5.24 exposed: with no attention mask and the cache under a new keyword, each
    decode step was taken for a prefill. Every step must be seen as what it is, and the methods that
    act at decode must run at every step; passing the all-ones mask changes nothing."""
    family, make = METHODS[name]
    model, _ = deep(family)
    inputs = one_row(family)
    hooks = plant_sinks(model)[0] if name == "var" else []
    try:
        method = make()
        counted = Counted(method)
        with torch.no_grad(), attnkit.wrap(model, method) as handle:
            out = model.generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
            prompt = handle.ctx.prompt_len
            masked = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
            again = model.generate(**masked, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(out, again), "an explicit all-ones mask must give the same tokens as none"
    first = counted.forwards[: N_NEW]
    assert first == [(True, 0, 0, prompt)] + [(False, i, prompt + i - 1, 1) for i in range(1, N_NEW)]
    if name in ACTS_AT_DECODE:
        assert counted.decode_steps() == set(range(1, N_NEW)), counted.decode_steps()
    else:
        assert counted.decode_steps() in (set(), set(range(1, N_NEW)))
    if name in RECOMPUTABLE:
        new = out[:, inputs["input_ids"].shape[1] :]
        with torch.no_grad(), attnkit.wrap(model, make()):
            for t in range(N_NEW):
                full = model(**extend_inputs(inputs, new[:, :t]), use_cache=False).logits
                assert torch.equal(suppressed_argmax(model, full[:, -1]), new[:, t]), f"step {t}"


def test_a_cache_attnkit_cannot_find_is_an_error_not_a_silent_prefill(monkeypatch):
    """If a transformers release hid the cache from attnkit, every decode step would look like a prefill;
    the key-length cross-check in every attention call must stop it."""
    model, _ = deep("llava")
    inputs = one_row("llava")
    monkeypatch.setattr(compat, "find_cache", lambda args, kwargs: None)
    with torch.no_grad(), attnkit.wrap(model, PAI(alpha=1.0, start_layer=1)):
        with pytest.raises(errors.TransformersCompatError, match=r"layer 0 attends to \d+ keys.*transformers 5\."):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    # a decode step that carries a 2-D mask: the misreading is caught before any layer runs
    prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), attnkit.wrap(model, PAI(alpha=1.0, start_layer=1)):
        cache = compat.output_cache(model(**inputs, use_cache=True))
        step = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, prompt + 1, dtype=torch.long)}
        with pytest.raises(errors.TransformersCompatError, match="covers 30 tokens for 1 new ones but attnkit finds no"):
            model(**step, **{compat.cache_keyword(model): cache})


def test_forward_without_its_pre_hook_is_an_error():
    """Calling model.forward directly skips the hook that reads each forward: refused, even when the
    context left by the last forward happens to describe the same prompt."""
    model, _ = deep("llava")
    inputs = testing.tiny_inputs("llava")
    with torch.no_grad(), attnkit.wrap(model, Identity()):
        ref = model(**inputs).logits
        with pytest.raises(errors.TransformersCompatError, match="layer 0 attended twice in one forward"):
            model.forward(**inputs)
        assert torch.equal(model(**inputs).logits, ref)  # a normal call works again


def test_read_forward_errors():
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(errors.UnsupportedCacheError, match="precomputed attention mask \\(dict"):
        compat.read_forward((), {"input_ids": ids, "attention_mask": {"full_attention": torch.ones(1)}})
    with pytest.raises(errors.TransformersCompatError, match="covers 8 tokens for 5 new ones"):
        compat.read_forward((), {"input_ids": ids, "attention_mask": torch.ones(2, 8)})
    with pytest.raises(errors.TransformersCompatError, match="neither input_ids nor inputs_embeds"):
        compat.read_forward((), {"pixel_values": torch.ones(2, 3)})
    seen = compat.read_forward((ids,), {"attention_mask": torch.ones(2, 5)})
    assert seen.input_ids is ids and (seen.q_len, seen.cache_len, seen.batch) == (5, 0, 2)
    assert compat.read_forward((), {"input_ids": ids, "attention_mask": torch.ones(2, 1, 5, 5)}).attention_mask is None


# -- static cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
def test_static_cache(family):
    """No method: the static cache runs as unwrapped. With a method (which would read the cache's unused
    slots as keys): a one-line attnkit error that says to use the dynamic cache."""
    model, _ = deep(family)
    inputs = one_row(family)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        with attnkit.wrap(model, []):
            assert torch.equal(model.generate(**inputs, **kw), ref)
        for method in (Identity(), ACT(beta=0.2, threshold=0.05, start_layer=1)):
            with attnkit.wrap(model, method):
                with pytest.raises(errors.AttnkitError, match="dynamic cache") as e:
                    model.generate(**inputs, **kw)
                assert "\n" not in str(e.value)
                # the default cache still works afterwards
                model.generate(**inputs, max_new_tokens=2, do_sample=False)


# -- torch.compile -----------------------------------------------------------------------------------
def test_compiled_forward_with_static_cache():
    model, _ = deep("llava")
    ids = one_row("llava")["input_ids"][:, -6:]  # text only: the compiled graph stays small
    from transformers import StaticCache

    def run():
        torch._dynamo.reset()
        cache = StaticCache(config=model.config, max_cache_len=16)
        fn = torch.compile(model.forward, fullgraph=True, backend="eager")
        return fn(input_ids=ids, **{compat.cache_keyword(model): cache}, use_cache=True).logits

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with attnkit.wrap(model, []):
            torch.testing.assert_close(run(), ref, atol=1e-5, rtol=0)
        with attnkit.wrap(model, Identity()):
            with pytest.raises(Exception, match="attnkit's methods cannot run inside torch.compile"):
                run()
    torch._dynamo.reset()


# -- output_attentions -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_output_attentions_by_argument(family):
    """Every layer's weights, as eager attention gives them, with no method and with one; a method that
    works on some rows only still returns every row; the contrast rows of PAI's CFG are not returned."""
    model, inputs = deep(family)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    assert len(ref) == 4 and all(a is not None for a in ref)
    keep = inputs["attention_mask"].bool()
    neutral = [
        [],
        Identity(),
        VAR(p=1.0, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0),
        FastV(k=2, r=0.0, mode="mask"),
        PAI(alpha=0.0, start_layer=1, cfg_gamma=1.0),
    ]
    real_rows = keep[:, None, :, None]  # a padding query row sees no key: eager gives it a uniform row, attnkit 0
    for method in neutral:
        with torch.no_grad(), attnkit.wrap(model, method):
            got = model(**inputs, output_attentions=True).attentions
        assert len(got) == 4, method
        for a, r in zip(got, ref):
            assert a is not None and a.shape == r.shape, method
            torch.testing.assert_close(a * real_rows, r * real_rows, atol=1e-5, rtol=0)


def test_output_attentions_by_config_and_in_generate():
    """output_attentions set in the language config (how transformers allows it: with eager attention,
    e.g. from_pretrained(..., output_attentions=True)) returns weights from a wrapped model too, and
    generate(output_attentions=True) returns them at every step."""
    model, inputs = deep("llava")
    model.set_attn_implementation("eager")
    text = model.config.get_text_config()
    text.output_attentions = True
    try:
        with torch.no_grad():
            ref = model(**inputs).attentions
            for method in ([], Identity()):
                with attnkit.wrap(model, method):
                    got = model(**inputs).attentions
                    assert len(got) == 4 and all(a is not None for a in got)
                    real_rows = inputs["attention_mask"].bool()[:, None, :, None]  # padding rows: see above
                    for a, r in zip(got, ref):
                        torch.testing.assert_close(a * real_rows, r * real_rows, atol=1e-5, rtol=0)
    finally:
        text.output_attentions = False
        model.set_attn_implementation("sdpa")
    with torch.no_grad(), attnkit.wrap(model, []):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    assert len(out.attentions) == 3
    for step, layers in enumerate(out.attentions):
        assert len(layers) == 4 and all(a is not None and a.shape[2] == (inputs["input_ids"].shape[1] if step == 0 else 1) for a in layers)


# -- set_attn_implementation while wrapped ----------------------------------------------------------
def test_set_attn_implementation_while_wrapped_is_detected():
    model, inputs = deep("llava")
    handle = attnkit.wrap(model, Identity())
    try:
        assert handle.active and not handle.bypassed
        model.set_attn_implementation("eager")
        assert handle.bypassed and not handle.active and "bypassed" in repr(handle)
        with pytest.raises(errors.BypassedError, match="changed to 'eager' after attnkit.wrap"), torch.no_grad():
            model(**inputs)
    finally:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            handle.remove()
    assert any("keeps that later choice" in str(w.message) for w in caught)
    assert model.config.get_text_config()._attn_implementation == "eager", "remove() keeps the user's later choice"
    model.set_attn_implementation("sdpa")
    # an unchanged model is restored as before, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with attnkit.wrap(model, Identity()):
            pass
    assert model.config.get_text_config()._attn_implementation == "sdpa"


# -- generation modes that passed wrapped as unwrapped: keep them so --------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_generation_modes_with_a_method_equal_unwrapped(family):
    """Beam search and prompt-lookup (assisted) decoding give, wrapped with identity (eager path on every layer), what the unwrapped model gives."""
    model, inputs = deep(family)
    one = one_row(family)  # assisted decoding takes one row
    modes = [(inputs, dict(num_beams=2)), (one, dict(prompt_lookup_num_tokens=2))]
    with torch.no_grad():
        refs = [model.generate(**x, max_new_tokens=4, do_sample=False, **kw) for x, kw in modes]
        with attnkit.wrap(model, Identity()):
            for (x, kw), ref in zip(modes, refs):
                assert torch.equal(model.generate(**x, max_new_tokens=4, do_sample=False, **kw), ref), kw


def test_continuing_from_a_cache_with_several_new_tokens():
    """A prompt's last 3 tokens fed as a second forward over the cache of the first part: a decode step
    of 3 rows, the same last logits as the whole prompt at once."""
    model, _ = deep("llava")
    one = one_row("llava")
    ids = one["input_ids"]
    head = dict(one, input_ids=ids[:, :-3])
    with torch.no_grad():
        ref = model(**one).logits[:, -1]
        with attnkit.wrap(model, Identity()) as handle:
            cache = compat.output_cache(model(**head, use_cache=True))
            tail = model(input_ids=ids[:, -3:], **{compat.cache_keyword(model): cache}).logits[:, -1]
            assert not handle.ctx.is_prefill and handle.ctx.past_len == ids.shape[1] - 3 and handle.ctx.q_len == 3
    torch.testing.assert_close(tail, ref, atol=1e-5, rtol=0)


def test_prompt_lookup_with_output_attentions_wrapped():
    """transformers' assisted decoding reads outputs.attentions[0] when attentions are asked for: a wrapped
    model must return them (it returned empty tuples before)."""
    model, _ = deep("llava")
    inputs = one_row("llava")
    model.set_attn_implementation("eager")
    kw = dict(max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2, output_attentions=True,
              return_dict_in_generate=True)
    try:
        with torch.no_grad():
            ref = model.generate(**inputs, **kw)
            with attnkit.wrap(model, []):
                got = model.generate(**inputs, **kw)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.attentions) == len(ref.attentions)
    assert all(a is not None for step in got.attentions for a in step)


class ImageLift(Method):
    """Test double: every row's scores on the image columns lifted by 1 (indexed as the context says)."""

    name = "image_lift_double"

    def scores(self, ctx, scores):
        image = ctx.image_mask_kv()[:, None, None, : scores.shape[-1]].to(scores.dtype)
        return scores + image


def test_sliding_window_layer_past_its_window():
    """Gemma3's sliding layers keep only the last 32 keys in the cache (the tiny prompt has 39 tokens):
    a decode step must rewrite the columns of the positions the context names, so that a method acting on
    every row gives the logits a full recomputation gives (it lifted the wrong keys before)."""
    model, _ = deep("gemma3")
    inputs = testing.tiny_inputs("gemma3")
    assert inputs["input_ids"].shape[1] > model.config.get_text_config().sliding_window
    new = torch.tensor([[7], [9]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    whole = extend_inputs(inputs, new)
    for method in (Identity(), ImageLift()):
        with torch.no_grad(), attnkit.wrap(model, method) as handle:
            cache = compat.output_cache(model(**inputs, use_cache=True))
            step = model(input_ids=new, attention_mask=mask, **{compat.cache_keyword(model): cache}).logits[:, -1]
            assert not handle.ctx.is_prefill
            full = model(**whole, use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
