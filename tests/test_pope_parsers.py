"""POPE answer parsers of each paper's script, their metrics, and the task's --parser option.

Every expected verdict below was worked out by hand from the scripts named in
``attnkit.eval.pope.PARSERS`` (RUCAIBox/POPE evaluate.py, shikiw/OPERA pope_eval.py,
DAMO-NLP-SG/VCD experiments/eval/eval_pope.py, p1k0pan/ICD experiments/eval_scripts/eval_pope.py).
"""

from __future__ import annotations

import json

import pytest

from attnkit.errors import DataError
from attnkit.eval.pope import (
    LEFT_OUT,
    PARSERS,
    PopeTask,
    format_summary,
    parse_answer,
    pope_metrics,
    score_answers_file,
)

Y, N, U, L = "yes", "no", "unknown", LEFT_OUT

# text, attnkit, official, opera, icd, vcd on a yes question, vcd on a no question
CASES = [
    ("", U, Y, Y, L, N, Y),  # official/opera: no negation word -> yes; vcd: no "yes" (FN) / no "no" (FP)
    ("NO", N, Y, N, L, N, N),  # official and icd are case-sensitive: "NO" is not a negation word
    ("No!", N, Y, Y, L, N, N),  # the word is "No!", not "No"; only attnkit drops punctuation
    ("isn't", N, Y, N, L, N, Y),  # n't counts for attnkit and opera only; "isn't" holds no "no"
    ("I don't know", N, Y, N, L, N, N),  # vcd: "know" contains "no"
    ("Yes. There is no dog.", Y, Y, N, Y, Y, N),  # first sentence only, except opera (and vcd)
    ("snow", Y, Y, Y, L, N, N),  # vcd: "snow" contains "no"
    ("Yes, there is a cat.", Y, Y, Y, Y, Y, Y),
    ("no", N, N, N, N, N, N),
    ("There is not a dog.", N, N, N, N, N, N),
    ("Not really.", N, Y, Y, L, N, N),  # "Not" is not "not" for the scripts; vcd: "not" contains "no"
    ("There isn\u2019t a dog.", N, Y, Y, L, N, Y),  # a typographic apostrophe: not "n't" for opera
    ("Yes\nNo", Y, Y, Y, L, Y, N),  # the scripts split on spaces only: one word "Yes\nNo"
    ("Yes, no.", N, N, N, N, Y, N),  # commas are deleted before the split
]
NAMES = ("attnkit", "official", "opera", "icd")


@pytest.mark.parametrize("case", CASES, ids=[repr(c[0]) for c in CASES])
def test_each_parser_on_hand_made_answers(case):
    text, *expected = case
    for name, want in zip(NAMES, expected[:4]):
        for label in ("yes", "no"):  # these four do not look at the label
            assert PARSERS[name](text, label) == want, (name, text, label)
        assert PARSERS[name](text) == want, (name, text)
    assert PARSERS["vcd"](text, "yes") == expected[4], ("vcd", text, "yes")
    assert PARSERS["vcd"](text, "no") == expected[5], ("vcd", text, "no")
    assert PARSERS["vcd"](text, " No ") == expected[5], "labels are read as the script reads them: lower, strip"


def test_attnkit_parser_is_parse_answer():
    for text, *_ in CASES:
        assert PARSERS["attnkit"](text) == parse_answer(text)


def test_parser_protocol():
    assert list(PARSERS) == ["attnkit", "official", "opera", "vcd", "icd"]
    assert [n for n, p in PARSERS.items() if p.needs_label] == ["vcd"]
    for name, p in PARSERS.items():
        assert p.name == name and p.rule and p.papers
        assert name == "attnkit" or p.scripts, "each paper's parser names the script it follows"
    # vcd: the reading is label-free, the verdict needs the label
    vcd = PARSERS["vcd"]
    assert [vcd.read(t) for t in ("Yes", "No", "yes, no", "maybe")] == ["yes_only", "no_only", "both", "neither"]
    assert vcd.verdict("both", "yes") == "yes" and vcd.verdict("both", "no") == "no"
    assert vcd.verdict("neither", "no") == "yes" and vcd.verdict("yes", "no") == "unknown"  # not a vcd reading
    with pytest.raises(ValueError, match="needs the question's label"):
        vcd("Yes")
    with pytest.raises(ValueError, match="'maybe'"):
        vcd("Yes", "maybe")
    # the other parsers' reading is their verdict
    for name in NAMES:
        assert PARSERS[name].verdict(PARSERS[name].read("No."), "yes") == "no"


