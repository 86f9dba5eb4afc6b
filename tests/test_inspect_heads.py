"""attnkit.inspect.heads and ``attnkit heads``: VHR's vision-aware head divergence measured by one prefill,
checked against a computation by hand, the head-set file read back by VHR, the heat map and the CLI."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import attnkit
from attnkit import cli, testing
from attnkit.errors import AlreadyWrappedError, InputError
from attnkit.inspect import HeadReport, head_divergence, head_report, render_heatmap, save_heads_json
from attnkit.inspect import heads as heads_module
from attnkit.methods import VHR

FAMILIES = ("llava", "qwen2_vl", "instructblip")
LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@functools.lru_cache(maxsize=None)
def _model(family: str):
    """A 4-layer tiny model (two reinforced layers by VHR's default share) and its left-padded 2-row batch."""
    return testing.tiny_model(family, seed=0, num_layers=LAYERS)


def _row(family: str, row: int) -> dict:
    """Row ``row`` of the tiny batch as a batch of one, without padding (as attnkit.testing makes it)."""
    prompts, images = list(testing.DEFAULT_PROMPTS), testing.sample_images(len(testing.DEFAULT_PROMPTS))
    return testing.tiny_inputs(family, prompts=[prompts[row]], images=[images[row]])


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -------------------------------------------------------------------------------------------- the scores


@pytest.mark.parametrize("family", FAMILIES)
def test_one_prompt_gives_layers_by_heads(family):
    model, _ = _model(family)
    vhd = head_divergence(model, _row(family, 0))
    heads = attnkit.get_adapter(model).num_heads
    assert vhd.shape == (LAYERS, heads) and vhd.dtype == torch.float32
    assert torch.isfinite(vhd).all()
    assert (vhd > 0).sum() >= vhd.numel() // 2  # the filter zeroes a few heads at most


@pytest.mark.parametrize("alpha", [1.0, 2.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_equal_rows_alone(family, alpha):
    model, batch = _model(family)
    assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded"
    report = head_report(model, batch, alpha=alpha)
    vhd = head_divergence(model, batch, alpha=alpha)
    assert vhd.shape == (2, LAYERS, attnkit.get_adapter(model).num_heads)
    torch.testing.assert_close(vhd, report.vhd, atol=0, rtol=0)
    assert not torch.allclose(vhd[0], vhd[1]), "the two prompts must differ"
    for b in range(2):
        alone = head_report(model, _row(family, b), alpha=alpha)
        torch.testing.assert_close(vhd[b], alone.vhd[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(report.vhd_raw[b], alone.vhd_raw[0], atol=1e-5, rtol=0)
        assert torch.equal(report.heads[b], alone.heads[0])


def _o_proj_inputs(model, run) -> torch.Tensor:
    """(layers, hidden) input of every layer's o_proj at the last position of a batch of one, from ``run()``."""
    got: dict[int, torch.Tensor] = {}
    hooks = [
        attn.o_proj.register_forward_pre_hook(lambda mod, args, i=i: got.__setitem__(i, args[0][0, -1].float()))
        for i, attn in enumerate(attnkit.get_adapter(model).attention_modules())
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[i] for i in range(len(got))])


def _by_hand(model, family: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(VHD before the filter, after it), (layers, heads), from two plain forwards of the unwrapped model."""
    adapter = attnkit.get_adapter(model)
    image = _o_proj_inputs(model, lambda: model(**inputs))
    free = adapter.text_only_inputs(inputs)
    keep = free["attention_mask"][0].bool()
    free = {k: v[:, keep] for k, v in free.items()}  # a batch of one: drop the padding left by the image
    # InstructBLIP has no image-free forward of the whole model: its language model's
    lm = model.language_model if family == "instructblip" else model
    no_image = _o_proj_inputs(model, lambda: lm(input_ids=free["input_ids"], attention_mask=free["attention_mask"]))
    heads = adapter.num_heads
    image, no_image = image.view(LAYERS, heads, -1), no_image.view(LAYERS, heads, -1)
    raw = (image - no_image).norm(dim=-1)
    norm = no_image.norm(dim=-1)
    high = (raw > raw.mean(-1, keepdim=True) + raw.std(-1, keepdim=True)) & (
        norm > norm.mean(-1, keepdim=True) + norm.std(-1, keepdim=True)
    )
    return raw, raw.masked_fill(high, 0.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_a_computation_by_hand(family):
    model, _ = _model(family)
    filtered_somewhere = False
    for row in range(2):
        inputs = _row(family, row)
        raw, filtered = _by_hand(model, family, inputs)
        torch.testing.assert_close(head_divergence(model, inputs), filtered, atol=1e-4, rtol=0)
        torch.testing.assert_close(head_divergence(model, inputs, outlier_filter=False), raw, atol=1e-4, rtol=0)
        filtered_somewhere |= bool((filtered != raw).any())
    assert filtered_somewhere, f"{family}: the outlier filter zeroed nothing, so its comparison proves nothing"


def test_alpha_reinforces_the_layers_after_the_first_selecting_one():
    model, _ = _model("llava")
    inputs = _row("llava", 0)
    own = head_report(model, inputs, alpha=1.0)
    reinforced = head_report(model, inputs, alpha=2.0)
    first = reinforced.first_layer
    assert first == own.first_layer == LAYERS - reinforced.last_layers and 0 < first < LAYERS - 1
    torch.testing.assert_close(reinforced.vhd[0, : first + 1], own.vhd[0, : first + 1], atol=1e-5, rtol=0)
    assert (reinforced.vhd[0, first + 1 :] - own.vhd[0, first + 1 :]).abs().max() > 1e-3
    assert torch.equal(reinforced.heads[0, first], own.heads[0, first])  # measured before any reinforcement
    assert not reinforced.heads[0, :first].any() and reinforced.heads[0, first:].any(dim=-1).all()
    assert head_report(model, inputs, last_layers=3).first_layer == LAYERS - 3


def test_processor_output_is_accepted():
    """A processor's BatchFeature (a UserDict, not a dict) as it comes."""
    from transformers import BatchFeature

    model, _ = _model("llava")
    inputs = _row("llava", 0)
    torch.testing.assert_close(head_divergence(model, BatchFeature(inputs)), head_divergence(model, inputs))


def test_input_errors_are_one_line():
    model, batch = _model("llava")
    text_only = attnkit.get_adapter(model).text_only_inputs(batch)
    with pytest.raises(InputError, match="prompt 0 of the batch holds no image tokens"):
        head_divergence(model, text_only)
    with pytest.raises(InputError, match="input_ids"):
        head_divergence(model, {"pixel_values": batch["pixel_values"]})


# -------------------------------------------------------------------------------------------- restore


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_model_is_unwrapped_afterwards_and_after_an_error(family):
    model, batch = _model(family)
    ref = _logits(model, batch)
    before = testing._snapshot(model)
    head_divergence(model, batch, alpha=2.0)
    testing._compare_snapshots(before, testing._snapshot(model), f"{family}: after head_divergence")
    assert torch.equal(_logits(model, batch), ref)

    # an error inside the wrapped forward: VHR refuses a right-padded prompt
    right = {k: v.flip(1) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
             for k, v in batch.items()}
    with pytest.raises(InputError, match="left padding"):
        head_divergence(model, right)
    testing._compare_snapshots(before, testing._snapshot(model), f"{family}: after an error in the forward")

    # an error raised by the model's own forward (a hook of the test's)
    def boom(module, args):
        raise RuntimeError("boom")

    hook = attnkit.get_adapter(model).decoder_layers()[1].register_forward_pre_hook(boom)
    try:
        around = testing._snapshot(model)
        with pytest.raises(RuntimeError, match="boom"):
            head_divergence(model, batch)
        testing._compare_snapshots(around, testing._snapshot(model), f"{family}: after an exception inside")
    finally:
        hook.remove()
    assert torch.equal(_logits(model, batch), ref)


def test_a_wrapped_model_is_refused_and_stays_wrapped():
    model, batch = _model("llava")
    with attnkit.wrap(model, "identity") as handle:
        with pytest.raises(AlreadyWrappedError):
            head_divergence(model, batch)
        assert handle.active
    assert not handle.active


# -------------------------------------------------------------------------------------------- the file


def test_json_round_trips_into_vhr(tmp_path):
    model, batch = _model("llava")
    inputs = _row("llava", 0)
    report = head_report(model, inputs, alpha=2.0)
    path = save_heads_json(report, tmp_path / "heads.json", model="tiny:llava", image="x.png", prompt="Is it?")
    data = json.loads(path.read_text())
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    assert data["alpha"] == 2.0 and data["first_layer"] == report.first_layer and data["outlier_filter"] is True
    assert data["last_layers"] == report.last_layers and (data["model"], data["prompt"]) == ("tiny:llava", "Is it?")
    for key in ("vhd", "vhd_raw", "norm"):
        torch.testing.assert_close(torch.tensor(data[key]), getattr(report, key)[0], rtol=1e-5, atol=1e-6)
    selected = report.selected(0)
    assert selected and {int(k): v for k, v in data["heads"].items()} == selected
    assert selected == {l: report.heads[0, l].nonzero().flatten().tolist() for l in range(LAYERS)
                        if report.heads[0, l].any()}

    fixed = VHR(heads=str(path))
    assert fixed.selected() == selected
    # the fixed set reinforces exactly what VHR's own selection reinforces at this prompt's prefill
    with attnkit.wrap(model, fixed):
        from_file = _logits(model, inputs)[0, -1]
    with attnkit.wrap(model, VHR(alpha=2.0)):
        selecting = _logits(model, inputs)[0, -1]
    torch.testing.assert_close(from_file, selecting, atol=1e-5, rtol=0)
    assert (from_file - _logits(model, inputs)[0, -1]).abs().max() > 1e-3

    batched = head_report(model, batch, alpha=2.0)
    with pytest.raises(InputError, match="pick one with row"):
        save_heads_json(batched, tmp_path / "batch.json")
    save_heads_json(batched, tmp_path / "row1.json", row=1)
    assert VHR(heads=str(tmp_path / "row1.json")).selected() == batched.selected(1)


# -------------------------------------------------------------------------------------------- the picture


def _cell(image: Image.Image, layer: int, head: int) -> list:
    """Every pixel of one cell."""
    x0, y0 = heads_module.LEFT + head * heads_module.CELL, heads_module.TOP + layer * heads_module.CELL
    cell = heads_module.CELL
    return [image.getpixel((x0 + i, y0 + j)) for j in range(cell) for i in range(cell)]


def test_heatmap_png(tmp_path):
    model, _ = _model("llava")
    report = head_report(model, _row("llava", 0), alpha=2.0)
    vhd, heads = report.vhd[0], report.heads[0]
    path = tmp_path / "heads.png"
    image = render_heatmap(vhd, heads, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == image.size == heatmap_size(LAYERS, vhd.shape[1])
        assert png.convert("RGB").tobytes() == image.tobytes()
    plain = render_heatmap(vhd)
    assert plain.size == image.size
    lo, hi = float(vhd.min()), float(vhd.max())
    for layer in range(LAYERS):
        for head in range(vhd.shape[1]):
            outlined, bare = _cell(image, layer, head), _cell(plain, layer, head)
            c = heads_module.CELL // 2
            expected = heads_module.colormap((float(vhd[layer, head]) - lo) / (hi - lo))
            assert bare[c * heads_module.CELL + c] == outlined[c * heads_module.CELL + c] == expected
            if heads[layer, head]:
                assert outlined[0] != bare[0] and outlined[heads_module.CELL + 1] != bare[heads_module.CELL + 1]
            else:
                assert outlined == bare
    # the same input, the same bytes; a dict of heads draws the same outline as the bool table
    again = tmp_path / "again.png"
    render_heatmap(vhd, report.selected(0), again)
    assert again.read_bytes() == path.read_bytes()


def heatmap_size(layers: int, heads: int) -> tuple[int, int]:
    """The layout written out: margins 40 (layer labels) + 84 (colour bar) wide, 30 (head labels) + 20
    (legend) high, 14-pixel cells, at least 64 pixels of grid height for the colour bar."""
    assert heads_module.heatmap_size(layers, heads) == (40 + 14 * heads + 84, 30 + max(14 * layers, 64) + 20)
    return heads_module.heatmap_size(layers, heads)


def test_heatmap_of_a_7b_sized_table():
    torch.manual_seed(0)
    vhd = torch.rand(32, 32) * 5
    vhd[3, 4] = float("nan")
    image = render_heatmap(vhd, vhd > 4)
    assert image.size == heatmap_size(32, 32) == (572, 498)
    assert _cell(image, 3, 4)[7 * 14 + 7] == heads_module.MISSING
    # the colour bar runs from the maximum's colour at the top to the minimum's at the bottom
    bar_x = heads_module.LEFT + 32 * 14 + heads_module.BAR_GAP + 2
    assert image.getpixel((bar_x, heads_module.TOP)) == heads_module.colormap(1.0)
    assert image.getpixel((bar_x, heads_module.TOP + 32 * 14 - 1)) == heads_module.colormap(0.0)
    with pytest.raises(ValueError, match="layers, heads"):
        render_heatmap(torch.zeros(3))
    with pytest.raises(ValueError, match="outside"):
        render_heatmap(vhd, {40: [0]})


def test_report_rows():
    t = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    report = HeadReport(vhd=t, vhd_raw=t, norm=t, heads=t > 20, first_layer=1, alpha=2.0, last_layers=2,
                        outlier_filter=True)
    assert report.row(1).vhd.shape == (1, 3, 4) and torch.equal(report.row(-1).vhd[0], t[1])
    assert report.selected(1) == {2: [1, 2, 3]} and report.selected(0) == {}


# -------------------------------------------------------------------------------------------- the CLI


def test_cli_heads_end_to_end(tmp_path, capsys):
    image = tmp_path / "image.png"
    testing.sample_images(1, size=(40, 30))[0].save(image)
    out = tmp_path / "out"
    argv = ["heads", "--model", "tiny:llava", "--image", str(image), "--prompt", "Is there a cat?", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'heads.json'}" in printed and f"wrote {out / 'heads.png'}" in printed
    data = json.loads((out / "heads.json").read_text())
    assert data["model"] == "tiny:llava" and data["image"] == str(image) and data["prompt"] == "Is there a cat?"
    assert data["alpha"] == 2.0 and data["num_layers"] == 2  # load_model's tiny models have 2 layers
    heads = VHR(heads=str(out / "heads.json")).selected()
    assert heads and all(f"layer {layer}: {len(hs)} {hs}" in printed for layer, hs in heads.items())
    with Image.open(out / "heads.png") as png:
        assert png.size == heatmap_size(2, 4)

    assert cli.main([*argv, "--alpha", "1", "--no-outlier-filter", "--last-layers", "2"]) == 0
    data = json.loads((out / "heads.json").read_text())
    assert (data["alpha"], data["outlier_filter"], data["first_layer"]) == (1.0, False, 0)
    assert data["vhd"] == data["vhd_raw"]
    assert "not reinforced" in capsys.readouterr().out


def _one_line_error(capsys, argv, *expected):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("attnkit: error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_cli_heads_bad_input(tmp_path, capsys):
    image = tmp_path / "image.png"
    testing.sample_images(1)[0].save(image)
    base = ["--model", "tiny:llava", "--prompt", "Is there a cat?"]
    missing = tmp_path / "nope.png"
    _one_line_error(capsys, ["heads", *base, "--image", str(missing), "--out", str(tmp_path / "o")],
                    "image file not found", str(missing))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    _one_line_error(capsys, ["heads", *base, "--image", str(broken), "--out", str(tmp_path / "o")],
                    "cannot read image", str(broken))
    _one_line_error(capsys, ["heads", *base, "--image", str(image), "--out", str(tmp_path / "no" / "o")],
                    "parent directory", str(tmp_path / "no"))
    _one_line_error(capsys, ["heads", *base, "--image", str(image), "--out", str(image)], "not a directory")
    _one_line_error(capsys, ["heads", *base, "--image", str(image), "--out", str(tmp_path / "o"),
                             "--last-layers", "3"], "last_layers=3")
    assert not (tmp_path / "o").exists()


def test_cli_heads_bad_image_has_no_traceback(tmp_path):
    missing = tmp_path / "missing.jpg"
    proc = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "heads", "--model", "tiny:llava", "--image", str(missing),
         "--prompt", "x", "--out", str(tmp_path / "out")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"attnkit: error: image file not found: {missing}"


def test_cli_heads_help_says_what_alpha_1_gives(capsys):
    with pytest.raises(SystemExit):
        cli.main(["heads", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with --alpha 1 the scores are the model's own VHD" in text
