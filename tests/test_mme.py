"""MME: both layouts, the prompt, the official and lmms-eval parsers, scores worked out by hand, an
`attnkit eval --task mme` run on a tiny model, and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from attnkit import cli
from attnkit.errors import DataError
from attnkit.eval import get_task_class, list_tasks
from attnkit.eval.mme import (
    COGNITION,
    LLAVA_SUFFIX,
    PERCEPTION,
    SUBTASKS,
    MmeTask,
    mme_prompt,
    parse_lmms_eval,
    parse_official,
    resolve_subtasks,
    subtask_metrics,
)
from attnkit.eval.pope import parse_answer
from attnkit.eval.records import read_jsonl

ASK = " Please answer yes or no."
# subtask -> (images/ + questions_answers_YN/ layout?, [(stem, ext, colour, [(question, answer), ...])])
DATA: dict[str, tuple[bool, list[tuple[str, str, tuple[int, int, int], list[tuple[str, str]]]]]] = {
    "existence": (False, [
        ("000000006040", ".jpg", (200, 10, 10), [("Is there a train in this image?" + ASK, "Yes"),
                                                  ("Is there a bed in this image?" + ASK, "No")]),
        ("000000000139", ".jpg", (10, 200, 10), [("Is there a tv in this image?" + ASK, "Yes"),
                                                  ("Is there a dog in this image?" + ASK, "No")]),
    ]),
    "OCR": (False, [
        ("0001", ".jpg", (30, 30, 30), [("Is the word in the logo \"cafe\"?" + ASK, "Yes"),
                                         ("Is the word in the logo \"bar\"?" + ASK, "No")]),
    ]),
    "artwork": (True, [
        ("10002", ".jpg", (10, 10, 200), [("Does this artwork exist in the form of painting?" + ASK, "Yes"),
                                           ("Does this artwork exist in the form of glassware?" + ASK, "No")]),
        ("9405", ".jpg", (90, 90, 0), [("Is this artwork created by courbet, gustave?" + ASK, "No"),
                                        ("Is this artwork created by milani, aureliano?  Please answer yes or no.",
                                         "Yes")]),
    ]),
    "code_reasoning": (False, [
        ("0020", ".png", (250, 250, 250), [("Is a python code shown in the picture?" + ASK, "Yes"),
                                            ("Is a c++ code shown in the picture?" + ASK, "No")]),
    ]),
}
CHOSEN = "existence,OCR,artwork,code_reasoning"


def _image(colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (12, 8), colour)


def write_release(root: Path, data=DATA) -> Path:
    """The official release layout, with the Pillow images and ``<stem>.txt`` files of DATA."""
    for subtask, (split_dirs, images) in data.items():
        folder = root / subtask
        image_dir = folder / "images" if split_dirs else folder
        qa_dir = folder / "questions_answers_YN" if split_dirs else folder
        image_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        for stem, ext, colour, pairs in images:
            _image(colour).save(image_dir / f"{stem}{ext}")
            (qa_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
    return root


def write_hf(root: Path, data=DATA, drop: str | None = None, rows_filter=None) -> Path:
    """A local dataset laid out like lmms-lab/MME (data/test-*.parquet), rows in another order than
    the release loader's; question ids as in LLaVA's llava_mme.jsonl."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    rows = []
    for subtask, (split_dirs, images) in reversed(list(data.items())):
        for stem, ext, colour, pairs in reversed(images):
            qid = f"{subtask}/images/{stem}{ext}" if split_dirs else f"{subtask}/{stem}{ext}"
            for q, a in pairs:
                rows.append({"question_id": qid, "image": _image(colour), "question": q, "answer": a,
                             "category": subtask})
    if rows_filter is not None:
        rows = rows_filter(rows)
    names = [n for n in ("question_id", "image", "question", "answer", "category") if n != drop]
    feats = Features({n: HFImage() if n == "image" else Value("string") for n in names})
    cols = {n: [r[n] for r in rows] for n in names}
    (root / "data").mkdir(parents=True)
    Dataset.from_dict(cols, features=feats).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _view(samples):
    return [(s.id, s.question, s.label, s.meta) for s in samples]


