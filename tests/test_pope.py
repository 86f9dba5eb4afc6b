"""POPE: builder from COCO instances, both loaders, parser, metrics, task scoring and bad-input errors."""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from attnkit.errors import DataError
from attnkit.eval.pope import (
    DEFAULT_SUFFIX,
    PopeTask,
    build_pope,
    object_of,
    parse_answer,
    pope_metrics,
    pope_question,
)

CATS = ["person", "car", "dog", "cat", "apple", "kite", "boat", "umbrella", "bus", "cup", "oven", "tie"]
LINE = re.compile(r"^Is there (a|an) (.+) in the image\?$")


def write_instances(path: Path, n_images: int = 40, seed: int = 3) -> dict[str, set[str]]:
    """A COCO-format instances file with skewed category frequencies; returns file name -> categories."""
    rng = random.Random(seed)
    categories = [{"id": 10 + j, "name": name, "supercategory": "x"} for j, name in enumerate(CATS)]
    images, annotations, truth = [], [], {}
    for i in range(n_images):
        file_name = f"COCO_val2014_{i:012d}.jpg"
        images.append({"id": 1000 + i, "file_name": file_name, "width": 8, "height": 8})
        present = {j for j in range(len(CATS)) if rng.random() < 0.9 * 0.8**j}
        truth[file_name] = {CATS[j] for j in present}
        for j in sorted(present):
            for _ in range(rng.randint(1, 2)):  # repeated instances count once
                annotations.append({"id": len(annotations) + 1, "image_id": 1000 + i, "category_id": 10 + j,
                                    "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return truth


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_image(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        out[row["image"]].append(row)
    return out


def obj(row: dict) -> str:
    return LINE.match(row["text"]).group(2)


@pytest.fixture
def coco(tmp_path):
    path = tmp_path / "instances_val2014.json"
    truth = write_instances(path)
    return path, truth


@pytest.fixture
def built(tmp_path, coco):
    path, truth = coco
    out = tmp_path / "pope"
    files = build_pope(path, out, num_images=10, seed=0)
    return out, files, truth


# ----------------------------------------------------------------------------- builder


def test_build_writes_original_format(built):
    out, files, _ = built
    assert set(files) == {"random", "popular", "adversarial"}
    for split, path in files.items():
        assert path == out / f"coco_pope_{split}.json"
        rows = read_lines(path)
        assert len(rows) == 60
        for n, row in enumerate(rows, 1):
            assert list(row) == ["question_id", "image", "text", "label"]
            assert row["question_id"] == n
            m = LINE.match(row["text"])
            assert m, row["text"]
            assert m.group(1) == ("an" if m.group(2)[0] in "aeiou" else "a")
            assert row["label"] in ("yes", "no")
    record = json.loads((out / "coco_pope_build.json").read_text())
    assert record["seed"] == 0 and record["source"] == "coco"
    assert record["num_images"] == 10 and record["questions_per_image"] == 6
    assert record["splits"] == ["random", "popular", "adversarial"]
    images = list(by_image(read_lines(files["random"])))
    assert [f"COCO_val2014_{i - 1000:012d}.jpg" for i in record["image_ids"]] == images


def test_build_three_yes_three_no_per_image(built):
    _, files, truth = built
    positives = {}
    for split, path in files.items():
        groups = by_image(read_lines(path))
        assert len(groups) == 10
        for image, rows in groups.items():
            assert [r["label"] for r in rows] == ["yes", "no"] * 3
            yes = [obj(r) for r in rows if r["label"] == "yes"]
            no = [obj(r) for r in rows if r["label"] == "no"]
            assert len(truth[image]) >= 3, "only images with >= 3 categories may be chosen"
            assert set(yes) <= truth[image]
            assert not set(no) & truth[image], f"{split}: a negative is present in {image}"
            assert len(set(yes + no)) == 6
            positives.setdefault(image, yes)
            assert positives[image] == yes, "positives must be the same in every split"
    assert any(sorted(yes) != sorted(truth[image])[:3] for image, yes in positives.items()), "positives are drawn"


def test_build_popular_negatives_are_most_frequent_absent(built):
    _, files, truth = built
    freq = Counter(c for cs in truth.values() for c in cs)
    ranked = sorted(freq, key=lambda c: (-freq[c], c))
    for image, rows in by_image(read_lines(files["popular"])).items():
        expected = [c for c in ranked if c not in truth[image]][:3]
        assert [obj(r) for r in rows if r["label"] == "no"] == expected


def test_build_adversarial_negatives_are_most_cooccurring(built):
    _, files, truth = built
    cooc: dict[str, Counter] = defaultdict(Counter)
    for cs in truth.values():
        for a in cs:
            cooc[a].update(cs - {a})
    ranked_pairs = 0
    for image, rows in by_image(read_lines(files["adversarial"])).items():
        used = set(truth[image])
        for yes, no in zip(rows[::2], rows[1::2]):
            pos, neg = obj(yes), obj(no)
            candidates = [c for c in cooc[pos] if c not in used]
            if candidates:
                ranked_pairs += 1
                assert neg == min(candidates, key=lambda c: (-cooc[pos][c], c)), (image, pos)
            assert neg not in truth[image]
            used.add(neg)
    assert ranked_pairs >= 20  # the check above did run


def test_build_handmade_popular_and_adversarial(tmp_path):
    # person in 5 images, car and knife in 4, fork in 3 (always with knife), bird alone; no dog
    sets = [{"person", "car"}] * 4 + [{"person"}] + [{"fork", "knife"}] * 3 + [{"knife"}] + [{"bird"}]
    names = ["person", "car", "fork", "knife", "dog", "bird"]
    coco = {
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(len(sets))],
        "annotations": [{"id": 10 * i + names.index(c), "image_id": i, "category_id": names.index(c)}
                        for i, cs in enumerate(sets) for c in sorted(cs)],
    }
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(coco))
    files = build_pope(path, tmp_path / "out", num_images=len(sets), questions_per_image=2, seed=5)
    popular = by_image(read_lines(files["popular"]))["8.jpg"]
    adversarial = by_image(read_lines(files["adversarial"]))["8.jpg"]
    assert [(obj(r), r["label"]) for r in popular] == [("knife", "yes"), ("person", "no")]
    assert [(obj(r), r["label"]) for r in adversarial] == [("knife", "yes"), ("fork", "no")]
    random_no = [obj(r) for r in read_lines(files["random"]) if r["label"] == "no"]
    assert "dog" not in random_no, "a category no image has is never asked about"
    bird = by_image(read_lines(files["adversarial"]))["9.jpg"]  # nothing co-occurs with bird: random fallback
    assert bird[0]["label"] == "yes" and obj(bird[0]) == "bird" and obj(bird[1]) in {"person", "car", "fork", "knife"}
    alone = build_pope(path, tmp_path / "alone", num_images=len(sets), questions_per_image=2, seed=5,
                       splits="adversarial")
    assert alone["adversarial"].read_bytes() == files["adversarial"].read_bytes(), "splits must not share draws"


def test_build_is_deterministic_per_seed(tmp_path, coco):
    path, _ = coco
    a = build_pope(path, tmp_path / "a", num_images=10, seed=0)
    b = build_pope(path, tmp_path / "b", num_images=10, seed=0)
    c = build_pope(path, tmp_path / "c", num_images=10, seed=1)
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert (tmp_path / "a/coco_pope_build.json").read_text() == (tmp_path / "b/coco_pope_build.json").read_text()
    ids = [json.loads((tmp_path / d / "coco_pope_build.json").read_text())["image_ids"] for d in "ac"]
    assert ids[0] != ids[1]
    assert a["random"].read_bytes() != c["random"].read_bytes()
    only = build_pope(path, tmp_path / "d", num_images=10, seed=0, splits=("random",))
    assert set(only) == {"random"} and not (tmp_path / "d/coco_pope_popular.json").exists()
    assert only["random"].read_bytes() == a["random"].read_bytes(), "a split must not depend on the others"


def test_build_errors(tmp_path, coco):
    path, truth = coco
    eligible = sum(len(cs) >= 3 for cs in truth.values())
    with pytest.raises(DataError, match=rf"only {eligible} images have >= 3"):
        build_pope(path, tmp_path / "o", num_images=eligible + 1)
    with pytest.raises(DataError, match="not found: .*nope.json"):
        build_pope(tmp_path / "nope.json", tmp_path / "o")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n oops')
    with pytest.raises(DataError, match=r"bad.json, line 2: malformed JSON"):
        build_pope(bad, tmp_path / "o")
    data = json.loads(path.read_text())
    data["annotations"][3]["category_id"] = 999
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[3\] refers to unknown category_id 999"):
        build_pope(bad, tmp_path / "o")
    del data["categories"]
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError, match="missing field 'categories'"):
        build_pope(bad, tmp_path / "o")
    with pytest.raises(ValueError, match="even"):
        build_pope(path, tmp_path / "o", questions_per_image=5)
    with pytest.raises(DataError, match="unknown POPE source 'vg'"):
        build_pope(path, tmp_path / "o", source="vg")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- original-file loader


