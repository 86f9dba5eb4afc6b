"""attnkit.inspect.calibrate and ``attnkit calibrate``: sink dimensions found where a test plants them, the
per-head table, the files VAR / VHR / ACT read back, read-only probing, the CLI and its errors."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from PIL import Image

import attnkit
from attnkit import cli, testing
from attnkit.errors import InputError, MethodArgumentError
from attnkit.eval.inputs import make_batch
from attnkit.inspect import (
    calibrate_heads,
    calibrate_sinks,
    head_divergence,
    save_calibration_heads_json,
    save_sinks_json,
)
from attnkit.inspect import calibrate as cal
from attnkit.inspect.heads import heatmap_size
from attnkit.methods import ACT, VAR, VHR

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

LAYERS = 4
TEXT_DIM, IMAGE_DIM = 5, 17  # the planted sink dimensions (tiny hidden size 32)


@functools.lru_cache(maxsize=None)
def _model(family: str):
    return testing.tiny_model(family, seed=0, num_layers=LAYERS)


def _images(n: int = 4) -> list[Image.Image]:
    return testing.sample_images(n, seed=3)


def _batch(family: str, image: Image.Image) -> dict:
    model, _ = _model(family)
    return make_batch(testing.tiny_processor(family), attnkit.get_adapter(model), [cal.DEFAULT_PROMPT], [image])


class _Planted:
    """Forward pre-hooks on every decoder layer (at prefill): +100 in TEXT_DIM at the first token and in
    IMAGE_DIM at the 4th image token, as scripts/bench.py plant_sinks does; removed on exit."""

    def __init__(self, family: str) -> None:
        model, _ = _model(family)
        self.adapter = attnkit.get_adapter(model)
        batch = _batch(family, _images(1)[0])
        self.prompt_len = batch["input_ids"].shape[1]
        self.image_pos = int(self.adapter.image_mask(batch["input_ids"])[0].nonzero()[3])
        self.hooks: list = []

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != self.prompt_len:
            return None
        hidden = hidden.clone()
        hidden[:, 0, TEXT_DIM] += 100.0
        hidden[:, self.image_pos, IMAGE_DIM] += 100.0
        if args:
            return (hidden, *args[1:]), kwargs
        return args, dict(kwargs, hidden_states=hidden)

    def __enter__(self):
        self.hooks = [layer.register_forward_pre_hook(self.hook, with_kwargs=True)
                      for layer in self.adapter.decoder_layers()]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


# ------------------------------------------------------------------------------------------- sinks


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_sinks_finds_the_planted_dimensions(family):
    model, _ = _model(family)
    processor = testing.tiny_processor(family)
    plain = calibrate_sinks(model, processor, _images(), n=4)
    assert TEXT_DIM not in plain.dims and IMAGE_DIM not in plain.dims
    with _Planted(family):
        calib = calibrate_sinks(model, processor, _images(), n=4)
    assert calib.dims == [TEXT_DIM, IMAGE_DIM]
    assert calib.samples == 4 and calib.max_abs.shape == (LAYERS, 32)
    assert calib.tau == pytest.approx(0.7 * math.sqrt(32))
    for d in (TEXT_DIM, IMAGE_DIM):
        assert int(calib.layers_hit[d]) == LAYERS
        assert (calib.max_abs[:, d] > calib.tau).all()
        assert (calib.ratio[:, d] > 1.5).all()
        torch.testing.assert_close(calib.tokens_over[:, d], torch.ones(LAYERS))
    torch.testing.assert_close(calib.image_tokens_over[:, IMAGE_DIM], torch.ones(LAYERS))
    torch.testing.assert_close(calib.image_tokens_over[:, TEXT_DIM], torch.zeros(LAYERS))
    assert calib.candidates(3)[:2] == sorted([TEXT_DIM, IMAGE_DIM], key=lambda d: -float(calib.ratio[:, d].max()))


def test_padded_batches_count_each_row_and_only_its_real_tokens():
    model, inputs = _model("llava")  # two rows, left-padded
    assert (inputs["attention_mask"] == 0).any()
    calib = calibrate_sinks(model, inputs=inputs)
    assert calib.samples == 2 and calib.tokens == pytest.approx(float(inputs["attention_mask"].sum()) / 2)
    heads = calibrate_heads(model, inputs=[inputs], sink_dims=[TEXT_DIM])
    assert heads.samples == 2 and heads.vhd.shape == (LAYERS, attnkit.get_adapter(model).num_heads)
    torch.testing.assert_close(heads.vhd, head_divergence(model, inputs).mean(0), atol=1e-5, rtol=0)


def test_sinks_rule_needs_enough_layers_and_few_tokens():
    model, _ = _model("llava")
    processor = testing.tiny_processor("llava")
    with _Planted("llava"):
        # every token over the threshold: not a few tokens
        assert calibrate_sinks(model, processor, _images(2), n=2, tau=1e-3).dims == []
        # the planted dims in every layer, so any share of the layers keeps them
        assert calibrate_sinks(model, processor, _images(2), n=2, min_layers=1.0).dims == [TEXT_DIM, IMAGE_DIM]
    with pytest.raises(InputError, match="min_layers"):
        calibrate_sinks(model, processor, _images(1), min_layers=0)
    with pytest.raises(InputError, match="n=0"):
        calibrate_sinks(model, processor, _images(1), n=0)


def test_calibration_is_read_only():
    model, _ = _model("llava")
    batch = _batch("llava", _images(1)[0])
    with torch.no_grad():
        ref = model(**batch).logits
    probe = cal._HeadProbe(3.0, torch.tensor([TEXT_DIM]))
    with attnkit.wrap(model, probe), torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert probe.sums and probe.layer_stats  # it did look
    calibrate_heads(model, testing.tiny_processor("llava"), _images(2), n=2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)  # unwrapped, unchanged


def test_var_reads_the_sinks_file(tmp_path):
    model, inputs = _model("llava")
    processor = testing.tiny_processor("llava")
    with _Planted("llava") as planted:
        calib = calibrate_sinks(model, processor, _images(), n=4)
        path = save_sinks_json(calib, tmp_path / "sinks.json", model="tiny:llava")
        saved = json.loads(path.read_text())
        assert saved["sink_dims"] == [TEXT_DIM, IMAGE_DIM] and saved["hidden_size"] == 32
        assert saved["samples"] == 4 and len(saved["median_max_abs"]) == LAYERS
        by_dim = {e["dim"]: e for e in saved["evidence"]}
        assert by_dim[TEXT_DIM]["sink"] and by_dim[TEXT_DIM]["layers_hit"] == LAYERS
        assert len(by_dim[IMAGE_DIM]["max_abs"]) == LAYERS and by_dim[IMAGE_DIM]["image_tokens_over"] == [1.0] * 4
        var = VAR(sink_dims=str(path), tau=calib.tau, start_layer=1, skip_last=0)
        assert var.config.sink_dims == [TEXT_DIM, IMAGE_DIM]
        batch = _batch("llava", _images(1)[0])
        with attnkit.wrap(model, var), torch.no_grad():
            model(**batch)
            report = var.sink_report()
            model.generate(**inputs, max_new_tokens=2)
        assert report["source"] == f"file: {path}" and report["file"] == str(path)
        assert report["sink_dims"] == [TEXT_DIM, IMAGE_DIM]
        assert report["sinks"][1] == [[0, planted.image_pos]]
    # the CLI's --var.sink-dims FILE and --method-arg var.sink_dims=FILE
    made = cli._make_methods("var", [f"var.sink_dims={path}"])[0]
    assert made.config.sink_dims == [TEXT_DIM, IMAGE_DIM]
    assert cli._make_methods("var", ["var.sink_dims=3,4"])[0].config.sink_dims == [3, 4]


def test_sinks_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "bad.json"
    for text, message in [
        ('{"dims": [1]}', "no key 'sink_dims'"),
        ('{"sink_dims": [1, "x"]}', "key 'sink_dims': entry 'x' is not a dimension index"),
        ('{"sink_dims": []}', "lists no dimension"),
        ('{"sink_dims": 3}', "must be a list"),
        ("[1,", "invalid JSON at line 1"),
    ]:
        bad.write_text(text)
        with pytest.raises(MethodArgumentError, match=f"var: sink_dims file {bad}.*{message}"):
            VAR(sink_dims=str(bad))
    with pytest.raises(MethodArgumentError, match=r"sink_dims=.* or the path of a sinks JSON file \(no file .*none.json\)"):
        VAR(sink_dims=str(tmp_path / "none.json"))
    bad.write_text(json.dumps({"sink_dims": [3], "hidden_size": 4096}))
    with pytest.raises(MethodArgumentError, match="calibrated on a model with hidden_size 4096; this model's is 32"):
        attnkit.wrap(_model("llava")[0], VAR(sink_dims=str(bad)))
    attnkit.wrap(_model("llava")[0], "identity").remove()  # the failed wrap left nothing behind


# ------------------------------------------------------------------------------------------- heads


def test_heads_table_shape_and_values():
    model, _ = _model("llava")
    processor = testing.tiny_processor("llava")
    with _Planted("llava"):
        calib = calibrate_heads(model, processor, _images(3), n=3, sink_dims=[TEXT_DIM, IMAGE_DIM])
        vhd = torch.stack([head_divergence(model, _batch("llava", im)) for im in _images(3)]).mean(0)
    heads = attnkit.get_adapter(model).num_heads
    for table in (calib.image_share, calib.visual_sink_share, calib.vhd, calib.heads):
        assert table.shape == (LAYERS, heads)
    assert ((calib.image_share > 0) & (calib.image_share <= 1)).all()
    assert ((calib.visual_sink_share >= 0) & (calib.visual_sink_share <= 1)).all()
    assert (calib.visual_sink_share > 0).any(), "the planted image sink gets some attention"
    torch.testing.assert_close(calib.vhd, vhd, atol=1e-5, rtol=0)
    assert calib.samples == 3 and calib.sink_dims_source == "explicit"
    # VHR's rule on the mean VHD
    first = calib.first_layer
    assert first == LAYERS - calib.last_layers and not calib.heads[:first].any()
    for layer in range(first, LAYERS):
        row = calib.vhd[layer]
        assert torch.equal(calib.heads[layer], row > row.quantile(0.5))
    # no sink dims given, none in the table: calibrated on the same images (the planted ones absent here)
    plain = calibrate_heads(model, processor, _images(2), n=2)
    assert plain.sink_dims_source == "calibrated on the same images" and plain.sink_dims == []
    assert not plain.visual_sink_share.any()


def test_vhr_and_act_read_the_heads_file(tmp_path):
    model, inputs = _model("llava")
    calib = calibrate_heads(model, testing.tiny_processor("llava"), _images(2), n=2, sink_dims=[TEXT_DIM])
    written = save_calibration_heads_json(calib, tmp_path / "heads.json", model="tiny:llava")
    path = written[0]
    saved = json.loads(path.read_text())
    assert saved["heads"] == {str(k): v for k, v in calib.selected().items()} and saved["heads"]
    assert len(saved["vhd"]) == LAYERS and len(saved["image_share"][0]) == calib.num_heads
    assert saved["sink_dims"] == [TEXT_DIM] and "median" in saved["rule"]
    vhr, act = VHR(heads=str(path)), ACT(heads=str(path))
    assert vhr.selected() == calib.selected() and act.config.heads == calib.selected()
    assert cli._make_methods("act", [f"act.heads={path}"])[0].config.heads == calib.selected()
    assert cli._make_methods("vhr", [f"vhr.heads={path}"])[0].selected() == calib.selected()
    with torch.no_grad():
        ref = model(**inputs).logits
    for method in (vhr, act):
        with attnkit.wrap(model, method), torch.no_grad():
            got = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3)
        assert out.shape[1] > inputs["input_ids"].shape[1]
        assert (got - ref).abs().max() > 1e-4, f"{method.name} with the file's heads changes the model"
    # the heat maps
    assert [p.name for p in written] == ["heads.json", "heads.png", "heads.image.png", "heads.sink.png"]
    for png in written[1:]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size == heatmap_size(LAYERS, calib.num_heads)


def test_act_heads_file_errors(tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text('{"heads": [1, 2]}')
    with pytest.raises(MethodArgumentError, match=f"act: heads file {bad}: key 'heads' must map layers"):
        ACT(heads=str(bad))
    bad.write_text('{"heads": {"x": [1]}}')
    with pytest.raises(MethodArgumentError, match="key 'heads': layer 'x' is not an integer"):
        ACT(heads=str(bad))
    bad.write_text('{"heads": {"1": [9]}}')
    with pytest.raises(MethodArgumentError, match=r"act: heads\[1\] entry 9 is out of range"):
        attnkit.wrap(_model("llava")[0], ACT(heads=str(bad)))


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(_images(3)):
        im.save(d / f"im{i}.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_cli_calibrate_end_to_end(tmp_path, image_dir, capsys):
    sinks = tmp_path / "sinks.json"
    assert cli.main(["calibrate", "sinks", "--model", "tiny:llava", "--images", str(image_dir), "-n", "2",
                     "--out", str(sinks)]) == 0
    out = capsys.readouterr().out
    assert "2 samples" in out and f"wrote {sinks}" in out
    saved = json.loads(sinks.read_text())
    assert saved["images"] == ["im0.png", "im1.png"] and saved["model"] == "tiny:llava"
    heads = tmp_path / "heads.json"
    assert cli.main(["calibrate", "heads", "--model", "tiny:llava", "--images", str(image_dir), "--sink-dims", "3,7",
                     "--out", str(heads), "--prompt", "What is shown?"]) == 0
    out = capsys.readouterr().out
    saved = json.loads(heads.read_text())
    assert saved["samples"] == 3 and saved["sink_dims"] == [3, 7] and saved["prompt"] == "What is shown?"
    assert (tmp_path / "heads.png").is_file() and "selected heads" in out
    assert VHR(heads=str(heads)).selected() == {int(k): v for k, v in saved["heads"].items()}


def test_cli_calibrate_errors(tmp_path, image_dir, capsys):
    cases = [
        (["sinks", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")], "image dir not found"),
        (["sinks", "--images", str(tmp_path), "--out", str(tmp_path / "s.json")], "holds no image file"),
        (["sinks", "--images", str(image_dir), "--out", str(tmp_path / "no" / "s.json")], "parent directory"),
        (["heads", "--images", str(image_dir), "--out", str(tmp_path / "h.json"), "--sink-dims",
          str(tmp_path / "missing.json")], "the path of a sinks JSON file (no file"),
        (["sinks", "--images", str(image_dir), "-n", "0", "--out", str(tmp_path / "s.json")], "-n 0"),
    ]
    for args, message in cases:
        assert cli.main(["calibrate", args[0], "--model", "tiny:llava", *args[1:]]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
