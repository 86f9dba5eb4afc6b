"""The eval runner: batched generation, samples.jsonl / results.json, resume, bad input, no lost lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import testing
from attnkit.errors import DataError, OutputError
from attnkit.eval.base import Sample, Task
from attnkit.eval.records import read_jsonl
from attnkit.eval.runner import RunSettings, run_task

from .conftest import _tiny

QUESTIONS = ["Is there a dog in the image?", "Is there a car?", "Describe the image.", "Is there a person?",
             "What colour is it?"]


class EchoTask(Task):
    """Every question of QUESTIONS on its own drawn image; the metric counts outputs and sums their lengths."""

    name = "echo"
    default_max_new_tokens = 4

    def __init__(self, directory: Path, n: int = 5) -> None:
        self.directory = directory
        self.n = n

    def load(self) -> list[Sample]:
        samples = []
        for i, image in enumerate(testing.sample_images(self.n, seed=3)):
            path = self.directory / f"img{i}.png"
            if not path.exists():
                image.save(path)
            samples.append(Sample(f"q{i}", path, QUESTIONS[i % len(QUESTIONS)], label=i % 2, meta={"i": i}))
        return samples

    def parse(self, output: str) -> int:
        return len(output)

    def score(self, records: list[dict]) -> dict:
        return {"n": len(records), "chars": sum(r["parsed"] for r in records),
                "ids": [r["id"] for r in records]}


def _run(tmp_path: Path, out: str = "out", family: str = "llava", methods=(), **kw):
    model, _ = _tiny(family)
    processor = testing.tiny_processor(family)
    settings = RunSettings(progress=False, **kw)
    return run_task(EchoTask(tmp_path), model, processor, list(methods), tmp_path / out, settings,
                    model_id=f"tiny:{family}", print_summary=False)


def _outputs(path: Path) -> dict[str, str]:
    return {r["id"]: r["output"] for r in read_jsonl(path / "samples.jsonl")}


def test_run_writes_samples_and_results(tmp_path):
    results = _run(tmp_path, batch_size=2)
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == [f"q{i}" for i in range(5)]
    assert set(records[0]) >= {"id", "prompt", "output", "parsed", "label", "meta"}
    assert records[2]["prompt"] == QUESTIONS[2] and records[3]["label"] == 1 and records[4]["meta"] == {"i": 4}
    assert all(r["parsed"] == len(r["output"]) for r in records)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["metrics"]["n"] == 5 and saved["model"] == "tiny:llava"
    assert saved["counts"]["scored"] == 5 and saved["counts"]["generated_this_run"] == 5
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["config"]["run"]["batch_size"] == 2 and saved["config"]["run"]["max_new_tokens"] == 4
    assert saved["seed"] == 0 and saved["timing"]["seconds_this_run"] > 0


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_batched_outputs_equal_one_at_a_time(tmp_path, family):
    _run(tmp_path, "b1", family=family, batch_size=1)
    _run(tmp_path, "b4", family=family, batch_size=4)
    one, four = _outputs(tmp_path / "b1"), _outputs(tmp_path / "b4")
    assert one == four and len(one) == 5


def test_methods_are_applied_and_recorded(tmp_path):
    results = _run(tmp_path, methods=[attnkit.make_method("identity")])
    assert results["methods"] == [{"name": "identity", "config": {}}]
    _run(tmp_path, "plain")
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "plain")  # identity changes nothing
    model, _ = _tiny("llava")
    assert not hasattr(model, "_attnkit_handle")  # unwrapped after the run


def test_resume_continues_without_duplicates(tmp_path):
    _run(tmp_path, "full", batch_size=2)
    _run(tmp_path, "part", batch_size=2, limit=3)
    assert len(_outputs(tmp_path / "part")) == 3
    results = _run(tmp_path, "part", batch_size=2, resume=True)
    ids = [r["id"] for r in read_jsonl(tmp_path / "part" / "samples.jsonl")]
    assert sorted(ids) == [f"q{i}" for i in range(5)]  # none lost, none twice
    assert _outputs(tmp_path / "part") == _outputs(tmp_path / "full")
    assert results["counts"]["from_previous_runs"] == 3 and results["counts"]["generated_this_run"] == 2
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert results["metrics"] == full["metrics"]


def test_torn_last_line_is_redone(tmp_path):
    _run(tmp_path, "full")
    _run(tmp_path, "torn", limit=2)
    path = tmp_path / "torn" / "samples.jsonl"
    with open(path, "a") as f:
        f.write('{"id": "q2", "prompt": "Is th')  # killed mid-write
    results = _run(tmp_path, "torn", resume=True)
    records = read_jsonl(path)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(5)]
    assert results["metrics"] == json.loads((tmp_path / "full" / "results.json").read_text())["metrics"]


def test_existing_run_needs_resume_and_matching_settings(tmp_path):
    _run(tmp_path, limit=1)
    before = (tmp_path / "out" / "samples.jsonl").read_bytes()
    with pytest.raises(OutputError, match="already holds a run.*--resume"):
        _run(tmp_path)
    with pytest.raises(OutputError, match="different max_new_tokens"):
        _run(tmp_path, resume=True, max_new_tokens=7)
    with pytest.raises(OutputError, match="different methods"):
        _run(tmp_path, resume=True, methods=[attnkit.make_method("identity")])
    assert (tmp_path / "out" / "samples.jsonl").read_bytes() == before


def test_malformed_line_in_log_names_file_and_line(tmp_path):
    _run(tmp_path, limit=2)
    path = tmp_path / "out" / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{oops\n" + lines[1])
    with pytest.raises(DataError, match=r"samples.jsonl line 2: invalid JSON"):
        _run(tmp_path, resume=True)


def test_missing_image_names_question_and_path(tmp_path):
    EchoTask(tmp_path).load()
    (tmp_path / "img3.png").unlink()

    class Missing(EchoTask):
        def load(self):
            samples = super().load()
            (self.directory / "img3.png").unlink(missing_ok=True)
            return samples

    model, _ = _tiny("llava")
    processor = testing.tiny_processor("llava")
    with pytest.raises(DataError, match=r"question q3: image file not found: .*img3.png"):
        run_task(Missing(tmp_path), model, processor, [], tmp_path / "out", RunSettings(progress=False))
    assert not (tmp_path / "out" / "samples.jsonl").exists()
    results = run_task(Missing(tmp_path), model, processor, [], tmp_path / "out2",
                       RunSettings(progress=False, skip_missing=True), print_summary=False)
    assert results["counts"]["skipped_missing_image"] == 1 and results["missing_images"] == ["q3"]
    assert results["metrics"]["ids"] == ["q0", "q1", "q2", "q4"]


def test_corrupt_image_stops_with_one_line_and_keeps_written_lines(tmp_path):
    task = EchoTask(tmp_path)
    task.load()
    (tmp_path / "img2.png").write_bytes(b"not a png at all")
    model, _ = _tiny("llava")
    processor = testing.tiny_processor("llava")
    with pytest.raises(DataError, match=r"question q2: cannot read image .*img2.png"):
        run_task(task, model, processor, [], tmp_path / "out", RunSettings(progress=False, batch_size=1))
    assert [r["id"] for r in read_jsonl(tmp_path / "out" / "samples.jsonl")] == ["q0", "q1"]


def test_empty_dataset_and_bad_settings(tmp_path):
    class Empty(EchoTask):
        def load(self):
            return []

    model, _ = _tiny("llava")
    with pytest.raises(DataError, match="dataset is empty"):
        run_task(Empty(tmp_path), model, None, [], tmp_path / "out", RunSettings(progress=False))
    with pytest.raises(DataError, match="--batch-size must be >= 1"):
        RunSettings(batch_size=0)


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model, _ = _tiny("llava")
    with pytest.raises(OutputError, match=r"output dir .*file/out is not writable"):
        run_task(EchoTask(tmp_path), model, None, [], blocker / "out", RunSettings(progress=False))


def test_sampling_is_opt_in_and_seeded(tmp_path):
    _run(tmp_path, "greedy", max_new_tokens=6)
    _run(tmp_path, "s1", max_new_tokens=6, do_sample=True, temperature=2.0, seed=1)
    _run(tmp_path, "s1b", max_new_tokens=6, do_sample=True, temperature=2.0, seed=1)
    _run(tmp_path, "s2", max_new_tokens=6, do_sample=True, temperature=2.0, seed=2)
    assert _outputs(tmp_path / "s1") == _outputs(tmp_path / "s1b")
    assert _outputs(tmp_path / "s1") != _outputs(tmp_path / "s2")
    assert _outputs(tmp_path / "s1") != _outputs(tmp_path / "greedy")
    run = json.loads((tmp_path / "s1" / "run.json").read_text())
    assert run["generation"] == {"do_sample": True, "temperature": 2.0}
    with pytest.raises(DataError, match="need --do-sample"):
        RunSettings(temperature=0.5)
    with pytest.raises(DataError, match="need --do-sample"):
        RunSettings(top_k=0)
    with pytest.raises(DataError, match="--top-k must be an integer >= 0"):
        RunSettings(do_sample=True, top_k=-1)


def test_top_k_reaches_generate(tmp_path):
    """top_k=1 samples the most likely token only: the same output as greedy, whatever the seed; top_k=0 keeps
    every token (no filter), so high-temperature sampling leaves greedy."""
    _run(tmp_path, "greedy", max_new_tokens=6)
    _run(tmp_path, "k1", max_new_tokens=6, do_sample=True, temperature=5.0, top_k=1, seed=3)
    _run(tmp_path, "k0", max_new_tokens=6, do_sample=True, temperature=5.0, top_k=0, seed=3)
    assert _outputs(tmp_path / "k1") == _outputs(tmp_path / "greedy")
    assert _outputs(tmp_path / "k0") != _outputs(tmp_path / "greedy")
    run = json.loads((tmp_path / "k0" / "run.json").read_text())
    assert run["generation"] == {"do_sample": True, "temperature": 5.0, "top_k": 0}
