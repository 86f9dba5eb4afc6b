"""Hook manager contract: routing, callbacks, row selection, pruning selection point, logits,
isolation between handles, exception safety and user errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.hooks import dispatch
from attnkit.methods import Method, MethodConfig, check_range
from attnkit.models import get_adapter

from .conftest import _tiny, greedy, logits, valid_positions


def _llava():
    return _tiny("llava")


class Observer(Method):
    """Test double: records the probabilities of chosen layers (read-only)."""

    name = "observer_double"

    def __init__(self, only_layers=None, last_row=False):
        super().__init__()
        self.only_layers, self.last_row = only_layers, last_row
        self.seen: dict[int, list[torch.Tensor]] = {}

    def layers(self, ctx):
        return self.only_layers

    def rows(self, ctx):
        return torch.tensor([ctx.q_len - 1]) if self.last_row else None

    def observe(self, ctx, probs):
        layer = ctx.layer
        self.seen.setdefault(layer, []).append(probs.detach().clone())


def test_observe_sees_only_requested_layers_and_rows():
    model, inputs = _llava()
    ref = logits(model, inputs)
    obs = Observer(only_layers={1}, last_row=True)
    with attnkit.wrap(model, obs) as h:
        assert h.methods_for_layer(0) == [] and h.methods_for_layer(1) == [obs]
        got = logits(model, inputs)
    assert list(obs.seen) == [1]
    probs = obs.seen[1][0]
    b, s = inputs["input_ids"].shape
    assert probs.shape == (b, h.ctx.num_heads, 1, s)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h.ctx.num_heads, 1))
    keep = valid_positions(inputs)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)


class LastRowBoost(Method):
    """Test double: adds +3 to the last row's pre-softmax score of column 0 at every layer."""

    name = "lastrowboost_double"

    def rows(self, ctx):
        return torch.tensor([ctx.q_len - 1])

    def scores(self, ctx, scores):
        scores = scores.clone()
        scores[..., -1, 0] += 3.0  # the last row whether or not other methods asked for all rows
        return scores


def test_row_subset_changes_only_that_row():
    model, inputs = _llava()
    ref_hidden = _last_hidden(model, inputs)
    with attnkit.wrap(model, LastRowBoost()):
        got_hidden = _last_hidden(model, inputs)
    keep = valid_positions(inputs)
    keep_but_last = keep.clone()
    keep_but_last[:, -1] = False
    torch.testing.assert_close(got_hidden[keep_but_last], ref_hidden[keep_but_last], atol=1e-5, rtol=0)
    assert (got_hidden[:, -1] - ref_hidden[:, -1]).abs().max() > 1e-2


def _last_hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


class Order(Method):
    """Test double: appends its tag when its probs callback runs; optionally scales probs."""

    name = "order_double"

    def __init__(self, tag, log, scale=1.0):
        super().__init__()
        self.tag, self.log, self.scale = tag, log, scale

    def layers(self, ctx):
        return {0}

    def probs(self, ctx, probs):
        self.log.append((self.tag, float(probs.sum())))
        return probs * self.scale


def test_methods_compose_in_list_order():
    model, inputs = _llava()
    log: list = []
    with attnkit.wrap(model, [Order("a", log, scale=2.0), Order("b", log)]):
        logits(model, inputs)
    assert [t for t, _ in log] == ["a", "b"]
    assert log[1][1] == pytest.approx(2 * log[0][1], rel=1e-4), "b must see a's rewrite"


class KeepDouble(Method):
    """Test double for the pruning selection point: at layer ``at`` keep all but ``drop`` positions."""

    name = "keep_double"

    def __init__(self, at, drop):
        super().__init__()
        self.at, self.drop, self.hidden_shapes = at, drop, []

    def select(self, ctx, hidden):
        layer = ctx.layer
        if layer != self.at or not ctx.is_prefill:
            return None
        self.hidden_shapes.append(tuple(hidden.shape))
        keep = torch.ones(ctx.batch_size, ctx.kv_len, dtype=torch.bool)
        keep[:, self.drop] = False
        return keep


def test_select_at_layer0_equals_masking_those_keys():
    """Mask-mode pruning from layer 0 must equal the unwrapped model with those keys padded out."""
    model, inputs = _llava()
    img = inputs["input_ids"][0] == model.config.image_token_id
    drop = img.nonzero().flatten()[::2]  # every other image token of row 0's layout
    masked = dict(inputs)
    masked["attention_mask"] = inputs["attention_mask"].clone()
    masked["attention_mask"][:, drop] = 0
    ref = logits(model, masked)
    double = KeepDouble(at=0, drop=drop)
    with attnkit.wrap(model, double):
        got = logits(model, inputs)
    assert double.hidden_shapes == [(*inputs["input_ids"].shape, model.config.text_config.hidden_size)]
    keep = valid_positions(masked)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)


