"""scripts/bench_width.py, the real-width benchmark, run end to end on a tiny shape: every configuration
runs, the planted sinks put VAR on its path, pruning shortens the caches it should, and the hand-written
decode steps it times are the decode steps generate() runs."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_width.py"


@pytest.fixture(scope="module")
def bw():
    spec = importlib.util.spec_from_file_location("attnkit_bench_width", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_run_on_a_tiny_shape(bw, tmp_path, capsys):
    out = tmp_path / "res.json"
    argv = ["--shapes", "tiny", "--layouts", "617", "--prune-shape", "tiny", "--repeats", "1", "--new-tokens", "2",
            "--dtype", "float32", "--memory-shapes", "tiny", "--json", str(out)]
    assert bw.main(argv) == 0
    res = json.loads(out.read_text())
    (rewrite,) = res["rewrite"]
    assert list(rewrite["rows"]) == bw.REWRITE
    for kind, row in rewrite["rows"].items():
        for key in ("prefill_b1", "decode_b1", "prefill_b8", "decode_b8", "memory"):
            assert math.isfinite(row[key]) and row[key] > 0, (kind, key, row[key])
    prune = res["prune"]["rows"]
    assert list(prune) == bw.PRUNE
    full = prune["sdpa"]["kv_b8"]
    assert full[0] == full[1] > 2928
    # FastV k=1 and PyramidDrop's one stage keep layer 0 whole and halve the image tokens of layer 1
    for kind in ("fastv", "pdrop"):
        assert prune[kind]["kv_b8"][0] == full[0] and prune[kind]["kv_b8"][1] == full[1] - 2928 // 2
        assert prune[kind]["pruned_layers"] == [1]
    # the vision-side methods shorten every layer
    for kind in ("visionzip", "hiprune"):
        assert all(n < f for n, f in zip(prune[kind]["kv_b8"], full)) and prune[kind]["pruned_layers"] == [0, 1]
    text = capsys.readouterr().out
    assert "#### pruning, tiny, 2969-token prompt, batch 8" in text and "| VAR |" in text


@pytest.mark.parametrize("kind", ["sdpa", "var", "pai-cfg", "icd", "fastv"])
def test_decode_steps_are_generates(bw, kind):
    """The steps the benchmark times give the logits generate() gives for the same tokens (batch 8, left padding)."""
    args = type("A", (), dict(layers=2, text_tokens=40, dtype="float32"))()
    base, inputs1 = bw.build_base(args, "tiny", "617")
    inputs8 = bw.batch_inputs(inputs1, 8)
    assert (inputs8["attention_mask"].sum(1) == torch.tensor([617 - 2 * r for r in range(8)])).all()
    config = bw.Config(kind, base, 2, [inputs1, inputs8])
    try:
        with torch.no_grad():
            gen = config.model.generate(**inputs8, max_new_tokens=3, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
        tokens = gen.sequences[:, -3:]
        config.prefill(inputs8)
        for i in range(2):
            logits = config.step(tokens[:, i : i + 1])
            torch.testing.assert_close(logits, gen.logits[i + 1], atol=1e-4, rtol=1e-4)
    finally:
        config.close()