# ----------------------------------------------------------------------------- loading


def test_release_layout_loads_pairs_in_order(tmp_path):
    root = write_release(tmp_path / "MME_Benchmark_release_version")
    task = MmeTask(root, subtasks=CHOSEN)
    samples = task.load()
    assert [s.id for s in samples] == [
        "existence/000000000139/0", "existence/000000000139/1", "existence/000000006040/0", "existence/000000006040/1",
        "artwork/10002/0", "artwork/10002/1", "artwork/9405/0", "artwork/9405/1",
        "OCR/0001/0", "OCR/0001/1", "code_reasoning/0020/0", "code_reasoning/0020/1",
    ]  # MME's subtask order, image names sorted, each file's line order
    art = samples[6]
    assert art.question == "Is this artwork created by courbet, gustave?" + LLAVA_SUFFIX
    assert samples[7].question == "Is this artwork created by milani, aureliano?" + LLAVA_SUFFIX  # two spaces
    assert (art.label, samples[7].label) == ("no", "yes")
    assert art.image == root / "artwork" / "images" / "9405.jpg"
    assert art.meta == {"subtask": "artwork", "image": "9405.jpg", "question_index": 0,
                        "question_id": "artwork/images/9405.jpg"}
    assert samples[10].image == root / "code_reasoning" / "0020.png"
    assert samples[10].meta["question_id"] == "code_reasoning/0020.png"
    assert task.config()["layout"] == "release" and task.config()["subtasks"] == ["existence", "artwork", "OCR",
                                                                                   "code_reasoning"]
    # the folder holding the release works too
    assert _view(MmeTask(tmp_path, subtasks=CHOSEN).load()) == _view(samples)


def test_both_layouts_load_the_same_samples(tmp_path, offline, monkeypatch):
    from datasets.features import image as image_feature

    release = MmeTask(write_release(tmp_path / "release"), subtasks=CHOSEN).load()
    write_hf(tmp_path / "MME")
    decoded = []
    real = image_feature.Image.decode_example
    monkeypatch.setattr(image_feature.Image, "decode_example",
                        lambda self, value, **kw: decoded.append(1) or real(self, value, **kw))
    task = MmeTask(tmp_path / "MME", subtasks=CHOSEN)
    hf = task.load()
    assert decoded == [], "no image may be decoded by load()"
    assert task.config()["layout"] == "hf"
    assert _view(hf) == _view(release)
    for a, b in zip(release, hf):
        assert callable(b.image) and not isinstance(b.image, Image.Image)
        with Image.open(a.image) as im:  # the same picture (JPEG in the release: within a few levels)
            got, want = b.image().convert("RGB").getpixel((3, 3)), im.convert("RGB").getpixel((3, 3))
            assert max(abs(x - y) for x, y in zip(got, want)) <= 3, (a.id, got, want)
    assert len(decoded) == len(hf)
    # subtasks not asked for are left out in both layouts
    only = MmeTask(tmp_path / "MME", subtasks="artwork").load()
    assert [s.id for s in only] == ["artwork/10002/0", "artwork/10002/1", "artwork/9405/0", "artwork/9405/1"]


def test_resolve_subtasks():
    assert resolve_subtasks("perception") == PERCEPTION and len(PERCEPTION) == 10
    assert resolve_subtasks("cognition") == COGNITION and len(COGNITION) == 4
    assert resolve_subtasks("all") == SUBTASKS
    assert resolve_subtasks("code_reasoning, ocr,existence,existence") == ("existence", "OCR", "code_reasoning")
    assert resolve_subtasks(["cognition", "Color"]) == ("color", *COGNITION)
    with pytest.raises(DataError, match=r"unknown MME subtask 'colour'; valid: perception, cognition, all, existence"):
        resolve_subtasks("existence,colour")
    with pytest.raises(DataError, match="no MME subtask given"):
        resolve_subtasks(" , ")