def test_load_original_files(built):
    out, files, _ = built
    task = PopeTask(out, splits=("all",))
    samples = task.load()
    assert len(samples) == 180
    assert len({s.id for s in samples}) == 180
    assert [s.meta["split"] for s in samples[::60]] == ["random", "popular", "adversarial"]
    rows = {split: read_lines(path) for split, path in files.items()}
    for s in samples:
        row = rows[s.meta["split"]][s.meta["question_id"] - 1]
        assert s.id == f"coco/{s.meta['split']}/{row['question_id']}"
        assert s.image == out / "images" / row["image"]
        assert s.question == row["text"] + " Please answer yes or no."
        assert s.label == row["label"]
        assert s.meta["object"] == obj(row) and s.meta["source"] == "coco"
    cfg = task.config()
    assert cfg["layout"] == "original" and cfg["splits"] == ["random", "popular", "adversarial"]
    assert cfg["files"]["popular"] == str(files["popular"])
    json.dumps(cfg)

    other = PopeTask(out, splits=("adversarial", "random"), image_dir="/imgs", suffix="")
    samples = other.load()
    assert [s.meta["split"] for s in samples[::60]] == ["adversarial", "random"]
    assert samples[0].image == Path("/imgs") / rows["adversarial"][0]["image"]
    assert samples[0].question == rows["adversarial"][0]["text"]


