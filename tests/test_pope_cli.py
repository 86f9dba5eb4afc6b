"""`attnkit pope` (score answers made elsewhere) end to end, its bad-input errors, and `attnkit eval
--task pope --parser` (recorded in results.json, not mixed on --resume)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit import cli, testing
from attnkit.errors import DataError
from attnkit.eval.pope import build_pope, score_answers_file

SPLITS = ("random", "popular", "adversarial")


def write_questions(folder: Path, split: str, labels: list[str], source: str = "coco") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{source}_pope_{split}.json"
    path.write_text("".join(json.dumps({"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog in the image?",
                                        "label": lab}) + "\n" for i, lab in enumerate(labels, 1)))
    return path


def write_answers(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def qdir(tmp_path) -> Path:
    """Three split files numbered 1..N each, as POPE's: random 4 questions, popular 4, adversarial 2."""
    folder = tmp_path / "questions"
    write_questions(folder, "random", ["yes", "no", "yes", "no"])
    write_questions(folder, "popular", ["yes", "no", "no", "yes"])
    write_questions(folder, "adversarial", ["no", "yes"])
    (folder / "coco_pope_build.json").write_text("{}")  # the builder's record is not a question file
    return folder


def per_answer(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- scoring


def test_cli_end_to_end_with_a_questions_dir(tmp_path, qdir, capsys):
    rows = [{"question_id": 1, "split": "random", "text": "Yes, there is a dog."},
            {"question_id": 2, "split": "random", "text": "No, there is not."},
            {"question_id": 3, "split": "random", "text": "NO"},
            {"question_id": 1, "split": "popular", "text": "Yes."},
            {"question_id": 2, "split": "popular", "text": "There isn't a dog."},
            {"question_id": 2, "category": "adversarial", "text": "no"}]  # LLaVA's name for the split
    answers = write_answers(tmp_path / "answers.jsonl", rows)
    before = answers.read_bytes()
    assert cli.main(["pope", str(answers), "--questions", str(qdir), "--parser", "official"]) == 0
    out = capsys.readouterr().out
    assert "parser official" in out and "| split | acc | precision | recall | f1 | yes_ratio | unknown |" in out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "---" not in line][1:] == \
        ["| random", "| popular", "| adversarial", "| average"]
    assert "questions without an answer: random 1, popular 2, adversarial 1" in out
    written = tmp_path / "answers.pope.jsonl"
    assert f"per-answer results: {written}" in out
    assert answers.read_bytes() == before
    per = per_answer(written)
    assert [(p["question_id"], p["split"], p["label"], p["verdict"]) for p in per] == [
        (1, "random", "yes", "yes"), (2, "random", "no", "no"), (3, "random", "yes", "yes"),  # "NO" is yes here
        (1, "popular", "yes", "yes"), (2, "popular", "no", "yes"), (2, "adversarial", "yes", "no")]
    assert per[2]["answer"] == "NO"

    assert cli.main(["pope", str(answers), "--questions", str(qdir), "--json",
                     "--output", str(tmp_path / "o.jsonl")]) == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout is one JSON object
    assert metrics["parser"] == "attnkit" and list(metrics["splits"]) == list(SPLITS)
    assert metrics["unanswered"] == {"random": 1, "popular": 2, "adversarial": 1}
    assert metrics["questions"]["random"] == str(qdir / "coco_pope_random.json")
    r = metrics["splits"]["random"]  # attnkit: "NO" on a yes question is no
    assert (r["tp"], r["fp"], r["tn"], r["fn"], r["n"]) == (1, 0, 1, 1, 3)
    p = metrics["splits"]["popular"]  # "There isn't a dog." is no for attnkit
    assert (p["tp"], p["tn"], p["accuracy"]) == (1, 1, 1.0)
    assert metrics["average"]["accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["average"]["n"] == 6
    assert [x["verdict"] for x in per_answer(tmp_path / "o.jsonl")] == ["yes", "no", "no", "yes", "no", "no"]


def test_one_question_file_needs_no_split(tmp_path, qdir):
    answers = write_answers(tmp_path / "a.jsonl", [{"id": 2, "answer": "Yes"}, {"id": "1", "answer": "No"}])
    metrics, written = score_answers_file(answers, qdir / "coco_pope_adversarial.json", answer_key="answer")
    assert list(metrics["splits"]) == ["adversarial"] and metrics["unanswered"] == {"adversarial": 0}
    assert [(p["question_id"], p["label"], p["verdict"]) for p in per_answer(written)] == \
        [(2, "yes", "yes"), ("1", "no", "no")]
    assert metrics["splits"]["adversarial"]["accuracy"] == 1.0


def test_an_id_in_one_file_only_needs_no_split(tmp_path, qdir):
    answers = write_answers(tmp_path / "a.jsonl", [{"question_id": 4, "text": "yes"}])  # not in adversarial
    with pytest.raises(DataError, match="in several question files"):
        score_answers_file(answers, qdir)  # random and popular both have 4
    metrics, _ = score_answers_file(answers, [qdir / "coco_pope_random.json", qdir / "coco_pope_adversarial.json"])
    assert list(metrics["splits"]) == ["random"] and metrics["splits"]["random"]["fp"] == 1


def test_labels_in_the_lines_without_question_files(tmp_path):
    rows = [{"question_id": 1, "text": "Yes", "label": "yes", "split": "random"},
            {"question_id": 1, "text": "No", "label": 0, "split": "popular"},  # PAI writes 1/0 labels
            {"question_id": 2, "text": "Yes", "label": "No", "split": "popular"}]
    metrics, written = score_answers_file(write_answers(tmp_path / "a.jsonl", rows))
    assert list(metrics["splits"]) == ["random", "popular"] and "unanswered" not in metrics
    assert metrics["splits"]["popular"]["fp"] == 1 and metrics["splits"]["popular"]["tn"] == 1
    assert [p["label"] for p in per_answer(written)] == ["yes", "no", "no"]
    no_split = write_answers(tmp_path / "b.jsonl", [{"question_id": 1, "text": "Yes", "label": "yes"}])
    assert list(score_answers_file(no_split)[0]["splits"]) == ["all"]


def test_icd_json_list_answers(tmp_path, qdir):
    """ICD's generator writes one JSON list with an "answer" field; its script leaves out answers with neither word."""
    answers = tmp_path / "normal.json"
    answers.write_text(json.dumps([{"question_id": 1, "answer": "Yes, there is."},
                                   {"question_id": 2, "answer": "I see a dog"}]))
    metrics, _ = score_answers_file(answers, qdir / "coco_pope_popular.json", parser="icd", answer_key="answer")
    m = metrics["splits"]["popular"]
    assert (m["n"], m["left_out"], m["tp"], m["accuracy"], m["yes_ratio"]) == (2, 1, 1, 1.0, 0.5)


def test_rescore_an_attnkit_run_with_another_parser(tmp_path):
    """samples.jsonl of `attnkit eval` has the label and meta.split in each line: --answer-key output."""
    rows = [{"id": "coco/random/1", "prompt": "p", "output": "NO", "parsed": "no", "label": "no",
             "meta": {"split": "random", "question_id": 1}},
            {"id": "coco/random/2", "prompt": "p", "output": "Yes", "parsed": "yes", "label": "yes",
             "meta": {"split": "random", "question_id": 2}}]
    samples = write_answers(tmp_path / "samples.jsonl", rows)
    metrics, written = score_answers_file(samples, parser="official", answer_key="output")
    assert written == tmp_path / "samples.pope.jsonl"
    assert [p["verdict"] for p in per_answer(written)] == ["yes", "yes"]
    assert metrics["splits"]["random"]["fp"] == 1


# ----------------------------------------------------------------------------- bad input


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "attnkit.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


BAD = [
    # (answers lines, extra args, what the one-line error must name)
    (['{"question_id": 1, "split": "random", "text": "Yes"}', '{"question_id": 2, "text": '],
     [], ["line 2", "malformed JSON"]),
    (['{"split": "random", "text": "Yes"}'], [], ["line 1", "missing field 'question_id' (or 'id')"]),
    (['{"question_id": 1, "split": "random", "text": "Yes"}',
      '{"question_id": 3, "split": "random", "answer": "No"}'],
     [], ["line 2", "missing answer field 'text'", "question_id 3"]),
    (['{"question_id": 1, "split": "random", "text": null}'], [],
     ["line 1", "'text' must be a string", "question_id 1"]),
    (['{"question_id": 9, "split": "random", "text": "Yes"}'], [],
     ["line 1", "question_id 9 is not in", "coco_pope_random.json"]),
    (['{"question_id": 1, "split": "hard", "text": "Yes"}'], [],
     ["line 1", "split 'hard' has no question file", "question_id 1"]),
    (['{"question_id": 1, "text": "Yes"}'], [],
     ["line 1", "question_id 1 is in several question files", "'split' field"]),
    (['{"question_id": 1, "split": "random", "text": "Yes", "label": "maybe"}'], [],
     ["line 1", "field 'label' must be 'yes' or 'no'", "'maybe'", "question_id 1"]),
    (['{"question_id": 2, "split": "random", "text": "Yes", "label": "yes"}'], [],
     ["line 1", "label 'yes' differs from 'no'", "question_id 2"]),
    (['{"question_id": 1, "split": "random", "text": "Yes"}', '',
      '{"question_id": 1, "split": "random", "text": "No"}'],
     [], ["line 3", "a second answer to question_id 1 of split 'random'", "the first at line 1"]),
    (['{"question_id": 1, "text": "Yes"}'], ["no-questions"], ["line 1", "no label for question_id 1", "--questions"]),
    ([], [], ["no answers (empty file)"]),
]


@pytest.mark.parametrize("lines, extra, needles", BAD, ids=[b[2][-1] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, qdir, capsys, lines, extra, needles):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(line + "\n" for line in lines))
    before = answers.read_bytes()
    old = tmp_path / "answers.pope.jsonl"
    old.write_text("an earlier result\n")
    args = ["pope", str(answers)] + ([] if "no-questions" in extra else ["--questions", str(qdir)])
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("attnkit: error: ") and "\n" not in err and "Traceback" not in err, err
    assert captured.out == ""
    for n in [str(answers), *needles]:
        assert n in err, err
    assert answers.read_bytes() == before and old.read_text() == "an earlier result\n"


def test_bad_input_through_the_console_has_no_traceback(tmp_path, qdir):
    answers = write_answers(tmp_path / "answers.jsonl", [{"question_id": 5, "split": "popular", "text": "Yes"}])
    proc = run_cli(["pope", str(answers), "--questions", str(qdir)])
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err == f"attnkit: error: {answers}, line 1: question_id 5 is not in {qdir / 'coco_pope_popular.json'}"
    assert not (tmp_path / "answers.pope.jsonl").exists()
    proc = run_cli(["pope", str(answers), "--parser", "llava"])
    assert proc.returncode == 2 and "invalid choice: 'llava'" in proc.stderr and "Traceback" not in proc.stderr


def test_output_may_not_overwrite_an_input(tmp_path, qdir, capsys):
    answers = write_answers(tmp_path / "answers.jsonl", [{"question_id": 1, "split": "random", "text": "Yes"}])
    before = answers.read_bytes()
    questions = qdir / "coco_pope_random.json"
    kept = questions.read_bytes()
    for target in (answers, questions):
        assert cli.main(["pope", str(answers), "--questions", str(qdir), "--output", str(target)]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert answers.read_bytes() == before and questions.read_bytes() == kept
    assert cli.main(["pope", str(answers), "--questions", str(qdir), "--output", str(tmp_path / "no" / "x.jsonl")]) == 2
    assert "cannot write POPE results" in capsys.readouterr().err
    assert cli.main(["pope", str(tmp_path / "nope.jsonl")]) == 2
    assert "POPE answers file not found" in capsys.readouterr().err
    assert cli.main(["pope", str(answers), "--questions", str(tmp_path / "none")]) == 2
    assert "POPE question file not found" in capsys.readouterr().err


def test_two_question_files_of_one_split(tmp_path, qdir):
    other = write_questions(tmp_path / "aokvqa", "random", ["yes"], source="aokvqa")
    answers = write_answers(tmp_path / "a.jsonl", [{"question_id": 1, "split": "random", "text": "Yes"}])
    with pytest.raises(DataError, match=r"both hold split 'random'; score them one at a time"):
        score_answers_file(answers, [qdir, other])


# ----------------------------------------------------------------------------- attnkit eval --parser


@pytest.fixture
def pope_run_dir(tmp_path) -> Path:
    ann = testing.write_coco(tmp_path / "coco")
    data = tmp_path / "data"
    build_pope(ann / "instances_val2014.json", data, num_images=2, seed=1, splits="adversarial")
    shutil.copytree(tmp_path / "coco" / "val2014", data / "images")
    return data


def test_eval_parser_is_recorded_and_not_mixed_on_resume(tmp_path, pope_run_dir, capsys):
    out = tmp_path / "run"
    base = ["eval", "--model", "tiny:llava", "--max-new-tokens", "3", "--no-progress", "--task", "pope",
            "--data-dir", str(pope_run_dir), "--output", str(out), "--limit", "4"]
    assert cli.main([*base, "--parser", "icd"]) == 0
    assert "left_out" in capsys.readouterr().out  # icd's summary says how many were left out
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["task"]["parser"] == "icd" and results["config"]["cli"]["parser"] == "icd"
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    m = results["metrics"]["splits"]["adversarial"]
    assert m["left_out"] == sum(r["parsed"] == "left_out" for r in records) and m["n"] == 4
    before = (out / "samples.jsonl").read_bytes()
    assert cli.main([*base, "--resume", "--limit", "6"]) == 2  # the default parser is attnkit: another run
    err = capsys.readouterr().err
    assert "different task" in err and "'parser': 'icd'" in err and "\n" not in err.strip()
    assert (out / "samples.jsonl").read_bytes() == before
    assert cli.main([*base, "--resume", "--limit", "6", "--parser", "icd"]) == 0
    assert json.loads((out / "results.json").read_text())["counts"]["scored"] == 6
    assert cli.main([*base, "--parser", "nope"]) == 2
    assert "pope: parser='nope' must be one of attnkit, official, opera, vcd, icd" in capsys.readouterr().err