def test_prompt():
    q = "Is there a dog in this image? Please answer yes or no."
    assert mme_prompt(q) == "Is there a dog in this image?\nAnswer the question using a single word or phrase."
    assert mme_prompt(q, "") == q  # as released
    assert mme_prompt("Is there a dog?  Please answer yes or no. ", " Answer:") == "Is there a dog? Answer:"
    assert mme_prompt("Is there a dog?", " Yes or no?") == "Is there a dog? Yes or no?"  # no ending: appended


# ----------------------------------------------------------------------------- parsers


@pytest.mark.parametrize("reply, official, lmms", [
    ("Yes", "yes", "yes"),
    ("No", "no", "no"),
    ("yes.", "yes", "yes"),
    ("NO.", "no", "no"),
    ("Yes, there is no dog.", "yes", "yes"),  # only the first four characters count
    ("No, but yes", "no", "no"),
    ("Not really", "no", "no"),  # "no" inside "not "
    ("None", "no", "no"),
    ("Nyes", "yes", "yes"),  # "yes" is looked for before "no"
    ("The answer is yes", "other", "other"),
    ("There is a dog", "other", "other"),
    ("", "other", "other"),
    ("Y", "other", "yes"),  # lmms-eval only: a lone y / n
    ("n.", "other", "no"),
    ("..yes", "other", "yes"),  # lmms-eval drops every "."
    ("y es", "other", "other"),
])
def test_parsers(reply, official, lmms):
    assert parse_official(reply) == official
    assert parse_lmms_eval(reply) == lmms


def test_pope_parser_is_not_the_official_one():
    """Why MME has its own parser: POPE's reads the first sentence for a negation."""
    assert (parse_answer("The answer is yes."), parse_official("The answer is yes.")) == ("yes", "other")
    assert (parse_answer("Yes, there is no dog."), parse_official("Yes, there is no dog.")) == ("no", "yes")


def test_task_parse_follows_the_parser_option(tmp_path):
    assert MmeTask(tmp_path).parse("y") == "other"
    assert MmeTask(tmp_path, parser="lmms-eval").parse("y") == "yes"
    with pytest.raises(DataError, match="unknown MME parser 'loose'; valid: official, lmms-eval"):
        MmeTask(tmp_path, parser="loose")


# ----------------------------------------------------------------------------- scoring


def _rec(task, subtask, image, k, label, output):
    return {"id": f"{subtask}/{image}/{k}", "output": output, "parsed": task.parse(output), "label": label,
            "meta": {"subtask": subtask, "image": f"{image}.jpg", "question_index": k}}


def test_score_by_hand(tmp_path):
    task = MmeTask(tmp_path, subtasks="all")
    records = [
        # existence: a both right, b one of two right, c none right (one reply is neither yes nor no)
        _rec(task, "existence", "a", 0, "yes", "Yes"), _rec(task, "existence", "a", 1, "no", "No."),
        _rec(task, "existence", "b", 0, "yes", "Yes, there is."), _rec(task, "existence", "b", 1, "no", "Yes"),
        _rec(task, "existence", "c", 0, "yes", "There is a cat."), _rec(task, "existence", "c", 1, "no", "yes"),
        # count: both images both right
        _rec(task, "count", "d", 0, "no", "no"), _rec(task, "count", "d", 1, "yes", "yes"),
        _rec(task, "count", "e", 0, "yes", "Yes"), _rec(task, "count", "e", 1, "no", "Not at all"),
        # code_reasoning (cognition): one of two right
        _rec(task, "code_reasoning", "f", 0, "yes", "No"), _rec(task, "code_reasoning", "f", 1, "no", "no"),
    ]
    m = task.score(records)
    ex = m["subtasks"]["existence"]
    assert ex["questions"] == 6 and ex["images"] == 3 and ex["other"] == 1 and ex["incomplete_images"] == 0
    assert ex["acc"] == pytest.approx(3 / 6) and ex["acc_plus"] == pytest.approx(1 / 3)
    assert ex["score"] == pytest.approx(50 + 100 / 3)
    assert m["subtasks"]["count"] == {"acc": 1.0, "acc_plus": 1.0, "score": 200.0, "questions": 4, "images": 2,
                                      "incomplete_images": 0, "other": 0}
    code = m["subtasks"]["code_reasoning"]
    assert (code["acc"], code["acc_plus"], code["score"]) == (0.5, 0.0, 50.0)
    assert list(m["subtasks"]) == ["existence", "count", "code_reasoning"]  # MME's order
    assert m["perception"] == {"score": pytest.approx(250 + 100 / 3), "subtasks": 2, "max": 400}
    assert m["cognition"] == {"score": 50.0, "subtasks": 1, "max": 200}
    table = task.summary(m)
    assert "| existence | 50.00 | 33.33 | 83.33 | 1 |" in table
    assert "| count | 100.00 | 100.00 | 200.00 | 0 |" in table
    assert "| **perception** (2/10 subtasks) | | | **283.33** / 400 | |" in table
    assert "| **cognition** (1/4 subtasks) | | | **50.00** / 200 | |" in table
    # a group without scored subtasks is left out
    assert "cognition" not in task.score(records[:10]) and "perception" not in task.score(records[10:])