def test_load_seem_named_json_array_in_source_subdir(tmp_path):
    sub = tmp_path / "aokvqa"
    sub.mkdir()
    items = [{"question_id": 1, "image": "a.jpg", "text": "Is there an apple in the image?", "label": "yes"},
             {"question_id": 2, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "No"}]
    (sub / "aokvqa_pope_seem_popular.json").write_text(json.dumps(items, indent=4))
    samples = PopeTask(tmp_path, source="aokvqa", splits="popular").load()
    assert [s.id for s in samples] == ["aokvqa/popular/1", "aokvqa/popular/2"]
    assert [s.label for s in samples] == ["yes", "no"]
    assert [s.meta["object"] for s in samples] == ["apple", "dog"]
    assert samples[0].image == tmp_path / "images" / "a.jpg"


# ----------------------------------------------------------------------------- Hugging Face layout


def write_hf(root: Path, rows_per_split: int = 2, drop: str | None = None) -> None:
    """A local dataset laid out like lmms-lab/POPE: README configs + Full/{split}-*.parquet."""
    from datasets import Dataset, Features, Value
    from datasets import Image as HFImage

    names = ["id", "question_id", "question", "answer", "image_source", "image", "category"]
    feats = Features({n: HFImage() if n == "image" else Value("string") for n in names if n != drop})
    (root / "Full").mkdir(parents=True)
    for k, split in enumerate(["adversarial", "popular", "random"]):
        cols = {
            "id": [str(i) for i in range(rows_per_split)],
            "question_id": [str(i + 1) for i in range(rows_per_split)],
            "question": ["Is there a dog in the image?", "Is there an orange in the image?"][:rows_per_split],
            "answer": ["yes", "no"][:rows_per_split],
            "image_source": [f"COCO_val2014_{i:012d}" for i in range(rows_per_split)],
            "image": [Image.new("RGB", (6 + i, 4), (40 * k, 200, i)) for i in range(rows_per_split)],
            "category": [split] * rows_per_split,
        }
        cols.pop(drop, None)
        Dataset.from_dict(cols, features=feats).to_parquet(str(root / "Full" / f"{split}-00000-of-00001.parquet"))
    card = "---\nconfigs:\n- config_name: Full\n  data_files:\n"
    card += "".join(f"  - split: {s}\n    path: Full/{s}-*\n" for s in ["adversarial", "popular", "random"])
    (root / "README.md").write_text(card + "---\n")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_load_hf_layout_lazily(tmp_path, offline, monkeypatch):
    from datasets.features import image as image_feature

    write_hf(tmp_path / "POPE")
    decoded = []
    real = image_feature.Image.decode_example
    monkeypatch.setattr(image_feature.Image, "decode_example",
                        lambda self, value, **kw: decoded.append(1) or real(self, value, **kw))
    task = PopeTask(tmp_path / "POPE", splits="all")
    samples = task.load()
    assert decoded == [], "no image may be decoded by load()"
    assert [s.id for s in samples] == [f"coco/{s}/{q}" for s in ["random", "popular", "adversarial"] for q in "12"]
    first = samples[1]
    assert first.question == "Is there an orange in the image?" + DEFAULT_SUFFIX
    assert first.label == "no"
    assert first.meta == {"source": "coco", "split": "random", "question_id": "2", "object": "orange",
                          "image": "COCO_val2014_000000000001"}
    assert callable(first.image) and not isinstance(first.image, Image.Image)
    im = first.image()
    assert decoded == [1]
    assert isinstance(im, Image.Image) and im.size == (7, 4) and im.convert("RGB").getpixel((0, 0)) == (80, 200, 1)
    assert task.config()["layout"] == "hf"


