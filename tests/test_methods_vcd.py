"""VCD and ICD: alpha=0 is the unwrapped model; the contrastive step equals its formula on two forwards run
by hand (VCD with a deterministic distortion, ICD with its disturbed prompt built here), at prefill and at
every step of generate; the beta cutoff; seeded sampling; the diffusion noise; ICD's splice point with a
processor; one-line errors."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit import errors, testing
from attnkit.methods import ICD, VCD
from attnkit.methods.icd import DISTURBANCE
from attnkit.methods.vcd import alpha_bar, contrastive_logits, diffusion_noise
from attnkit.models import get_adapter

from .conftest import _tiny, extend_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
IDS = [150, 151, 152, 153]  # plain text tokens of every tiny vocabulary


def flip(pv: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A deterministic distortion of any pixel layout (the generator unused)."""
    return pv.flip(-1) * 0.5 + 0.25


def formula(l: torch.Tensor, c: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The contrastive step written out from the paper: probabilities, not log-space cutoff."""
    out = (1 + alpha) * l - alpha * c
    p = torch.softmax(l, -1)
    keep = p >= beta * p.max(-1, keepdim=True).values
    return torch.where(keep, out, torch.full_like(out, -math.inf))


def _gen(model, inputs, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=N, min_new_tokens=N, return_dict_in_generate=True,
                              output_logits=True, **{"do_sample": False, **kw})


def _assert_logits(got, want, what):
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: the cutoff set differs"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=1e-4, rtol=0, msg=what)


def _disturbed(model, inputs, ids):
    """The ICD prompt by hand: ``ids`` after each row's first real token, the batch left-padded again."""
    rows, masks = [], []
    width = inputs["input_ids"].shape[1] + len(ids)
    for ids_row, mask_row in zip(inputs["input_ids"], inputs["attention_mask"]):
        real = ids_row[mask_row.bool()].tolist()
        row = real[:1] + ids + real[1:]
        pad = width - len(row)
        rows.append([get_adapter(model).pad_id] * pad + row)
        masks.append([0] * pad + [1] * len(row))
    out = dict(inputs, input_ids=torch.tensor(rows), attention_mask=torch.tensor(masks))
    if "token_type_ids" in inputs:
        out["token_type_ids"] = get_adapter(model).image_mask(out["input_ids"]).long()
    return out


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@pytest.mark.parametrize("which", ["vcd", "icd"])
def test_alpha_zero_is_unwrapped(family, which):
    model, inputs = _tiny(family)
    method = VCD(alpha=0.0) if which == "vcd" else ICD(alpha=0.0)  # ICD at alpha=0 needs no instruction
    assert method.contrast is None
    ref = _gen(model, inputs)
    with torch.no_grad():
        ref_first = model(**inputs).logits
    with attnkit.wrap(model, method):
        got = _gen(model, inputs)
        with torch.no_grad():
            first = model(**inputs).logits
    torch.testing.assert_close(first, ref_first, atol=1e-5, rtol=0)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_vcd_equals_formula_through_generate(family):
    """Prefill (every position: the last rewritten, earlier ones the user's) and each decode step (recomputed
    from scratch on both batches) equal the formula on the model's logits for the original and flipped images."""
    model, inputs = _tiny(family)
    alpha, beta = 1.5, 0.2
    method = VCD(alpha=alpha, beta=beta, distort=flip)
    noised = dict(inputs, pixel_values=flip(inputs["pixel_values"], None))
    with attnkit.wrap(model, method):
        with torch.no_grad():
            first = model(**inputs).logits
        gen = _gen(model, inputs)
    tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
    with torch.no_grad():
        l, c = model(**inputs).logits, model(**noised).logits
        torch.testing.assert_close(first[:, :-1], l[:, :-1], atol=2e-5, rtol=0)
        _assert_logits(first[:, -1], formula(l[:, -1], c[:, -1], alpha, beta), "prefill")
        for t in range(N):
            l = model(**extend_inputs(inputs, tokens[:, :t])).logits[:, -1]
            c = model(**extend_inputs(noised, tokens[:, :t])).logits[:, -1]
            _assert_logits(gen.logits[t], formula(l, c, alpha, beta), f"step {t}")
    plain = _gen(model, inputs).sequences
    assert not torch.equal(plain, gen.sequences), "VCD must change the greedy choice somewhere"


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_icd_equals_formula_through_generate(family):
    model, inputs = _tiny(family)
    alpha, beta = 1.0, 0.1
    disturbed = _disturbed(model, inputs, IDS)
    assert disturbed["input_ids"].shape[1] > inputs["input_ids"].shape[1], "the disturbed prompt is longer"
    with attnkit.wrap(model, ICD(alpha=alpha, beta=beta, disturbance_ids=IDS)):
        with torch.no_grad():
            first = model(**inputs).logits
        gen = _gen(model, inputs)
    assert first.shape[:2] == inputs["input_ids"].shape, "the user's positions only"
    tokens = gen.sequences[:, inputs["input_ids"].shape[1]:]
    with torch.no_grad():
        l, c = model(**inputs).logits, model(**disturbed).logits
        torch.testing.assert_close(first[:, :-1], l[:, :-1], atol=2e-5, rtol=0)
        _assert_logits(first[:, -1], formula(l[:, -1], c[:, -1], alpha, beta), "prefill")
        for t in range(N):
            l = model(**extend_inputs(inputs, tokens[:, :t])).logits[:, -1]
            c = model(**extend_inputs(disturbed, tokens[:, :t])).logits[:, -1]
            _assert_logits(gen.logits[t], formula(l, c, alpha, beta), f"step {t}")


def test_cutoff_masks_exactly_below_threshold():
    l = torch.tensor([[4.0, 4.0 + math.log(0.1) + 1e-4, 4.0 + math.log(0.1) - 1e-3, -3.0, 3.0]])
    c = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    out = contrastive_logits(l, c, 0.5, 0.1)
    assert torch.isinf(out).tolist() == [[False, False, True, True, False]]
    torch.testing.assert_close(out[0, [0, 1, 4]], 1.5 * l[0, [0, 1, 4]] - 0.5 * c[0, [0, 1, 4]])
    assert torch.isfinite(contrastive_logits(l, c, 0.5, 0.0)).all(), "beta=0 keeps every token"
    assert torch.isinf(contrastive_logits(l, c, 0.5, 1.0)).sum() == 4, "beta=1 keeps the top token only"


@pytest.mark.parametrize("which", ["vcd", "icd"])
def test_sampling_is_seeded_and_contrasted(which):
    model, inputs = _tiny("llava")

    def sample():
        torch.manual_seed(123)
        return _gen(model, inputs, do_sample=True, top_k=0).sequences

    plain = sample()
    method = VCD() if which == "vcd" else ICD(disturbance_ids=IDS)
    with attnkit.wrap(model, method):
        one, two = sample(), sample()
    assert torch.equal(one, two), "the same seed gives the same tokens"
    assert not torch.equal(one, plain), "the contrast changes the sampled tokens"


def test_diffusion_noise_schedule_and_seed():
    betas = [1 / (1 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5 for x in torch.linspace(-6, 6, 1000, dtype=torch.float64).tolist()]
    want = math.prod(1 - b for b in betas[:501])  # step 500, 0-based
    assert alpha_bar(500) == pytest.approx(want, rel=1e-9)
    x = torch.randn(2, 3, 8, 8)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    out = diffusion_noise(x, 500, g(0))
    eps = (out - math.sqrt(want) * x) / math.sqrt(1 - want)
    torch.testing.assert_close(eps[0], torch.randn(3, 8, 8, generator=g(0)), atol=1e-4, rtol=0)
    assert torch.equal(eps[0], eps[1]) or torch.allclose(eps[0], eps[1], atol=1e-4), "one draw per image"
    assert torch.equal(diffusion_noise(x, 500, g(0)), out), "same seed, same noise"
    assert not torch.allclose(diffusion_noise(x, 500, g(1)), out), "another seed, other noise"
    assert diffusion_noise(x, 999, g(0)).sub(x).abs().mean() > diffusion_noise(x, 10, g(0)).sub(x).abs().mean()
    vcd = VCD(seed=7)  # the method's own distortion: its seed, reset at every call
    torch.testing.assert_close(vcd._distort(x), diffusion_noise(x, 500, g(7)))
    assert torch.equal(vcd._distort(x), vcd._distort(x))


@pytest.mark.parametrize("family", ["llava", "gemma3", "idefics3"])
def test_icd_processor_splices_after_the_image(family):
    processor = testing.tiny_processor(family)
    model, inputs = _tiny(family)
    icd = ICD(processor=processor)
    want = processor.tokenizer(DISTURBANCE, add_special_tokens=False)["input_ids"]
    assert icd.ids == want and len(want) > 5
    adapter = get_adapter(model)
    with attnkit.wrap(model, icd):
        ids, mask = icd.disturbed(inputs["input_ids"], inputs["attention_mask"])
    n = len(want)
    assert ids.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + n)
    for r in range(ids.shape[0]):
        user = inputs["input_ids"][r][inputs["attention_mask"][r].bool()].tolist()
        got = ids[r][mask[r].bool()].tolist()
        image = adapter.image_mask(torch.tensor([user]))[0].nonzero().max().item()
        at = image + 1 + adapter.wrap_after
        assert got == user[:at] + want + user[at:], f"row {r}"
        text = processor.tokenizer.decode(user[at:at + 2])
        assert "dog" in text.lower() or "describe" in text.lower() or text.strip(), text
    assert int(mask.sum()) == int(inputs["attention_mask"].sum()) + n * ids.shape[0]


def test_errors():
    model, inputs = _tiny("llava")
    for method in (VCD(), ICD(disturbance_ids=IDS)):
        with attnkit.wrap(model, method):
            with pytest.raises(errors.InputError, match=f"beam search .*not supported with {method.name}") as e:
                model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
            assert "\n" not in str(e.value)
    cases = [
        (lambda: VCD(alpha=-1.0), "vcd: alpha=-1.0 is out of range"),
        (lambda: VCD(beta=1.5), "vcd: beta=1.5 is out of range"),
        (lambda: VCD(noise_step=1000), "vcd: noise_step=1000 is out of range"),
        (lambda: VCD(distort=3), "vcd: distort must be a callable"),
        (lambda: ICD(beta=-0.1, disturbance_ids=IDS), "icd: beta=-0.1 is out of range"),
        (lambda: ICD(disturbance_ids=[]), "icd: disturbance_ids=\\[\\] must be a non-empty list"),
        (lambda: ICD(disturbance_ids=IDS, processor=testing.tiny_processor("llava")), "not both"),
    ]
    for make, message in cases:
        with pytest.raises(errors.MethodArgumentError, match=message) as e:
            make()
        assert "\n" not in str(e.value)
    with pytest.raises(errors.MethodArgumentError, match="icd: needs processor= .* or disturbance_ids=") as e:
        attnkit.wrap(model, ICD())
    assert "\n" not in str(e.value) and "get_image_features" not in vars(model.base_model)
    for family in ("instructblip",):
        m, _ = _tiny(family)
        with pytest.raises(errors.UnsupportedModelError):
            attnkit.wrap(m, VCD())
    m, _ = _tiny("qwen2_vl")
    with pytest.raises(errors.UnsupportedModelError):
        attnkit.wrap(m, ICD(disturbance_ids=IDS))
