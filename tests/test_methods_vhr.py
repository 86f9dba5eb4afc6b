"""VHR (methods/vhr.py): neutral at alpha=1 on every family, only the chosen heads change, the VHD it measures
equals a direct computation (layer by layer, with the earlier layers' reinforcement), the selection is fixed
for the whole generation, cached == recomputed with a fixed head set, the fused head-output path and the
packed prefill equal their references, and the errors are one line."""

from __future__ import annotations

import json

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.hooks.kernel import KernelOptions
from attnkit.methods import VHR
from attnkit.models import get_adapter

from .conftest import _tiny

N = 4  # new tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def _greedy(model, inputs, n=N):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


def _capture_o_proj(model):
    """Forward pre-hooks on every layer's o_proj: the list of inputs (B, q, H*D) per layer, per forward."""
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for i, attn in enumerate(get_adapter(model).attention_modules()):
        def hook(module, args, i=i):
            seen.setdefault(i, []).append(args[0].detach().clone())
        hooks.append(attn.o_proj.register_forward_pre_hook(hook))
    return seen, hooks


def _one_row(family: str, row: int = 0):
    return testing._row_inputs(family, row)


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_alpha_one_is_the_unwrapped_model(family):
    """alpha=1 (the image-free rows still run, and the VHD is measured): logits to 1e-5 (a direct call, the
    padded layout) and the same greedy tokens (generate, the packed layout where the family allows it)."""
    model, inputs = _tiny(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = _greedy(model, inputs)
    with attnkit.wrap(model, VHR(alpha=1.0, measure_all=True)) as h, torch.no_grad():
        got = model(**inputs).logits
        assert h.methods[0].state()["vhd"].abs().sum() > 0, "the VHD was measured"
        tokens = _greedy(model, inputs)
    assert (got - ref).abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    with attnkit.wrap(model, VHR()), torch.no_grad():
        assert (model(**inputs).logits[:, -1] - ref[:, -1]).abs().max() > 1e-3, "alpha=2 changes the model"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_only_the_chosen_heads_change(family):
    """At the first reinforced layer, the o_proj input of the user's rows is the unwrapped one with the chosen
    heads' slices times alpha, and every other slice identical; layers before it are untouched."""
    model, inputs = testing.check_model(family)
    adapter = get_adapter(model)
    heads, dim = adapter.num_heads, adapter.head_dim
    seen, hooks = _capture_o_proj(model)
    try:
        with torch.no_grad():
            model(**inputs)
        ref = {i: v[-1] for i, v in seen.items()}
        vhr = VHR(alpha=3.0)
        with attnkit.wrap(model, vhr), torch.no_grad():
            model(**inputs)
        got = {i: v[-1] for i, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    first = vhr.first_layer
    chosen = vhr.state()["heads"][:, first]  # (B, H)
    assert chosen.any() and not chosen.all()
    bsz = inputs["input_ids"].shape[0]
    for layer in range(first):
        torch.testing.assert_close(got[layer][:bsz], ref[layer], atol=1e-5, rtol=0)
    a = got[first][:bsz].unflatten(-1, (heads, dim))  # (B, q, H, D)
    b = ref[first].unflatten(-1, (heads, dim))
    for row in range(bsz):
        for head in range(heads):
            want = b[row, :, head] * (3.0 if chosen[row, head] else 1.0)
            torch.testing.assert_close(a[row, :, head], want, atol=1e-5, rtol=1e-5)


def _direct_vhd(model, one, alpha, chosen, outlier_filter=True):
    """The VHD computed by hand from two separate forwards of a one-row batch: with the image (wrapped with the
    heads ``chosen`` reinforced by alpha, the method's own selection, so that later layers see the earlier
    reinforcement; the slice before the reinforcement is the o_proj input divided by the factor), and
    without it (the adapter's image-free inputs, unwrapped)."""
    adapter = get_adapter(model)
    heads, dim = adapter.num_heads, adapter.head_dim
    seen, hooks = _capture_o_proj(model)
    try:
        fixed = {layer: row.nonzero().flatten().tolist() for layer, row in enumerate(chosen) if row.any()}
        with attnkit.wrap(model, VHR(alpha=alpha, heads=fixed)) if fixed else attnkit.wrap(model, []), torch.no_grad():
            model(**one)
        image = {i: v[-1][0, -1].unflatten(-1, (heads, dim)) for i, v in seen.items()}
        free = adapter.text_only_inputs({"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]})
        with torch.no_grad():
            if adapter.family == "instructblip":  # the language model alone, as the branch runs it
                model.language_model(input_ids=free["input_ids"], attention_mask=free["attention_mask"])
            else:
                model(**free)
        plain = {i: v[-1][0, -1].unflatten(-1, (heads, dim)) for i, v in seen.items()}
    finally:
        for h in hooks:
            h.remove()
    layers = len(image)
    out = torch.zeros(layers, heads)
    for layer in range(layers):
        factor = torch.where(chosen[layer], alpha, 1.0)[:, None]
        d = (image[layer].float() / factor - plain[layer].float()).norm(dim=-1)
        n = plain[layer].float().norm(dim=-1)
        if outlier_filter:
            d = torch.where((d > d.mean() + d.std()) & (n > n.mean() + n.std()), 0.0, d)
        out[layer] = d
    return out


@pytest.mark.parametrize("measure_all", [True, False])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_vhd_equals_a_direct_computation(family, alpha, measure_all):
    model, _ = testing.check_model(family)  # 4 layers: two before the reinforced ones, two in them
    one = _one_row(family)
    vhr = VHR(alpha=alpha, measure_all=measure_all)
    with attnkit.wrap(model, vhr), torch.no_grad():
        model(**one)
    st = vhr.state()
    chosen = st["heads"][0]
    want = _direct_vhd(model, one, alpha, chosen)
    raw = _direct_vhd(model, one, alpha, chosen, outlier_filter=False)
    if not measure_all:  # only the reinforced layers are measured
        assert not st["vhd_raw"][0, : vhr.first_layer].any()
        want[: vhr.first_layer] = 0.0
        raw[: vhr.first_layer] = 0.0
    torch.testing.assert_close(st["vhd"][0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st["vhd_raw"][0], raw, atol=1e-4, rtol=1e-4)
    # the selection: strictly above each reinforced layer's median
    for layer in range(vhr.first_layer, want.shape[0]):
        assert torch.equal(chosen[layer], want[layer] > want[layer].quantile(0.5))
    assert not chosen[: vhr.first_layer].any()


def test_outlier_filter_zeroes_a_planted_outlier(monkeypatch):
    """A head whose image-free output is planted huge (so that it also differs most) gets VHD 0 with the filter;
    without the filter it keeps its VHD."""
    from attnkit.hooks import fast

    model, _ = _tiny("llava")
    one = _one_row("llava")
    last = get_adapter(model).num_layers - 1
    fused = fast.head_output

    def planted(call, roles, view, state, opts):
        if view.layer == last and view.is_prefill:
            out = fast.sdpa(call, state, opts)
            out[view.main_batch :, -1, 0] += 50.0  # head 0, the image-free row's last token
            for fn in roles.head_output:
                out = fn(view.at(torch.arange(call.query.shape[2])), out)
            return out
        return fused(call, roles, view, state, opts)

    monkeypatch.setattr(fast, "head_output", planted)
    hits = {}
    for flag in (True, False):
        vhr = VHR(alpha=1.0, outlier_filter=flag)
        with attnkit.wrap(model, vhr), torch.no_grad():
            model(**one)
        hits[flag] = (vhr.state()["vhd"][0, last, 0].item(), vhr.state()["vhd_raw"][0, last, 0].item())
    assert hits[True][0] == 0.0 and hits[True][1] > 10.0
    assert hits[False][0] > 10.0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_selection_is_fixed_for_the_generation(family):
    """The heads chosen at prefill stay for every decode step, the decode steps run on the user's rows only,
    and they are reinforced: the tokens differ from alpha=1's."""
    model, inputs = _tiny(family)
    vhr = VHR()
    snapshots = []
    batches = []
    attn = get_adapter(model).attention_modules()[-1]
    spy = attn.register_forward_pre_hook(lambda m, a, k: batches.append(k["hidden_states"].shape[0]), with_kwargs=True)

    class Snap:
        def __call__(self, input_ids, scores):
            snapshots.append(vhr.state()["heads"].clone())
            return scores

    from transformers import LogitsProcessorList

    try:
        with attnkit.wrap(model, vhr), torch.no_grad():
            model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           logits_processor=LogitsProcessorList([Snap()]))  # fmt: skip
    finally:
        spy.remove()
    assert len(snapshots) == 6
    assert snapshots[0].any()
    assert all(torch.equal(s, snapshots[0]) for s in snapshots)
    bsz = inputs["input_ids"].shape[0]
    assert batches[1:] == [bsz] * 5, "decode steps carry no image-free rows"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_fixed_heads_cached_equals_recomputed(family):
    heads = {2: [0, 3], 3: [1]}
    testing.check_cached_equals_recomputed("vhr", family, {"heads": heads, "alpha": 3.0})
    testing.check_batch_equals_rows("vhr", family, {"heads": heads, "alpha": 3.0})


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_fast_paths_equal_the_reference(family):
    """The fused head-output path equals the reference kernel's head_output, and the packed prefill the padded
    rows: the same VHD, selection and greedy tokens."""
    model, inputs = _tiny(family)
    runs = {}
    for name, opts in {
        "fast": KernelOptions(),
        "reference": KernelOptions(fused_head_output=False),
        "padded": KernelOptions(packed_contrast=False),
    }.items():
        vhr = VHR()
        with attnkit.wrap(model, vhr, options=opts), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)  # fmt: skip
        runs[name] = (out, vhr.state()["vhd"].clone(), vhr.state()["heads"].clone())
    ref = runs["fast"]
    for name in ("reference", "padded"):
        out, vhd, heads = runs[name]
        assert torch.equal(out.sequences, ref[0].sequences), name
        torch.testing.assert_close(vhd, ref[1], atol=1e-5, rtol=1e-5)
        assert torch.equal(heads, ref[2]), name
        for a, b in zip(out.logits, ref[0].logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_no_eager_attention(monkeypatch):
    """VHR never takes the reference (eager) kernel: its layers keep fused sdpa."""
    from attnkit.hooks import dispatch, fast

    def boom(*args, **kwargs):
        raise AssertionError("the reference kernel ran")

    monkeypatch.setattr(dispatch, "reference", boom)
    monkeypatch.setattr(fast, "single_row", boom)
    model, inputs = _tiny("llava")
    with attnkit.wrap(model, VHR()):
        _greedy(model, inputs)


def test_defaults_and_heads_file(tmp_path):
    model, inputs = _tiny("llava")  # 2 layers: round(14/32 * 2) = 1
    with attnkit.wrap(model, VHR()) as h:
        assert h.methods[0].first_layer == 1
    deep, _ = testing.check_model("instructblip")  # 4 layers: round(18/32 * 4) = 2
    with attnkit.wrap(deep, VHR()) as h:
        assert h.methods[0].first_layer == 2
    assert get_adapter(deep).vhr_last_layers == 2

    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": {"1": [0, 2]}, "vhd": [[0.0]]}))
    vhr = VHR(heads=str(path))
    assert vhr.config.heads == {1: [0, 2]} and vhr.contrast is None
    with attnkit.wrap(model, vhr), torch.no_grad():
        model(**inputs)
    assert vhr.selected() == {1: [0, 2]}

    from attnkit.methods import make_method
    from attnkit.options import parse_text

    spec = {o.name: o for o in VHR.Config.options()}["heads"]
    assert parse_text(spec.type, "1:0,2;0:1") == {1: [0, 2], 0: [1]}
    assert parse_text(spec.type, str(path)) == str(path)
    assert make_method("vhr", heads=str(path)).config.heads == {1: [0, 2]}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=-1.0), "alpha=-1.0 is out of range"),
        (dict(last_layers=0), "last_layers=0 is out of range"),
        (dict(outlier_filter="yes"), "outlier_filter='yes' must be True or False"),
        (dict(measure_all=1), "measure_all=1 must be True or False"),
        (dict(heads="/no/such/heads.json"), r"heads='/no/such/heads.json' must be a dict .* \(no file /no/such/heads.json\)"),
        (dict(heads={"x": [1]}), "layer 'x' is not an integer"),
        (dict(heads={1: "0"}), "layer 1 must list head indices"),
        (dict(heads={1: [-1]}), "negative head index"),
        (dict(heads=[1, 2]), "must map layers to lists of heads"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(errors.MethodArgumentError, match=message) as e:
        VHR(**kwargs)
    assert "\n" not in str(e.value)


def test_wrap_and_input_errors(tmp_path):
    model, inputs = _tiny("llava")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(errors.MethodArgumentError, match=r"bad.json: invalid JSON at line 1"):
        VHR(heads=str(bad))
    for kwargs, message in [
        (dict(last_layers=3), "last_layers=3 is out of range \\[1, 2\\]"),
        (dict(heads={5: [0]}), "heads names layer 5; this model has layers 0..1"),
        (dict(heads={1: [9]}), "heads names head 9 of layer 1"),
    ]:
        with pytest.raises(errors.MethodArgumentError, match=message):
            attnkit.wrap(model, VHR(**kwargs))
        assert getattr(model, "_attnkit_handle", None) is None
    right = dict(inputs)
    mask = inputs["attention_mask"]
    right["attention_mask"] = mask.flip(1)  # right padding: the last position is a pad in one row
    right["input_ids"] = inputs["input_ids"].flip(1)
    with attnkit.wrap(model, VHR()), torch.no_grad():
        with pytest.raises(errors.InputError, match="left padding"):
            model(**right)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_packed_prefill_with_other_roles_and_weights(family):
    """A packed prefill whose layers also carry other roles (PAI's scores) or return attention weights takes
    the rows layout through the reference kernel: it equals the padded rows (tokens, logits, and the weights
    of the user's rows)."""
    from attnkit.methods import PAI

    model, inputs = _tiny(family)
    runs = {}
    for packed in (True, False):
        methods = [PAI(alpha=0.5, start_layer=0), VHR(alpha=2.0)]
        with attnkit.wrap(model, methods, options=KernelOptions(packed_contrast=packed)), torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, output_attentions=True)  # fmt: skip
        runs[packed] = (out, methods[1].state()["heads"].clone())
    (a, ha), (b, hb) = runs[True], runs[False]
    assert torch.equal(a.sequences, b.sequences) and torch.equal(ha, hb)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
    prefill_a, prefill_b = a.attentions[0], b.attentions[0]
    assert prefill_a[0].shape == prefill_b[0].shape == (inputs["input_ids"].shape[0], *prefill_a[0].shape[1:])
    for x, y in zip(prefill_a, prefill_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