def test_load_hf_layout_errors(tmp_path, offline):
    write_hf(tmp_path / "noanswer", drop="answer")
    with pytest.raises(DataError, match=r"noanswer \[Full/adversarial\]: missing field 'answer'"):
        PopeTask(tmp_path / "noanswer").load()
    write_hf(tmp_path / "empty", rows_per_split=0)
    with pytest.raises(DataError, match=r"empty \[Full/adversarial\]: empty split"):
        PopeTask(tmp_path / "empty").load()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"cannot load .*plain \[Full/adversarial\] as a Hugging Face dataset"):
        PopeTask(tmp_path / "plain").load()
    with pytest.raises(DataError, match="POPE data dir not found: .*missing"):
        PopeTask(tmp_path / "missing").load()


# ----------------------------------------------------------------------------- prompt and parser


def test_pope_question():
    assert pope_question("dog") == "Is there a dog in the image? Please answer yes or no."
    assert pope_question("apple", suffix="") == "Is there an apple in the image?"
    assert pope_question("tv", suffix="\nAnswer yes or no.") == "Is there a tv in the image?\nAnswer yes or no."
    assert object_of("Is there a dining table in the image?") == "dining table"
    assert object_of("Is there an traffic light in the image?") == "traffic light"
    assert object_of("Describe the image.") is None


@pytest.mark.parametrize("reply, expected", [
    ("No, there is not.", "no"),
    ("There isn't a dog.", "no"),
    ("There isn\u2019t a dog.", "no"),
    ("Yes.", "yes"),
    ("I can't tell", "no"),
    ("I cannot tell.", "no"),
    ("NO", "no"),
    ("There is no dog in the image.", "no"),
    ("There is a dog, not a cat.", "no"),
    ("Yes, there is a dog in the image.", "yes"),
    ("Yes. There is no cat.", "yes"),  # first sentence only
    ("Yes\nNo", "yes"),
    ("... No.", "no"),  # the first sentence with a word
    ("Notably, a knot is visible.", "yes"),  # whole words only
    ("", "unknown"),
    ("  \n ", "unknown"),
    ("?!", "unknown"),
])
def test_parse_answer(reply, expected):
    assert parse_answer(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("Yes.", "yes"),
    ("YES", "yes"),
    ("no", "no"),
    ("  **No**, there is not.", "no"),
    ("No, there is not.", "no"),
    ("There isn't a dog.", "unknown"),
    ("I can't tell", "unknown"),
    ("Yes and no.", "unknown"),
    ("Yes, there is no cat.", "unknown"),
    ("Yesterday it was there.", "unknown"),
    ("", "unknown"),
])
def test_parse_answer_strict(reply, expected):
    assert parse_answer(reply, strict=True) == expected


def test_task_parse_uses_strict_flag(tmp_path):
    assert PopeTask(tmp_path).parse("There isn't a dog.") == "no"
    assert PopeTask(tmp_path, strict=True).parse("There isn't a dog.") == "unknown"


@given(st.lists(st.sampled_from(["yes", "Yes", "no", "No", "not", "isn't", "dog", "the", ".", ",", "!", "\n", " "]),
                max_size=12))
def test_parse_answer_properties(tokens):
    text = " ".join(tokens)
    loose, strict = parse_answer(text), parse_answer(text, strict=True)
    has_word = any(t.strip(".,!\n ") for t in tokens)
    assert loose in (("yes", "no") if has_word else ("unknown",))
    assert strict in ("yes", "no", "unknown")
    if strict == "no":
        assert loose == "no"


# ----------------------------------------------------------------------------- metrics and scoring

LABELS = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "yes", "no"]
PREDS = ["yes", "yes", "no", "unknown", "yes", "no", "no", "unknown", "yes", "no"]
# TP = 3 (0, 1, 8), FN = 2 (2, and the unknown 3), FP = 1 (4), TN = 3 (5, 6, 9), unknown on a "no" (7) is wrong