# ----------------------------------------------------------------------------- metrics per parser

ANSWERS = [  # (answer, label): the first ten CASES
    ("", "yes"), ("NO", "no"), ("No!", "no"), ("isn't", "no"), ("I don't know", "yes"),
    ("Yes. There is no dog.", "no"), ("snow", "no"), ("Yes, there is a cat.", "yes"), ("no", "yes"),
    ("There is not a dog.", "no"),
]
# counted by hand from the CASES table: (tp, fp, tn, fn, unknown, left_out, accuracy, precision, recall, f1, yes_ratio)
EXPECTED = {
    # verdicts U N N N N Y Y Y N N: TP #8; FP #6 #7; TN #2 #3 #4 #10; FN #5 #9 and the unknown #1
    "attnkit": (1, 2, 4, 3, 1, 0, 5 / 10, 1 / 3, 1 / 4, 2 / 7, 3 / 10),
    # Y Y Y Y Y Y Y Y N N: TP #1 #5 #8; FP #2 #3 #4 #6 #7; TN #10; FN #9
    "official": (3, 5, 1, 1, 0, 0, 4 / 10, 3 / 8, 3 / 4, 1 / 2, 8 / 10),
    # Y N Y N N N Y Y N N: TP #1 #8; FP #3 #7; TN #2 #4 #6 #10; FN #5 #9
    "opera": (2, 2, 4, 2, 0, 0, 6 / 10, 1 / 2, 1 / 2, 1 / 2, 4 / 10),
    # by the label: FN #1 #5 #9; TN #2 #3 #6 #7 #10; FP #4; TP #8
    "vcd": (1, 1, 5, 3, 0, 0, 6 / 10, 1 / 2, 1 / 4, 1 / 3, 2 / 10),
    # L L L L L Y L Y N N: six left out; FP #6, TP #8, FN #9, TN #10; accuracy over the four
    # counted, yes ratio over all ten answers (ICD's script divides by len(pred_list))
    "icd": (1, 1, 1, 1, 0, 6, 2 / 4, 1 / 2, 1 / 2, 1 / 2, 2 / 10),
}