def test_full_marks_are_2000_and_800(tmp_path):
    task = MmeTask(tmp_path, subtasks="all")
    records = [_rec(task, s, f"img{i}", k, label, label.capitalize())
               for s in SUBTASKS for i in range(3) for k, label in enumerate(("yes", "no"))]
    m = task.score(records)
    assert m["perception"] == {"score": 2000.0, "subtasks": 10, "max": 2000}
    assert m["cognition"] == {"score": 800.0, "subtasks": 4, "max": 800}
    flipped = [dict(r, parsed="no" if r["label"] == "yes" else "yes") for r in records]
    assert task.score(flipped)["perception"]["score"] == 0.0


def test_image_with_one_question_scored_counts_in_acc_only():
    m = subtask_metrics([("a", "yes", "yes"), ("a", "no", "no"), ("b", "yes", "yes")])
    assert m["acc"] == 1.0 and m["acc_plus"] == 1.0 and m["images"] == 1 and m["incomplete_images"] == 1
    m = subtask_metrics([("b", "yes", "yes")])
    assert (m["acc"], m["acc_plus"], m["score"]) == (1.0, 0.0, 100.0)


def test_score_errors(tmp_path):
    task = MmeTask(tmp_path)
    good = _rec(task, "color", "a", 0, "yes", "Yes")
    with pytest.raises(DataError, match="no MME records"):
        task.score([])
    with pytest.raises(DataError, match=r"record 'color/a/0': meta.subtask must be an MME subtask, got 'colour'"):
        task.score([dict(good, meta=dict(good["meta"], subtask="colour"))])
    with pytest.raises(DataError, match=r"record 'color/a/0': label must be yes or no, got 'maybe'"):
        task.score([dict(good, label="maybe")])
    with pytest.raises(DataError, match=r"a second record for question 0 of image 'a.jpg'"):
        task.score([good, dict(good)])
    # a record without a stored parse is parsed from its output
    assert task.score([dict(good, parsed=None)])["subtasks"]["color"]["acc"] == 1.0


# ----------------------------------------------------------------------------- bad input


