"""`attnkit eval` end to end: POPE/CHAIR/grounding runs, SIGKILL + resume, 2-process accelerate, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnkit import cli, testing
from attnkit.eval.pope import build_pope
from attnkit.eval.records import read_jsonl

CATEGORIES = testing.COCO_TEST_CATEGORIES
_write_coco = testing.write_coco


@pytest.fixture
def pope_dir(tmp_path) -> Path:
    """Original-format POPE files for 3 splits x 4 images x 6 questions, images in data/images."""
    ann = _write_coco(tmp_path / "coco")
    data = tmp_path / "data"
    build_pope(ann / "instances_val2014.json", data, num_images=4, seed=1)
    shutil.copytree(tmp_path / "coco" / "val2014", data / "images")
    return data


def _eval(*args: str) -> list[str]:
    return ["eval", "--model", "tiny:llava", "--max-new-tokens", "3", "--no-progress", *args]


def _metrics(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["metrics"]


def test_pope_cli_run(tmp_path, pope_dir, capsys):
    out = tmp_path / "run"
    assert cli.main(_eval("--task", "pope", "--split", "all", "--data-dir", str(pope_dir), "--output", str(out),
                          "--batch-size", "4", "--method", "identity")) == 0
    printed = capsys.readouterr().out
    assert "average" in printed and "adversarial" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]["splits"]) == {"random", "popular", "adversarial"}
    assert results["counts"]["scored"] == 72 and results["methods"][0]["name"] == "identity"
    assert results["config"]["cli"]["task"] == "pope" and results["model"] == "tiny:llava"
    records = read_jsonl(out / "samples.jsonl")
    assert len(records) == 72 and len({r["id"] for r in records}) == 72
    assert all(r["parsed"] in ("yes", "no", "unknown") and r["label"] in ("yes", "no") for r in records)
    unknown = sum(r["parsed"] == "unknown" for r in records)
    assert results["metrics"]["average"]["unknown"] == unknown
    assert records[0]["prompt"].endswith("in the image? Please answer yes or no.")


def test_chair_and_grounding_cli_runs(tmp_path):
    ann = _write_coco(tmp_path / "coco")
    out = tmp_path / "chair"
    assert cli.main(_eval("--task", "chair", "--annotations", str(ann), "--num-images", "3",
                          "--output", str(out))) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"CHAIR_s", "CHAIR_i", "Recall", "Len"} <= set(results["metrics"])
    assert len(json.loads((out / "image_ids.json").read_text())) == 3
    assert len(read_jsonl_any(out / "chair_per_caption.jsonl")) == 3
    out = tmp_path / "ground"
    assert cli.main(_eval("--task", "grounding", "--annotations", str(ann), "--layers", "0-1",
                          "--output", str(out))) == 0
    metrics = _metrics(out)
    assert metrics["n"] == 6 and 0 <= metrics["pointing_accuracy"] <= 100


@pytest.mark.parametrize("kill_after", [0, 20])
def test_sigkill_then_resume_gives_the_same_results(tmp_path, pope_dir, kill_after):
    """SIGKILL right after the run starts (no sample yet) or mid-run; --resume ends with the same results."""
    args = _eval("--task", "pope", "--split", "all", "--data-dir", str(pope_dir), "--batch-size", "1")
    args[args.index("--max-new-tokens") + 1] = "24"  # slow enough to be killed mid-run
    assert cli.main([*args, "--output", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "attnkit.cli", *args, "--output", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = killed / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if kill_after == 0 and (killed / "run.json").exists():
            break
        if kill_after and log.exists() and log.read_bytes().count(b"\n") >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_jsonl(log))
    assert before < 72 and (kill_after == 0 or before >= kill_after)
    assert cli.main([*args, "--output", str(killed), "--resume"]) == 0
    ids = [r["id"] for r in read_jsonl(log)]
    assert len(ids) == 72 and len(set(ids)) == 72
    assert _metrics(killed) == _metrics(tmp_path / "whole")
    whole = {r["id"]: r["output"] for r in read_jsonl(tmp_path / "whole" / "samples.jsonl")}
    assert {r["id"]: r["output"] for r in read_jsonl(log)} == whole
    results = json.loads((killed / "results.json").read_text())
    assert results["counts"]["from_previous_runs"] == before


def test_two_process_accelerate_run_equals_one_process(tmp_path, pope_dir):
    accelerate = Path(sys.executable).parent / "accelerate"
    args = _eval("--task", "pope", "--split", "adversarial,popular", "--data-dir", str(pope_dir),
                 "--batch-size", "2")
    assert cli.main([*args, "--output", str(tmp_path / "one")]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnkit.cli", *args,
         "--output", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["run"]["processes"] == 2
    assert two["metrics"] == _metrics(tmp_path / "one")
    one_records = {r["id"]: r["output"] for r in read_jsonl(tmp_path / "one" / "samples.jsonl")}
    two_records = read_jsonl(tmp_path / "two" / "samples.jsonl")
    assert [r["id"] for r in two_records] == list(one_records)  # merged back in dataset order
    assert {r["id"]: r["output"] for r in two_records} == one_records
    assert not (tmp_path / "two" / "shards").exists()


def test_two_process_bad_input_stops_every_rank(tmp_path, pope_dir):
    """A missing image under accelerate: every rank stops with the one-line error, none hangs at a barrier."""
    first = json.loads((pope_dir / "coco_pope_adversarial.json").read_text().splitlines()[0])
    (pope_dir / "images" / first["image"]).unlink()
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attnkit.cli",
         *_eval("--task", "pope", "--data-dir", str(pope_dir), "--output", str(tmp_path / "two"))],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert proc.stderr.count(f"attnkit: error: question coco/adversarial/{first['question_id']}") == 2
    assert not (tmp_path / "two" / "samples.jsonl").exists()


# -- bad input: one line, exit 2, no traceback, nothing written lost ------------------------------
def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("attnkit: error: ")
    for n in needles:
        assert n in err, err


def test_bad_input_errors(tmp_path, pope_dir, capsys):
    out = str(tmp_path / "out")
    base = ["--data-dir", str(pope_dir), "--output", out]

    def check(args, *needles):
        code = cli.main(_eval(*args))
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and err.startswith("attnkit: error: "), err
        for n in needles:
            assert n in err, err

    check(["--task", "vqa", *base], "unknown task 'vqa'", "pope, chair, grounding")
    check(["--task", "pope", "--source", "flickr", *base], "flickr", "coco, aokvqa, gqa")
    check(["--task", "pope", "--split", "hard", *base], "hard", "random, popular, adversarial")
    check(["--task", "pope", "--method", "nope", *base], "unknown method 'nope'", "identity")
    check(["--task", "pope", "--method", "identity", "--method-arg", "p=2", *base], "unknown argument 'p'")
    check(["--task", "pope", "--method-arg", "p=2", *base], "no --method given")
    check(["--task", "pope", "--method", "var", "--method-arg", "p=2", *base], "var: p=2 is out of range")
    check(["--task", "pope", "--method", "var,pai", "--method-arg", "pai.alpha=-1", *base], "pai: alpha=-1")
    check(["--task", "pope", "--batch-size", "0", *base], "--batch-size must be >= 1")
    # malformed JSON line: file and line number
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (pope_dir / "coco_pope_adversarial.json").read_text().splitlines()
    lines[2] = lines[2][:-3]
    (bad / "coco_pope_adversarial.json").write_text("\n".join(lines) + "\n")
    check(["--task", "pope", "--data-dir", str(bad), "--output", out], "coco_pope_adversarial.json", "line 3")
    # empty dataset
    (bad / "coco_pope_adversarial.json").write_text("")
    check(["--task", "pope", "--data-dir", str(bad), "--output", out], "empty")
    # missing image: names the question id and the path; --skip-missing counts it
    first = json.loads(lines[0])
    (pope_dir / "images" / first["image"]).rename(tmp_path / "moved.jpg")
    check(["--task", "pope", *base], f"question coco/adversarial/{first['question_id']}", first["image"])
    assert cli.main(_eval("--task", "pope", "--skip-missing", *base)) == 0
    results = json.loads((Path(out) / "results.json").read_text())
    assert results["counts"]["skipped_missing_image"] == 6 and results["counts"]["scored"] == 18
    # corrupt image
    (pope_dir / "images" / first["image"]).write_bytes(b"\x89PNG garbage")
    check(["--task", "pope", "--output", str(tmp_path / "o2"), "--data-dir", str(pope_dir)],
          "cannot read image", first["image"])
    # output dir not writable (a path under a regular file) and an existing run without --resume
    check(["--task", "pope", "--data-dir", str(pope_dir), "--output", str(tmp_path / "moved.jpg" / "x")],
          "not writable")
    before = (Path(out) / "samples.jsonl").read_bytes()
    check(["--task", "pope", *base], "already holds a run", "--resume")
    assert (Path(out) / "samples.jsonl").read_bytes() == before
    # CHAIR: annotations missing for an image id (scorer), and an unknown task arg through a subprocess
    ann = _write_coco(tmp_path / "coco2")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"image_id": 1, "caption": "A dog."}) + "\n"
                    + json.dumps({"image_id": 999, "caption": "A cat."}) + "\n")
    proc = _run_cli(["chair", str(caps), "--annotations", str(ann)])
    _one_line_error(proc, "999", "line 2")
    proc = _run_cli(["eval", "--model", "tiny:llava", "--task", "pope", "--split", "nope", *base])
    _one_line_error(proc, "nope")


def test_chair_scorer_cli(tmp_path, capsys):
    ann = _write_coco(tmp_path / "coco")
    caps = tmp_path / "caps.jsonl"
    rows = [{"image_id": 1, "caption": CATEGORIES_CAPTION[0]}, {"image_id": 2, "caption": CATEGORIES_CAPTION[1]}]
    caps.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["chair", str(caps), "--annotations", str(ann)]) == 0
    printed = capsys.readouterr().out
    assert "CHAIR_s" in printed and "CHAIR_i" in printed and "Recall" in printed
    per = read_jsonl_any(tmp_path / "caps.chair.jsonl")
    assert [p["image_id"] for p in per] == [1, 2]


CATEGORIES_CAPTION = ["A dog and a cat next to a car.", "A bus."]


def read_jsonl_any(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_build_pope_cli(tmp_path, capsys):
    ann = _write_coco(tmp_path / "coco")
    out = tmp_path / "pope"
    assert cli.main(["build-pope", str(ann / "instances_val2014.json"), "--output", str(out), "--num-images", "3",
                     "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    for split in ("random", "popular", "adversarial"):
        assert f"{split}: " in printed
        lines = (out / f"coco_pope_{split}.json").read_text().splitlines()
        assert len(lines) == 18 and {json.loads(x)["label"] for x in lines} == {"yes", "no"}
    assert json.loads((out / "coco_pope_build.json").read_text())["seed"] == 4
    assert cli.main(["build-pope", str(ann / "instances_val2014.json"), "--output", str(out),
                     "--questions-per-image", "5"]) == 2
    assert "questions_per_image must be an even number" in capsys.readouterr().err
    assert cli.main(["build-pope", str(tmp_path / "nope.json"), "--output", str(out)]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_method_args_go_to_the_methods_that_have_them():
    var, pai = cli._make_methods("var,pai", ["pai.alpha=0.5", "start_layer=3"])
    assert (var.name, pai.name) == ("var", "pai")
    assert pai.config.alpha == 0.5 and var.config.p == 0.6  # qualified: pai only
    assert var.config.start_layer == 3 and pai.config.start_layer == 3  # bare: every method with the field
    assert cli._make_methods("none", []) == [] and cli._make_methods(None, []) == []


def test_icd_by_name_gets_the_runners_processor(tmp_path, pope_dir, monkeypatch):
    """`attnkit eval --method icd` works without token ids: the runner hands ICD its processor
    (Method.use_processor) before wrap(), and ICD tokenises its instruction with it."""
    from attnkit.methods import ICD

    seen = []
    original = ICD.use_processor

    def spy(self, processor):
        original(self, processor)
        seen.append(list(self.ids))

    monkeypatch.setattr(ICD, "use_processor", spy)
    out = tmp_path / "run"
    assert cli.main(_eval("--task", "pope", "--split", "random", "--data-dir", str(pope_dir), "--output", str(out),
                          "--batch-size", "4", "--limit", "4", "--method", "icd")) == 0
    assert len(seen) == 1 and len(seen[0]) > 3
    assert json.loads((out / "results.json").read_text())["counts"]["scored"] == 4
