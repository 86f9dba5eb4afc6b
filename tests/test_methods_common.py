"""VAR, PAI and ACT together: zero strength equals the unwrapped model and batches equal rows alone where
the common suite (test_common.py) does not already check it, argument errors, registry, composition.
Per-method tests live in test_methods_{var,pai,act}.py."""

from __future__ import annotations

import functools

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import ACT, PAI, VAR, Method
from attnkit.hooks.compat import find_cache
from attnkit.models import get_adapter

from .conftest import greedy, logits, valid_positions

#: Families for the model-level tests: LLaMA (llava), mRoPE Qwen, InstructBLIP (embeddings-only
#: prefill), Gemma3 (bidirectional image block, sliding window). All tiny LMs use GQA (4 heads / 2 KV).
FAMILIES = ("llava", "qwen2_vl", "instructblip", "gemma3")

#: Natural |RMSNorm(h)| of the tiny models stays below 4 (hidden 32); planted sinks reach ~5.6.
TAU = 4.5
SINK_DIM = 5


@functools.lru_cache(maxsize=None)
def deep(family: str):
    """A 4-layer tiny model (so that layer ranges leave layers out on both sides) and its batch."""
    return testing.tiny_model(family, seed=0, num_layers=4)


def plant_sinks(model, dim: int = SINK_DIM, value: float = 1000.0, image_every: int = 3):
    """Plant massive activations: forward pre-hooks add ``value`` in ``dim`` of every decoder layer's input
    at the first real token and every ``image_every``-th image token of each row, at prefill (positions
    read from whatever batch the model gets). Returns (hooks, planted) with ``planted["mask"]`` the
    (B, S) positions of the last prefill."""
    adapter = get_adapter(model)
    planted: dict[str, torch.Tensor] = {}

    def on_prefill(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        past = find_cache(args, kwargs)
        if past is not None and past.get_seq_length() > 0:
            planted.pop("mask", None)
            return None  # a decode step
        mask = kwargs.get("attention_mask")
        mask = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        image = adapter.image_mask(ids) if ids is not None else adapter.image_mask_from_layout(mask, *mask.shape)
        where = torch.zeros_like(mask)
        for b in range(mask.shape[0]):
            where[b, int(mask[b].float().argmax())] = True
            where[b, (image[b] & mask[b]).nonzero().flatten()[::image_every]] = True
        planted["mask"] = where & mask
        return None

    def plant(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        where = planted.get("mask")
        if where is None or hidden.shape[:2] != where.shape:
            return None
        hidden = hidden.clone()
        hidden[..., dim] = hidden[..., dim] + value * where.to(hidden.dtype)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    hooks = [adapter.context_module().register_forward_pre_hook(on_prefill, with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(plant, with_kwargs=True) for layer in adapter.decoder_layers()]
    return hooks, planted


class Recorder(Method):
    """Test double, first in the method list: pre-method scores (its ``scores`` runs first), pre-rewrite
    probabilities (``collect``) and final probabilities (``observe``) of every row of every layer."""

    name = "recorder_double"

    def __init__(self):
        super().__init__()
        self.pre_scores: dict[int, torch.Tensor] = {}
        self.pre: dict[int, torch.Tensor] = {}
        self.post: dict[int, torch.Tensor] = {}

    def begin_forward(self, ctx):
        self.pre_scores, self.pre, self.post = {}, {}, {}

    def _keep(self, store, layer, ctx, x):
        full = x.new_zeros(*x.shape[:3], ctx.kv_len)
        full[..., : x.shape[-1]] = x
        store.setdefault(layer, []).append((ctx.rows.clone(), full))

    def scores(self, ctx, scores):
        layer = ctx.layer
        self._keep(self.pre_scores, layer, ctx, scores.detach().clone())
        return scores

    def probs(self, ctx, probs):  # first in the list: the probabilities before any rewrite
        layer = ctx.layer
        seen = probs if ctx.visible is None else probs.masked_fill(~ctx.visible.any(-1, keepdim=True), 0.0)
        self._keep(self.pre, layer, ctx, seen.detach().clone())  # rows that see no key as the kernel leaves them
        return probs

    def observe(self, ctx, probs):
        layer = ctx.layer
        self._keep(self.post, layer, ctx, probs.detach().clone())

    @staticmethod
    def assemble(store, layer):
        """(B, H, q, K) assembled from the blocks (each recorded once: a statistics pass may re-run scores)."""
        parts = {}
        for rows, x in store[layer]:
            for i, r in enumerate(rows.tolist()):
                parts[r] = x[:, :, i]
        return torch.stack([parts[r] for r in sorted(parts)], dim=2)


# -- zero strength ----------------------------------------------------------------------------------
ZERO = {
    "var": dict(p=1.0, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0),
}
STRONG = {
    "var": dict(p=0.2, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["var"])  # PAI and ACT: test_common.py (neutral) on the same families
def test_zero_strength_equals_unwrapped(family, method):
    model, inputs = deep(family)
    hooks, _ = plant_sinks(model)  # VAR must find sinks and still change nothing at p=1
    try:
        ref, ref_tokens = logits(model, inputs), greedy(model, inputs, n=6)
        with attnkit.wrap(model, method, **ZERO[method]) as h:
            got = logits(model, inputs)
            assert any(h.methods_for_layer(i) for i in range(4)), "the method must take the eager path"
            got_tokens = greedy(model, inputs, n=6)
            if method == "var":
                assert any(any(row) for row in h.methods[0].sink_report()["sinks"].values())
        with attnkit.wrap(model, method, **STRONG[method]):
            strong = logits(model, inputs)
    finally:
        for hk in hooks:
            hk.remove()
    keep = valid_positions(inputs)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)
    assert torch.equal(got_tokens, ref_tokens)
    assert (strong[keep] - ref[keep]).abs().max() > 1e-3, "the non-zero strength must change the model"


# -- batch == rows alone ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "family,spec",
    [
        ("llava", VAR(p=0.1, tau=TAU, start_layer=0, skip_last=0, summ=0.0, rho=1.0)),  # dims from the input rule
        # PAI on qwen2_vl and ACT on instructblip with these settings: test_common.py (batch_equals_rows)
        ("qwen2_5_vl", ACT(beta=0.3, threshold=0.05, start_layer=0)),
        ("qwen3_vl", VAR(p=0.1, tau=TAU, sink_dims=[SINK_DIM], start_layer=0, skip_last=0, summ=0.0, rho=1.0)),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_batch_rows_equal_rows_alone(family, spec):
    model, _ = testing.tiny_model(family)
    prompts = ["Is there a dog in the image?", "Please describe this image in detail and answer yes or no."]
    images = testing.sample_images(2)
    batch = testing.tiny_inputs(family, prompts=prompts, images=images)
    assert (batch["attention_mask"] == 0).any()
    hooks, _ = plant_sinks(model) if isinstance(spec, VAR) else ([], None)
    try:
        with attnkit.wrap(model, []):
            plain = greedy(model, batch)
        with attnkit.wrap(model, spec):
            got = greedy(model, batch)
            for r in range(2):
                alone = testing.tiny_inputs(family, prompts=[prompts[r]], images=[images[r]])
                assert torch.equal(greedy(model, alone)[0], got[r]), f"row {r} differs when batched"
    finally:
        for hk in hooks:
            hk.remove()
    assert not torch.equal(plain, got), "the method must change the greedy output"


# -- composition -------------------------------------------------------------------------------------
def test_var_and_pai_compose():
    model, inputs = deep("llava")
    hooks, _ = plant_sinks(model)
    var_kw = dict(p=0.2, tau=TAU, sink_dims=[SINK_DIM], start_layer=1, skip_last=0, summ=0.0, rho=1.0)
    try:
        ref = logits(model, inputs)
        with attnkit.wrap(model, VAR(**var_kw)):
            only_var = logits(model, inputs)
        with attnkit.wrap(model, PAI(alpha=1.0, start_layer=1)):
            only_pai = logits(model, inputs)
        with attnkit.wrap(model, [VAR(**var_kw), PAI(alpha=1.0, start_layer=1)]) as h:
            both = logits(model, inputs)
            assert [type(m) for m in h.methods_for_layer(2)] == [VAR, PAI]
    finally:
        for hk in hooks:
            hk.remove()
    last = both[:, -1]
    for other in (ref, only_var, only_pai):
        assert (last - other[:, -1]).abs().max() > 1e-3
    assert torch.isfinite(both).all()


# -- errors and registry -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("var", dict(p=1.5), r"var: p=1.5 is out of range \[0.0, 1.0\]"),
        ("var", dict(rho=-0.1), r"var: rho=-0.1 is out of range \[0.0, 1.0\]"),
        ("var", dict(summ=2), r"var: summ=2 is out of range \[0.0, 1.0\]"),
        ("var", dict(tau=-1), r"var: tau=-1 is out of range \[0.0, inf\]"),
        ("var", dict(start_layer=1.5), r"var: start_layer=1.5 must be an integer"),
        ("var", dict(skip_last=-1), r"var: skip_last=-1 is out of range \[0, inf\]"),
        ("var", dict(sink_dims=[]), r"var: sink_dims=\[\] must name at least one dimension"),
        ("var", dict(sink_dims=[3, -2]), r"var: sink_dims=-2 is out of range \[0, inf\]"),
        ("var", dict(sink_dims="12"), r"var: sink_dims='12' must be a list"),
        ("pai", dict(alpha=-0.2), r"pai: alpha=-0.2 is out of range \[0.0, inf\]"),
        ("pai", dict(start_layer=4, end_layer=3), r"pai: end_layer=3 is out of range \[5, inf\]"),
        ("pai", dict(cfg_gamma="1.1"), r"pai: cfg_gamma='1.1' must be a number"),
        ("act", dict(beta=1.2), r"act: beta=1.2 is out of range \[0.0, 1.0\]"),
        ("act", dict(threshold=-0.5), r"act: threshold=-0.5 is out of range \[0.0, 1.0\]"),
        ("act", dict(heads=[1, 2]), r"act: heads must be a dict"),
        ("act", dict(heads={2: [0, "x"]}), r"act: heads\[2\]='x' must be an integer"),
        ("act", dict(heads={-1: [0]}), r"act: heads layer=-1 is out of range \[0, inf\]"),
        ("act", dict(skip_last=-1), r"act: skip_last=-1 is out of range \[0, inf\]"),
        ("act", dict(spare="first"), r"act: spare='first' must be one of first_token, first_sink"),
    ],
)
def test_argument_errors(name, kwargs, pattern):
    with pytest.raises(errors.MethodArgumentError, match=pattern) as e:
        attnkit.make_method(name, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("var", dict(start_layer=1, skip_last=1), r"var: start_layer=1, skip_last=1 leave no layer of this 2-layer model"),
        ("var", dict(start_layer=0, sink_dims=[40]), r"var: sink_dims entry 40 is out of range \[0, 31\]"),
        ("pai", dict(), r"pai: start_layer=2 is out of range \[0, 1\] for this 2-layer model"),
        ("pai", dict(start_layer=0, end_layer=3), r"pai: end_layer=3 is out of range \[1, 2\]"),
        ("act", dict(), r"act: start_layer=2, skip_last=1 leave no layer of this 2-layer model"),
        ("act", dict(start_layer=1), r"act: start_layer=1, skip_last=1 leave no layer of this 2-layer model"),
        ("act", dict(heads={1: [4]}), r"act: heads\[1\] entry 4 is out of range \[0, 3\]"),
        ("act", dict(heads={2: [0]}), r"act: heads layer 2 is out of range \[0, 1\]"),
    ],
)
def test_errors_that_need_the_model(name, kwargs, pattern):
    model, _ = testing.tiny_model("llava")  # 2 layers, 4 heads, hidden 32
    with pytest.raises(errors.MethodArgumentError, match=pattern):
        attnkit.wrap(model, name, **kwargs)
    assert model.config.get_text_config()._attn_implementation == "sdpa", "a failed wrap leaves the model alone"
    assert not model._forward_pre_hooks


def test_registry_and_defaults():
    assert {"var", "pai", "act"} <= set(attnkit.list_methods())
    assert VAR().config.to_dict() == dict(p=0.6, tau=20.0, rho=0.5, summ=0.2, start_layer=2, skip_last=1, sink_dims=None)
    assert PAI().config.to_dict() == dict(alpha=0.2, start_layer=2, end_layer=None, cfg_gamma=None)
    assert ACT().config.to_dict() == dict(
        beta=0.4, threshold=0.1, start_layer=2, skip_last=1, heads=None, spare="first_token"
    )
    assert isinstance(attnkit.make_method(attnkit.methods.PAIConfig(alpha=0.3)), PAI)
    for cls in (VAR, PAI, ACT):
        assert "Defaults" in cls.__doc__ and ("ICLR" in cls.__doc__ or "ECCV" in cls.__doc__ or "ICML" in cls.__doc__)