def test_release_layout_errors(tmp_path):
    root = write_release(tmp_path / "rel")
    with pytest.raises(DataError, match=r"missing MME subtask folder .*rel/count \(--subtasks"):
        MmeTask(root).load()  # perception needs all ten folders
    txt = root / "existence" / "000000006040.txt"
    txt.write_text("Is there a train in this image? Please answer yes or no. Yes\n"
                   "Is there a bed in this image? Please answer yes or no.\tNo\n")
    with pytest.raises(DataError, match=r"000000006040.txt, line 1: expected 'question<TAB>Yes\|No', found no tab"):
        MmeTask(root, subtasks="existence").load()
    txt.write_text("Is there a train?\tYes\n\nIs there a bed?\tMaybe\n")
    with pytest.raises(DataError, match=r"000000006040.txt, line 3: answer must be Yes or No, got 'Maybe'"):
        MmeTask(root, subtasks="existence").load()
    txt.write_text("Is there a train?\tyes \r\nIs there a bed?\tNO\r\n")  # any case, CRLF: accepted
    assert [s.label for s in MmeTask(root, subtasks="existence").load()][2:] == ["yes", "no"]
    txt.write_text("Is there a train?\tYes\nIs there a bed?\tNo\nIs there a cat?\tNo\n")
    with pytest.raises(DataError, match=r"000000006040.txt: expected 2 questions \(one pair per image\), found 3"):
        MmeTask(root, subtasks="existence").load()
    txt.write_text("Is there a train?\tYes\tNo\n")
    with pytest.raises(DataError, match=r"line 1: expected .*found 2 tabs"):
        MmeTask(root, subtasks="existence").load()
    txt.unlink()
    (root / "artwork" / "questions_answers_YN").rename(root / "artwork" / "qa")
    with pytest.raises(DataError, match=r"missing MME folder .*artwork/questions_answers_YN"):
        MmeTask(root, subtasks="artwork").load()
    (root / "code_reasoning" / "0020.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"several images for 0020: 0020.jpg, 0020.png"):
        MmeTask(root, subtasks="code_reasoning").load()
    with pytest.raises(DataError, match="MME data dir not found: .*nowhere"):
        MmeTask(tmp_path / "nowhere").load()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="MME data dir is not a directory"):
        MmeTask(tmp_path / "file.txt").load()


def test_missing_image_gets_the_folders_usual_suffix(tmp_path):
    root = write_release(tmp_path / "rel")
    (root / "code_reasoning" / "0020.png").unlink()
    (root / "existence" / "000000006040.jpg").unlink()
    samples = MmeTask(root, subtasks="existence,code_reasoning").load()
    assert samples[2].image == root / "existence" / "000000006040.jpg" and not samples[2].image.exists()
    assert samples[4].image == root / "code_reasoning" / "0020.jpg"  # no image left there: .jpg


def test_hf_layout_errors(tmp_path, offline):
    write_hf(tmp_path / "noanswer", drop="answer")
    with pytest.raises(DataError, match=r"noanswer \[test\]: missing field 'answer'"):
        MmeTask(tmp_path / "noanswer", subtasks=CHOSEN).load()
    write_hf(tmp_path / "cat", rows_filter=lambda rows: [dict(r, category="Colour") if i == 3 else r
                                                           for i, r in enumerate(rows)])
    with pytest.raises(DataError, match=r"cat \[test\]: row 3: unknown category 'Colour' \(question_id "):
        MmeTask(tmp_path / "cat", subtasks=CHOSEN).load()
    write_hf(tmp_path / "single", rows_filter=lambda rows: rows[1:])
    with pytest.raises(DataError, match=r"question_id 'code_reasoning/0020.png' has 1 questions, expected 2"):
        MmeTask(tmp_path / "single", subtasks=CHOSEN).load()
    write_hf(tmp_path / "maybe", rows_filter=lambda rows: [dict(rows[0], answer="Maybe"), *rows[1:]])
    with pytest.raises(DataError, match=r"row 0: field 'answer' must be Yes or No, got 'Maybe' "
                                        r"\(question_id 'code_reasoning/0020.png'\)"):
        MmeTask(tmp_path / "maybe", subtasks=CHOSEN).load()
    with pytest.raises(DataError, match=r"no questions of subtask 'color'"):
        MmeTask(tmp_path / "maybe", subtasks="color").load()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"plain holds neither the MME release layout .* nor a Hugging Face dataset"):
        MmeTask(tmp_path / "plain").load()
    (tmp_path / "plain" / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"cannot load .*plain as a Hugging Face dataset: "):
        MmeTask(tmp_path / "plain").load()