def test_select_keep_all_is_identity_and_later_layers_only():
    model, inputs = _llava()
    ref = logits(model, inputs)
    with attnkit.wrap(model, KeepDouble(at=1, drop=[])):
        got = logits(model, inputs)
    keep = valid_positions(inputs)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-6, rtol=0)
    img = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()[:4]
    obs = Observer()
    with attnkit.wrap(model, [KeepDouble(at=1, drop=img), obs]):
        logits(model, inputs)
    assert obs.seen[0][0][..., img].abs().sum() > 0, "layer 0 is before the selection"
    assert obs.seen[1][0][..., img].abs().sum() == 0, "dropped keys get no attention from layer 1 on"


class Bias(Method):
    """Test double for the logits callback: +5 on one token id."""

    name = "bias_double"

    def logits(self, ctx, logits):
        logits = logits.clone()
        logits[..., 7] += 5.0
        return logits


def test_logits_callback():
    model, inputs = _llava()
    ref = logits(model, inputs)
    with attnkit.wrap(model, Bias()) as h:
        assert h.methods_for_layer(0) == [], "a logits-only method keeps fused attention"
        got = logits(model, inputs)
    diff = got - ref
    torch.testing.assert_close(diff[..., 7], torch.full_like(diff[..., 7], 5.0), atol=1e-5, rtol=0)
    assert diff[..., :7].abs().max() < 1e-6


def test_two_models_do_not_see_each_other():
    model_a, inputs_a = _tiny("llava")
    model_b, inputs_b = _tiny("qwen2_vl")
    ref_a, ref_b = logits(model_a, inputs_a), logits(model_b, inputs_b)
    obs_a, obs_b = Observer(), Observer()
    with attnkit.wrap(model_a, [obs_a, LastRowBoost()]), attnkit.wrap(model_b, obs_b):
        got_b = logits(model_b, inputs_b)
        assert obs_a.seen == {}
        got_a = logits(model_a, inputs_a)
        assert len(obs_b.seen[0]) == 1, "model A's forward reached model B's method"
    keep_b = valid_positions(inputs_b)
    torch.testing.assert_close(got_b[keep_b], ref_b[keep_b], atol=1e-5, rtol=0)
    assert (got_a - ref_a).abs().max() > 1e-3


def test_exception_inside_with_unwraps(tiny):
    model, inputs = tiny
    impl = model.config.get_text_config()._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with attnkit.wrap(model, "identity"):
            greedy(model, inputs, n=2)
            raise RuntimeError("boom")
    assert model.config.get_text_config()._attn_implementation == impl
    assert not any(dispatch.HANDLE_ATTR in m.__dict__ for m in model.modules())
    with attnkit.wrap(model, "identity"):  # can be wrapped again
        pass


class Explode(Method):
    name = "explode_double"

    def begin_forward(self, ctx):
        if not ctx.is_prefill:
            raise RuntimeError("mid-generate failure")


def test_exception_escaping_generate_unwraps():
    model, inputs = _llava()
    with pytest.raises(RuntimeError, match="mid-generate"):
        with attnkit.wrap(model, Explode()):
            greedy(model, inputs, n=3)
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not any(dispatch.HANDLE_ATTR in m.__dict__ for m in model.modules())
    assert not any(getattr(h, "__self__", None).__class__.__name__ == "Handle"
                   for h in model._forward_pre_hooks.values())


def test_wrapping_twice_raises():
    model, _ = _llava()
    with attnkit.wrap(model, []):
        with pytest.raises(errors.AlreadyWrappedError, match="already wrapped"):
            attnkit.wrap(model, "identity")


def test_empty_wrap_adds_one_forward_pre_hook():
    """With no method, wrap() adds one pre-hook on the model (it checks that the attention still routes
    through attnkit and notes output_attentions), no per-layer hook, and changes no output."""
    model, inputs = _llava()
    ref = logits(model, inputs)
    counts = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    with attnkit.wrap(model, []) as h:
        now = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        top = list(model.modules()).index(h.adapter.context_module())
        assert now[top] == (counts[top][0] + 1, counts[top][1])
        assert now[:top] + now[top + 1 :] == counts[:top] + counts[top + 1 :]
        assert all(h.methods_for_layer(i) == [] for i in range(h.ctx.num_layers))
        assert torch.equal(logits(model, inputs), ref)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == counts


def test_unsupported_model_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2))
    with pytest.raises(errors.UnsupportedModelError) as e:
        attnkit.wrap(lm, "identity")
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "llava" in msg and "qwen2_vl" in msg and "\n" not in msg


def test_bad_method_name_and_kwargs():
    model, _ = _llava()
    with pytest.raises(errors.UnknownMethodError, match=r"unknown method 'nope' \(valid: .*identity"):
        attnkit.wrap(model, "nope")
    with pytest.raises(errors.MethodArgumentError, match=r"identity: unknown argument 'p'"):
        attnkit.wrap(model, "identity", p=0.5)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@dataclasses.dataclass
class ScaleConfig(MethodConfig):
    alpha: float = 0.5

    def validate(self):
        check_range("scale_double", "alpha", self.alpha, 0.0, 1.0)


class Scale(Method):
    name = "scale_double"
    Config = ScaleConfig