def write_answers(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", list(EXPECTED))
def test_metrics_of_a_hand_made_answers_file(tmp_path, name):
    answers = write_answers(tmp_path / "answers.jsonl", [{"question_id": i, "text": t, "label": lab}
                                                         for i, (t, lab) in enumerate(ANSWERS, 1)])
    metrics, written = score_answers_file(answers, parser=name)
    m = metrics["splits"]["all"]
    tp, fp, tn, fn, unknown, left_out, acc, prec, rec, f1, yes = EXPECTED[name]
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unknown"], m["left_out"], m["n"]) == \
        (tp, fp, tn, fn, unknown, left_out, 10)
    assert m["accuracy"] == pytest.approx(acc)
    assert m["precision"] == pytest.approx(prec)
    assert m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(f1)
    assert m["yes_ratio"] == pytest.approx(yes)
    assert metrics["average"]["accuracy"] == pytest.approx(acc) and metrics["average"]["left_out"] == left_out
    assert metrics["parser"] == name
    per = [json.loads(line) for line in written.read_text().splitlines()]
    assert [p["question_id"] for p in per] == list(range(1, 11))
    assert [p["verdict"] for p in per] == [PARSERS[name](t, lab) for t, lab in ANSWERS]


def test_pope_metrics_left_out():
    m = pope_metrics(["yes", LEFT_OUT, "no", LEFT_OUT], ["yes", "yes", "yes", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["left_out"], m["unknown"]) == (1, 0, 0, 1, 2, 0)
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.25
    everything = pope_metrics([LEFT_OUT], ["yes"])
    assert (everything["accuracy"], everything["recall"], everything["left_out"]) == (0.0, 0.0, 1)


def test_summary_shows_left_out_only_when_there_is_some():
    plain = {"splits": {"random": pope_metrics(["yes"], ["yes"])}, "average": pope_metrics(["yes"], ["yes"])}
    assert "left_out" not in format_summary(plain)
    assert format_summary(plain, left_out=True).splitlines()[2].endswith("| 0 | 0 |")
    some = pope_metrics(["yes", LEFT_OUT], ["yes", "no"])
    lines = format_summary({"splits": {"random": some}, "average": some}).splitlines()
    assert lines[0].endswith("| unknown | left_out |") and lines[2].endswith("| 0 | 1 |")


# ----------------------------------------------------------------------------- the task's --parser


def records(rows, split="adversarial"):
    return [{"id": f"coco/{split}/{i}", "output": t, "label": lab, "meta": {"split": split}}
            for i, (t, lab) in enumerate(rows, 1)]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_scores_with_its_parser(tmp_path, name):
    task = PopeTask(tmp_path, parser=name)
    recs = records(ANSWERS)
    for r in recs:  # what the runner stores: the label-free reading
        r["parsed"] = task.parse(r["output"])
    m = task.score(recs)["splits"]["adversarial"]
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["unknown"], m["left_out"]) == EXPECTED[name][:6]
    again = task.score(records(ANSWERS))  # no "parsed": read from the output
    assert again["splits"]["adversarial"] == m
    assert task.config()["parser"] == name and json.dumps(task.config())
    assert ("left_out" in task.summary(again)) == (name == "icd")


def test_task_stores_vcd_readings_and_judges_them_with_the_label(tmp_path):
    task = PopeTask(tmp_path, parser="vcd")
    assert task.parse("There is no dog, I know.") == "no_only"
    rec = {"id": "coco/random/1", "output": "snow", "parsed": "no_only", "label": "no", "meta": {"split": "random"}}
    assert task.verdict(rec) == "no" and task.verdict(rec | {"label": "yes"}) == "no"
    assert task.verdict(rec | {"parsed": "neither"}) == "yes"
    with pytest.raises(DataError, match=r"record 'coco/random/1': label must be 'yes' or 'no', got 'maybe'"):
        task.verdict(rec | {"label": "maybe"})


def test_task_parser_options(tmp_path):
    assert PopeTask(tmp_path).parser == "attnkit" and PopeTask(tmp_path).config()["parser"] == "attnkit"
    assert PopeTask(tmp_path, parser="official").parse("NO") == "yes"
    assert PopeTask(tmp_path, strict=True).parse("There isn't a dog.") == "unknown"
    with pytest.raises(DataError, match="--strict applies to the attnkit parser only, not to --parser opera"):
        PopeTask(tmp_path, parser="opera", strict=True)
    with pytest.raises(DataError, match="unknown POPE parser 'llava'; valid: attnkit, official, opera, vcd, icd"):
        PopeTask(tmp_path, parser="llava")


def test_testbed_pope_takes_the_parser_and_counts_false_yes_by_verdict():
    from attnkit.eval.pope import PopeOptions
    from attnkit.testbed.tasks import testbed_task

    task = testbed_task("pope", PopeOptions(parser="vcd"))
    assert task.parser == "vcd" and task.config()["parser"] == "vcd"
    # an absent partner answered "isn't": no "no" in it, so vcd counts a false yes; attnkit reads no
    recs = [{"id": "a", "output": "isn't", "label": "no", "meta": {"split": "adversarial", "absent": "partner"}},
            {"id": "b", "output": "Yes", "label": "yes", "meta": {"split": "adversarial"}}]
    for r in recs:
        r["parsed"] = task.parse(r["output"])  # as the runner stores it: vcd's reading, "neither"
    assert recs[0]["parsed"] == "neither"
    assert task.score(recs)["splits"]["adversarial"]["false_yes_partner"] == 1.0
    plain = testbed_task("pope", PopeOptions())
    assert plain.score([{k: v for k, v in r.items() if k != "parsed"} for r in recs]
                       )["splits"]["adversarial"]["false_yes_partner"] == 0.0