# ----------------------------------------------------------------------------- CLI


def _args(*argv: str):
    argv = ["eval", "--model", "tiny:llava", "--output", "unused", "--task", "mme", *argv]
    return cli.build_parser(argv).parse_args(argv)


def test_registered_with_its_flags(tmp_path):
    assert list_tasks()[:4] == ["pope", "chair", "grounding", "mme"] and get_task_class("mme") is MmeTask
    task = cli._make_task(_args("--data-dir", str(tmp_path), "--subtasks", "cognition", "--suffix", "none",
                                "--parser", "lmms-eval"))
    assert (task.subtasks, task.suffix, task.parser) == (COGNITION, "", "lmms-eval")
    task = cli._make_task(_args("--data-dir", str(tmp_path)))
    assert (task.subtasks, task.suffix, task.parser) == (PERCEPTION, LLAVA_SUFFIX, "official")
    with pytest.raises(Exception, match="mme: parser='loose' must be one of official, lmms-eval"):
        cli._make_task(_args("--data-dir", str(tmp_path), "--parser", "loose"))
    with pytest.raises(DataError, match="--task mme needs --data-dir"):
        cli._make_task(_args())


def _eval(*args: str) -> list[str]:
    return ["eval", "--model", "tiny:llava", "--task", "mme", "--max-new-tokens", "3", "--no-progress",
            "--batch-size", "4", *args]


def test_eval_cli_run_then_missing_image(tmp_path, capsys):
    root = write_release(tmp_path / "MME_Benchmark_release_version")
    out = tmp_path / "run"
    assert cli.main(_eval("--data-dir", str(tmp_path), "--subtasks", "existence,artwork,code_reasoning",
                          "--output", str(out))) == 0
    printed = capsys.readouterr().out
    assert "| existence |" in printed and "**perception** (2/10 subtasks)" in printed
    results = json.loads((out / "results.json").read_text())
    records = read_jsonl(out / "samples.jsonl")
    assert results["counts"]["scored"] == 10 == len(records) and results["config"]["task"]["layout"] == "release"
    assert all(r["prompt"].endswith("?" + LLAVA_SUFFIX) and r["parsed"] in ("yes", "no", "other") for r in records)
    assert all(r["parsed"] == parse_official(r["output"]) for r in records)
    m = results["metrics"]
    assert list(m["subtasks"]) == ["existence", "artwork", "code_reasoning"]
    for name, sub in m["subtasks"].items():
        mine = [r for r in records if r["meta"]["subtask"] == name]
        assert sub["questions"] == len(mine)
        assert sub["acc"] == pytest.approx(sum(r["parsed"] == r["label"] for r in mine) / len(mine))
        assert sub["other"] == sum(r["parsed"] == "other" for r in mine)
    assert m["perception"]["score"] == pytest.approx(m["subtasks"]["existence"]["score"]
                                                     + m["subtasks"]["artwork"]["score"])
    assert m["cognition"]["score"] == pytest.approx(m["subtasks"]["code_reasoning"]["score"])
    # a missing image: one line naming the question and the file; --skip-missing skips its two questions
    (root / "artwork" / "images" / "9405.jpg").rename(tmp_path / "moved.jpg")
    base = ["--data-dir", str(root), "--subtasks", "artwork", "--output", str(tmp_path / "miss")]
    assert cli.main(_eval(*base)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error: question artwork/9405/0: image file not found: ") and "\n" not in err
    assert err.endswith("artwork/images/9405.jpg (and 1 more; --skip-missing skips them)")
    assert cli.main(_eval(*base, "--skip-missing")) == 0
    results = json.loads((tmp_path / "miss" / "results.json").read_text())
    assert results["counts"]["skipped_missing_image"] == 2 and results["counts"]["scored"] == 2
    assert results["missing_images"] == ["artwork/9405/0", "artwork/9405/1"]
    assert results["metrics"]["subtasks"]["artwork"]["images"] == 1