def test_config_validation_and_entry_points(monkeypatch):
    from attnkit.methods import registry

    with pytest.raises(errors.MethodArgumentError, match=r"scale_double: alpha=2 is out of range \[0.0, 1.0\]"):
        Scale(alpha=2)

    class EP:
        def load(self):
            return Scale

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # restored after the test
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry, "entry_points", lambda group: [EP()] if group == "attnkit.methods" else [])
    assert "scale_double" not in registry._REGISTRY
    assert "scale_double" in attnkit.list_methods()
    m = attnkit.make_method("scale_double", alpha=0.25)
    assert isinstance(m, Scale) and m.config.alpha == 0.25
    assert isinstance(attnkit.make_method(ScaleConfig(alpha=0.1)), Scale)


def test_registry_lists_identity_and_families():
    assert "identity" in attnkit.list_methods()
    assert attnkit.list_models() == list(testing.FAMILIES)


def test_sliding_window_kwargs_reach_the_attention_function(monkeypatch):
    """Gemma3's sliding-window layers pass `sliding_window` through to the attention function."""
    model, inputs = _tiny("gemma3")
    seen = []
    original = dispatch._run

    def spy(handle, roles, module, layer, q, k, v, mask, *args, **kwargs):
        seen.append((layer, kwargs.get("sliding_window")))
        return original(handle, roles, module, layer, q, k, v, mask, *args, **kwargs)

    monkeypatch.setattr(dispatch, "_run", spy)
    with attnkit.wrap(model, "identity"):
        logits(model, inputs)
    assert any(sw is not None for _, sw in seen), seen


def test_model_that_ignores_set_attn_implementation(monkeypatch):
    """If transformers does not route the LM through AttentionInterface, wrap() refuses and cleans up."""
    model, _ = _llava()
    monkeypatch.setattr(model, "set_attn_implementation", lambda *a, **k: None)
    with pytest.raises(errors.UnsupportedModelError, match="set_attn_implementation had no effect"):
        attnkit.wrap(model, "identity")
    assert not any(dispatch.HANDLE_ATTR in m.__dict__ for m in model.modules())
    monkeypatch.undo()
    with attnkit.wrap(model, "identity"):
        pass


class ZeroHead(Method):
    """Test double for head_output: silence one head of one layer before o_proj."""

    name = "zerohead_double"

    def layers(self, ctx):
        return {1}

    def head_output(self, ctx, out):
        out = out.clone()
        out[:, :, 0] = 0.0
        return out


def test_head_output_is_per_head_before_o_proj():
    model, inputs = _llava()
    attn = get_adapter(model).attention_modules()[1]
    head_dim = model.config.text_config.head_dim

    def zero_first_head(module, args):
        x = args[0].clone()
        x[..., :head_dim] = 0.0
        return (x,)

    h = attn.o_proj.register_forward_pre_hook(zero_first_head)
    try:
        ref = logits(model, inputs)
    finally:
        h.remove()
    with attnkit.wrap(model, ZeroHead()):
        got = logits(model, inputs)
    keep = valid_positions(inputs)
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=0)


def test_pruning_keep_mask_survives_kv_cached_decoding():
    """A keep mask chosen at prefill hides the same keys at every decode step: cached == recomputed."""
    model, inputs = _llava()
    img = (inputs["input_ids"][1] == model.config.image_token_id).nonzero().flatten()[1::3]
    n = 4
    with attnkit.wrap(model, KeepDouble(at=1, drop=img)), torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
        tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
        for t in range(n):
            ext = dict(inputs)
            ext["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, :t]], 1)
            ext["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :t])], 1)
            full = model(**ext).logits[:, -1]
            torch.testing.assert_close(full, gen.logits[t], atol=1e-4, rtol=0)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits[:, -1], gen.logits[0], atol=1e-3), "drop had no effect"


def test_contract_refuses_a_role_with_the_old_signature():
    """A role written for the old contract (ctx, layer, tensor) fails at class creation with a clear message,
    not deep inside a forward; the column form needs both halves and excludes probs."""
    from attnkit.methods import Method

    with pytest.raises(TypeError, match=r"Old.probs must take \(view, probs\): the layer is view.layer"):
        type("Old", (Method,), {"probs": lambda self, ctx, layer, probs: probs})
    with pytest.raises(TypeError, match="needs both columns"):
        type("Half", (Method,), {"columns": lambda self, view: None})
    with pytest.raises(TypeError, match="not both"):
        type("Both", (Method,), {"columns": lambda self, view: None, "reweight": lambda self, view, p, c: (1, p),
                                 "probs": lambda self, view, probs: probs})
    ok = type("Ok", (Method,), {"logits": lambda self, view, logits, contrast=None: logits})
    assert ok.roles() == frozenset({"logits"})


def test_view_row_index():
    """View.row_index: where a forward row sits in a block's tensor (the observers' 'answering row')."""
    from attnkit.hooks.context import ForwardState, View

    state = ForwardState(num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1, q_len=8)
    state.begin()
    block = View(state, 0).at(torch.tensor([3, 5, 7]))
    assert block.row_index(7) == 2 and block.row_index(5) == 1 and block.row_index(4) is None
    assert View(state, 0).at(None).row_index(7) == 7