def test_pope_metrics_by_hand():
    m = pope_metrics(PREDS, LABELS)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 2)
    assert m["n"] == 10 and m["unknown"] == 2
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(4 / 10)  # from the predictions; the labels' ratio is 0.5
    none_yes = pope_metrics(["no", "no"], ["yes", "no"])
    assert (none_yes["precision"], none_yes["f1"], none_yes["yes_ratio"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])


def records(split: str, preds: list[str], labels: list[str]) -> list[dict]:
    return [{"id": f"coco/{split}/{i}", "output": "", "parsed": p, "label": t, "meta": {"split": split}}
            for i, (p, t) in enumerate(zip(preds, labels), 1)]


def test_score_and_summary(tmp_path):
    task = PopeTask(tmp_path, splits=("random", "adversarial"))
    recs = records("adversarial", PREDS, LABELS) + records("random", ["yes", "no"] * 2, ["yes", "no"] * 2)
    recs[-1]["parsed"] = None
    recs[-1]["output"] = "No, there is not."  # parsed again when the record lacks it
    metrics = task.score(recs)
    assert list(metrics["splits"]) == ["random", "adversarial"]
    assert metrics["splits"]["adversarial"] == pope_metrics(PREDS, LABELS)
    assert metrics["splits"]["random"]["accuracy"] == 1.0
    avg = metrics["average"]
    assert avg["accuracy"] == pytest.approx((0.6 + 1) / 2)
    assert avg["precision"] == pytest.approx((0.75 + 1) / 2)
    assert avg["f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert avg["yes_ratio"] == pytest.approx((0.4 + 0.5) / 2)
    assert (avg["n"], avg["unknown"]) == (14, 2)
    json.dumps(metrics)
    lines = task.summary(metrics).splitlines()
    assert lines[0] == "| split | acc | precision | recall | f1 | yes_ratio | unknown |"
    assert lines[2] == "| random | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 0.5000 | 0 |"
    assert lines[3] == "| adversarial | 0.6000 | 0.7500 | 0.6000 | 0.6667 | 0.4000 | 2 |"
    assert lines[4] == "| average | 0.8000 | 0.8750 | 0.8000 | 0.8333 | 0.4500 | 2 |"
    with pytest.raises(DataError, match="meta.split"):
        task.score([{"id": "x", "parsed": "yes", "label": "yes", "meta": {}}])


# ----------------------------------------------------------------------------- bad input


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_source_and_split(tmp_path):
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path, source="vg").load()
    assert all(s in one_line(e) for s in ["'vg'", "coco", "aokvqa", "gqa"])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path, splits=("all", "hard")).load()
    assert all(s in one_line(e) for s in ["'hard'", "random", "popular", "adversarial", "all"])


ROW = {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}


def write_file(tmp_path: Path, lines: list[str], split: str = "adversarial") -> Path:
    path = tmp_path / f"coco_pope_{split}.json"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_missing_question_file(tmp_path):
    write_file(tmp_path, [json.dumps(ROW)], split="random")
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path, splits=("random", "popular")).load()
    assert one_line(e) == f"missing POPE question file {tmp_path / 'coco_pope_popular.json'}"
    with pytest.raises(DataError, match="coco_pope_adversarial.json"):
        PopeTask(tmp_path).load()


def test_malformed_json_line(tmp_path):
    path = write_file(tmp_path, [json.dumps(ROW), json.dumps({**ROW, "question_id": 2}), '{"question_id": 3,'])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path).load()
    assert one_line(e).startswith(f"{path}, line 3: malformed JSON line")


def test_line_missing_field(tmp_path):
    second = {k: v for k, v in ROW.items() if k != "label"} | {"question_id": 2}
    path = write_file(tmp_path, [json.dumps(ROW), json.dumps(second)])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path).load()
    assert one_line(e) == f"{path}, line 2: missing field 'label'"


def test_bad_label_and_duplicate_question_id(tmp_path):
    path = write_file(tmp_path, [json.dumps(ROW), json.dumps({**ROW, "question_id": 7, "label": "maybe"})])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path).load()
    assert one_line(e) == f"{path}, line 2: field 'label' must be 'yes' or 'no', got 'maybe' (question_id 7)"
    path = write_file(tmp_path, [json.dumps(ROW), "", json.dumps(ROW)])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path).load()
    assert one_line(e) == f"{path}, line 3: duplicate question_id 1"


def test_empty_question_file(tmp_path):
    path = write_file(tmp_path, [])
    with pytest.raises(DataError) as e:
        PopeTask(tmp_path).load()
    assert one_line(e) == f"POPE question file {path} is empty (no questions)"
