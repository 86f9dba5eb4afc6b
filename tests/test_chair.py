"""CHAIR: singularizer, mention rules, metrics, cached ground truth, score_file, ChairTask (tiny COCO files)."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.errors import DataError, OutputError
from attnkit.eval import chair
from attnkit.eval.chair import (
    ChairTask,
    extract_mentions,
    format_summary,
    load_ground_truth,
    score_captions,
    score_file,
    singularize,
)
from attnkit.eval.chair_words import SURFACE_TO_CATEGORY, SYNONYMS

# ----------------------------------------------------------------------------- tiny COCO

CATEGORIES = {1: "person", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 16: "bird", 17: "cat",
              18: "dog", 22: "elephant", 25: "giraffe", 58: "hot dog", 62: "chair", 67: "dining table",
              70: "toilet", 74: "mouse", 88: "teddy bear"}
INSTANCES = [(1, 1), (1, 18), (1, 67), (1, 18), (2, 70), (3, 22), (4, 6), (6, 88), (6, 58)]  # (image, category)
CAPTIONS = [
    (1, "A man sits at a table with his dog."),
    (2, "A white toilet in a small bathroom."),
    (3, "A baby elephant walking next to its mother."),  # mother: person from the captions only
    (4, "A double decker bus on the street."),
    (5, "A cat sleeping on a sofa."),  # image 5 has no instances: cat and couch from the captions
    (6, "A teddy bear next to a hot dog."),
]
IMAGE_IDS = [1, 2, 3, 4, 5, 6, 7]  # 7: neither instances nor captions (empty ground truth)
EXPECTED_GT = {1: {"person", "dog", "dining table"}, 2: {"toilet"}, 3: {"elephant", "person"}, 4: {"bus"},
               5: {"cat", "couch"}, 6: {"teddy bear", "hot dog"}, 7: set()}


def file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def write_coco(ann_dir: Path, captions: list[tuple[int, str]] = CAPTIONS, split: str = "val2014") -> None:
    ann_dir.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": file_name(i), "width": 640, "height": 480} for i in IMAGE_IDS]
    instances = {
        "images": images,
        "categories": [{"id": k, "name": v, "supercategory": "x"} for k, v in CATEGORIES.items()],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 10, 10], "area": 100,
                         "iscrowd": 0} for n, (i, c) in enumerate(INSTANCES, 1)],
    }
    caps = {"images": images,
            "annotations": [{"id": n, "image_id": i, "caption": t} for n, (i, t) in enumerate(captions, 1)]}
    (ann_dir / f"instances_{split}.json").write_text(json.dumps(instances))
    (ann_dir / f"captions_{split}.json").write_text(json.dumps(caps))


@pytest.fixture
def coco(tmp_path) -> Path:
    ann = tmp_path / "annotations"
    write_coco(ann)
    return ann


def count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = chair._build_ground_truth

    def wrapped(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(chair, "_build_ground_truth", wrapped)
    return calls


# ----------------------------------------------------------------------------- singularizer


@pytest.mark.parametrize("plural, singular", [
    ("men", "man"), ("women", "woman"), ("policemen", "policeman"), ("people", "person"),
    ("children", "child"), ("grandchildren", "grandchild"), ("mice", "mouse"), ("geese", "goose"),
    ("teeth", "tooth"), ("feet", "foot"), ("oxen", "ox"),
    ("buses", "bus"), ("busses", "bus"), ("minibuses", "minibus"), ("glasses", "glass"), ("dresses", "dress"),
    ("boxes", "box"), ("benches", "bench"), ("sandwiches", "sandwich"), ("toothbrushes", "toothbrush"),
    ("horses", "horse"), ("vases", "vase"), ("suitcases", "suitcase"), ("lenses", "lens"),
    ("puppies", "puppy"), ("ponies", "pony"), ("ties", "tie"), ("collies", "collie"), ("magpies", "magpie"),
    ("knives", "knife"), ("pocketknives", "pocketknife"), ("calves", "calf"), ("thieves", "thief"),
    ("gloves", "glove"), ("stoves", "stove"), ("canoes", "canoe"), ("buffaloes", "buffalo"),
    ("skis", "ski"), ("taxis", "taxi"), ("zebras", "zebra"), ("dogs", "dog"), ("frisbees", "frisbee"),
    ("headaches", "headache"), ("beaches", "beach"), ("zebus", "zebu"),
])
def test_singularize_plurals(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize("word", [
    "bus", "glass", "dress", "grass", "lens", "tennis", "iris", "analysis", "cactus", "species", "series",
    "scissors", "this", "is", "was", "his", "omen", "dog", "sheep", "broccoli", "skiing", "seated", "tied",
])
def test_singularize_leaves_singulars_alone(word):
    assert singularize(word) == word


def test_every_surface_form_is_one_mention_of_its_category():
    """Singularizing must not break any synonym; only the three-word 'stove top oven' splits."""
    broken = {f: extract_mentions(f) for f, c in SURFACE_TO_CATEGORY.items() if extract_mentions(f) != [(f, c)]}
    assert set(broken) == {"stove top oven", "dining table"}
    assert broken["dining table"] == [("table", "dining table")]  # "dining" is no COCO word; one mention
    assert len(SYNONYMS) == 80 and len(SURFACE_TO_CATEGORY) == 403


# ----------------------------------------------------------------------------- mentions


@pytest.mark.parametrize("caption, expected", [
    ("A puppy and a man.", [("puppy", "dog"), ("man", "person")]),
    ("Two men and three mice.", [("men", "person"), ("mice", "mouse")]),
    ("Children feeding geese.", [("children", "person"), ("geese", "bird")]),
    ("Buses and a bus.", [("buses", "bus"), ("bus", "bus")]),
    ("A school bus.", [("bus", "bus")]),
    ("He wears glasses and holds two wine glasses.", [("wine glasses", "wine glass")]),
    ("A hot dog on a plate.", [("hot dog", "hot dog")]),
    ("Hot dogs and a dog.", [("hot dogs", "hot dog"), ("dog", "dog")]),
    ("A teddy bear and a bear.", [("teddy bear", "teddy bear"), ("bear", "bear")]),
    ("A man on a motor bike.", [("man", "person"), ("motor bike", "motorcycle")]),
    ("A baby elephant.", [("baby elephant", "elephant")]),
    ("A baby.", [("baby", "person")]),
    ("Baby birds and adult giraffes.", [("baby birds", "bird"), ("adult giraffes", "giraffe")]),
    ("Baby animals.", []),
    ("A passenger jet.", [("passenger jet", "airplane")]),
    ("A passenger waits.", [("passenger", "person")]),
    ("A bow tie.", [("bow tie", "tie")]),
    ("A train track.", []),
    ("A catcher at home plate.", []),
    ("Knives, forks and spoons.", [("knives", "knife"), ("forks", "fork"), ("spoons", "spoon")]),
    ("Ponies and two collies.", [("ponies", "horse"), ("collies", "dog")]),
    ("The dogs' bowls and the dog's bed.", [("dogs", "dog"), ("bowls", "bowl"), ("dog", "dog"), ("bed", "bed")]),
    ("A man is seated, skiing and tied up.", [("man", "person")]),
    ("A sports ball and tennis rackets.", [("sports ball", "sports ball"), ("tennis rackets", "tennis racket")]),
    ("An iPhone and a cheesecake.", [("iphone", "cell phone"), ("cheesecake", "cake")]),
])
def test_extract_mentions(caption, expected):
    assert extract_mentions(caption) == expected


@pytest.mark.parametrize("caption, expected", [
    ("A toilet seat.", [("toilet seat", "toilet")]),
    ("The seat of the toilet is up.", [("toilet", "toilet")]),
    ("A seat by the toilets.", [("toilets", "toilet")]),
    ("A seat by the window.", [("seat", "chair")]),
])
def test_toilet_seat_is_not_a_chair(caption, expected):
    assert extract_mentions(caption) == expected


def test_sentence_punctuation():
    assert extract_mentions("There is a table.") == [("table", "dining table")]
    assert extract_mentions("A table.The chair!") == [("table", "dining table"), ("chair", "chair")]
    # a phrase never spans a sentence end or punctuation
    assert extract_mentions("She holds a teddy. Bear cubs play.") == [("bear", "bear")]
    assert extract_mentions("It is hot, dog days.") == [("dog", "dog")]
    # a bare line break is whitespace, as in nltk's tokenizer
    assert extract_mentions("A teddy\nbear.") == [("teddy bear", "teddy bear")]


# ----------------------------------------------------------------------------- metrics

GT = {k: set(v) for k, v in EXPECTED_GT.items()}


def test_score_captions_known_answer():
    items = [
        (1, "Two men and a puppy at a table. The dog has a frisbee."),  # 5 mentions, frisbee hallucinated
        (2, "A toilet seat next to a chair. A chair and a chair."),  # 4 mentions, 3 chairs hallucinated
        (3, "A baby elephant and a bird."),  # 2 mentions, bird hallucinated; recalls 1 of 2
        (5, "A kitten on a couch."),  # 2 mentions, none hallucinated
        (7, "An empty room."),  # no mention, empty ground truth
    ]
    metrics, per = score_captions(items, GT)
    assert metrics["num_captions"] == 5 and metrics["num_mentions"] == 13 and metrics["num_hallucinated"] == 5
    assert metrics["CHAIR_s"] == pytest.approx(60.0)
    assert metrics["CHAIR_i"] == pytest.approx(100 * 5 / 13)
    assert metrics["Recall"] == pytest.approx(100 * (3 + 1 + 1 + 2) / (3 + 1 + 2 + 2))
    assert metrics["Len"] == pytest.approx((13 + 12 + 6 + 5 + 3) / 5)
    assert [p["image_id"] for p in per] == [1, 2, 3, 5, 7]
    assert per[0]["mentioned"] == [{"word": w, "object": o} for w, o in [
        ("men", "person"), ("puppy", "dog"), ("table", "dining table"), ("dog", "dog"), ("frisbee", "frisbee")]]
    assert per[0]["hallucinated"] == [{"word": "frisbee", "object": "frisbee"}]
    assert per[1]["hallucinated"] == [{"word": "chair", "object": "chair"}] * 3
    assert per[2]["ground_truth"] == ["elephant", "person"]
    assert per[3]["hallucinated"] == [] and per[4]["mentioned"] == []


def test_repeated_mentions_each_count_in_chair_i():
    once, _ = score_captions([(1, "A dog and a cat.")], GT)
    thrice, _ = score_captions([(1, "A dog, a dog, a dog and a cat.")], GT)
    assert once["CHAIR_i"] == pytest.approx(50.0)
    assert thrice["CHAIR_i"] == pytest.approx(25.0)
    assert once["CHAIR_s"] == thrice["CHAIR_s"] == 100.0
    assert once["Recall"] == thrice["Recall"] == pytest.approx(100 / 3)  # distinct objects only


def test_hot_dog_and_teddy_bear_are_not_animals():
    metrics, per = score_captions([(1, "A dog eating a hot dog."), (6, "A teddy bear.")], GT)
    assert per[0]["hallucinated"] == [{"word": "hot dog", "object": "hot dog"}]
    assert per[1]["hallucinated"] == []
    assert metrics["CHAIR_s"] == pytest.approx(50.0)


def test_score_captions_errors():
    with pytest.raises(DataError, match=r"^caption 2: image id 999 has no ground truth"):
        score_captions([(1, "a dog"), (999, "a cat")], GT)
    with pytest.raises(DataError, match=r"^caps.jsonl line 3: image id 999 "):
        score_captions([(1, "a"), (2, "b"), (999, "c")], GT, where=["caps.jsonl line 1", "x", "caps.jsonl line 3"])
    with pytest.raises(DataError, match="no captions"):
        score_captions([], GT)
    with pytest.raises(DataError, match="image id must be an integer"):
        score_captions([("abc", "a dog")], GT)
    assert score_captions([("1", "a dog")], GT)[1][0]["image_id"] == 1  # digit strings are ids


_VOCAB = sorted(SURFACE_TO_CATEGORY) + ["a", "the", "and", "on", "of", "baby", "adult", "passenger", "hot",
                                        "teddy", "seat", "toilet", "home", ",", ".", "!", "'s", "dogs", "men"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_VOCAB), max_size=25), st.sampled_from(sorted(GT)))
def test_metric_invariants(words, image_id):
    caption = " ".join(words)
    mentions = extract_mentions(caption)
    assert {c for _, c in mentions} <= set(SYNONYMS)
    metrics, (row,) = score_captions([(image_id, caption)], GT)
    assert metrics["num_mentions"] == len(mentions) == len(row["mentioned"])
    assert [h for h in row["mentioned"] if h["object"] not in GT[image_id]] == row["hallucinated"]
    assert metrics["CHAIR_s"] == (100.0 if row["hallucinated"] else 0.0)
    assert 0.0 <= metrics["CHAIR_i"] <= 100.0 and 0.0 <= metrics["Recall"] <= 100.0
    everything, _ = score_captions([(image_id, caption)], {image_id: set(SYNONYMS)})
    assert everything["num_hallucinated"] == 0


def test_format_summary():
    table = format_summary({"CHAIR_s": 48.0, "CHAIR_i": 13.94, "Recall": 77.26, "Len": 98.05, "num_captions": 3})
    assert table == ("| CHAIR_s | CHAIR_i | Recall | Len |\n|---|---|---|---|\n| 48.0 | 13.9 | 77.3 | 98.0 |")


# ----------------------------------------------------------------------------- ground truth and its cache


def test_ground_truth_is_instances_plus_caption_objects(coco):
    assert load_ground_truth(coco) == EXPECTED_GT


def test_cache_is_json_next_to_annotations_and_reused(coco, monkeypatch):
    first = load_ground_truth(coco)
    cache = chair.cache_path(coco)
    assert cache.parent == coco and cache.is_file()
    data = json.loads(cache.read_text())  # JSON, not pickle
    assert data["ground_truth"]["5"] == ["cat", "couch"]

    def boom(*a, **kw):
        raise AssertionError("annotations were read again")

    monkeypatch.setattr(chair, "_build_ground_truth", boom)
    monkeypatch.setattr(chair, "_read_coco", boom)
    assert load_ground_truth(coco) == first


def test_cache_invalidated_when_a_source_file_changes(coco, monkeypatch):
    calls = count_builds(monkeypatch)
    load_ground_truth(coco)
    load_ground_truth(coco)
    assert len(calls) == 1
    write_coco(coco, CAPTIONS + [(7, "A giraffe eating leaves.")])  # new content: size and mtime differ
    gt = load_ground_truth(coco)
    assert len(calls) == 2 and gt[7] == {"giraffe"}
    caps = coco / "captions_val2014.json"
    st = caps.stat()
    os.utime(caps, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, newer mtime
    assert load_ground_truth(coco) == gt and len(calls) == 3
    assert load_ground_truth(coco) == gt and len(calls) == 3


def test_damaged_cache_is_rebuilt(coco, monkeypatch):
    load_ground_truth(coco)
    cache = chair.cache_path(coco)
    cache.write_text('{"key": ')  # torn file
    calls = count_builds(monkeypatch)
    assert load_ground_truth(coco) == EXPECTED_GT and len(calls) == 1
    assert json.loads(cache.read_text())["ground_truth"]["1"] == ["dining table", "dog", "person"]


def test_cache_location_falls_back_to_user_cache(coco, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(chair.os, "access", lambda path, mode: False)  # annotations dir read-only
    load_ground_truth(coco)
    written = list((home / ".cache" / "attnkit").glob("chair_ground_truth_val2014_*.json"))
    assert len(written) == 1 and not list(coco.glob("chair_ground_truth*"))
    other = tmp_path / "mycache"
    load_ground_truth(coco, cache_dir=other)
    assert len(list(other.glob("chair_ground_truth_val2014_*.json"))) == 1


def test_cache_write_is_atomic(coco, monkeypatch):
    """A failed write leaves the previous cache whole and no temp file behind."""
    load_ground_truth(coco)
    cache = chair.cache_path(coco)
    old = cache.read_bytes()
    write_coco(coco, CAPTIONS + [(7, "A giraffe.")])  # stale now: the next load rebuilds and rewrites

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(chair.os, "replace", fail)
    with pytest.warns(UserWarning, match="cache not written"):
        assert load_ground_truth(coco)[7] == {"giraffe"}
    assert cache.read_bytes() == old
    names = ["captions_val2014.json", "chair_ground_truth_val2014.json", "instances_val2014.json"]
    assert sorted(p.name for p in coco.iterdir()) == names
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_ground_truth(coco)[7] == {"giraffe"}
    assert cache.read_bytes() != old and sorted(p.name for p in coco.iterdir()) == names


def test_missing_annotations(tmp_path):
    with pytest.raises(DataError, match="annotations dir not found: .*nowhere"):
        load_ground_truth(tmp_path / "nowhere")
    ann = tmp_path / "ann"
    write_coco(ann)
    (ann / "captions_val2014.json").unlink()
    with pytest.raises(DataError, match=r"not found: .*captions_val2014\.json"):
        load_ground_truth(ann)
    with pytest.raises(DataError, match=r"not found: .*instances_train2014\.json"):
        load_ground_truth(ann, split="train2014")


def test_bad_annotation_files(tmp_path):
    ann = tmp_path / "ann"
    write_coco(ann)
    (ann / "captions_val2014.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"captions_val2014\.json line 1: invalid JSON"):
        load_ground_truth(ann)
    write_coco(ann)
    data = json.loads((ann / "instances_val2014.json").read_text())
    data["categories"].append({"id": 999, "name": "unicorn"})
    (ann / "instances_val2014.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_val2014\.json: category 999 'unicorn' is not a COCO category"):
        load_ground_truth(ann)


# ----------------------------------------------------------------------------- score_file


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_score_file_writes_per_caption_results(coco, tmp_path):
    rows = [{"image_id": 1, "caption": "A man and a cat at a table."}, {"image_id": 4, "caption": "Two buses."}]
    src = write_lines(tmp_path / "caps.jsonl", [json.dumps(r) for r in rows])
    before = src.read_bytes()
    metrics, out = score_file(src, coco)
    assert out == tmp_path / "caps.chair.jsonl"
    assert src.read_bytes() == before
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image_id"] for r in results] == [1, 4]
    assert results[0]["hallucinated"] == [{"word": "cat", "object": "cat"}]
    assert results[1]["mentioned"] == [{"word": "buses", "object": "bus"}]
    assert metrics == score_captions([(r["image_id"], r["caption"]) for r in rows], EXPECTED_GT)[0]
    assert metrics["CHAIR_s"] == pytest.approx(50.0) and metrics["CHAIR_i"] == pytest.approx(25.0)


def test_score_file_json_list_and_custom_keys(coco, tmp_path):
    src = tmp_path / "caps.json"
    src.write_text(json.dumps([{"question_id": "3", "text": "A baby elephant."}]))
    out_path = tmp_path / "out" / "res.jsonl"
    metrics, out = score_file(src, coco, image_id_key="question_id", caption_key="text", output=out_path)
    assert out == out_path and metrics["CHAIR_s"] == 0.0 and metrics["num_mentions"] == 1
    assert json.loads(out.read_text())["image_id"] == 3


@pytest.mark.parametrize("lines, message", [
    (['{"image_id": 1, "caption": "a dog"}', '{"image_id": 2, "caption": '], r"line 2: invalid JSON \("),
    (['{"image_id": 1}'], r"line 1: missing key 'caption'"),
    (['{"caption": "a dog"}'], r"line 1: missing key 'image_id'"),
    (['{"image_id": 1, "caption": "a"}', "", '{"image_id": 999, "caption": "a dog"}'],
     r"line 3: image id 999 has no ground truth"),
    (['{"image_id": 1, "caption": 5}'], r"line 1: key 'caption' must be a string"),
    (['[1, 2]'], r"line 1: expected a JSON object"),
    ([], r"no captions \(empty file\)"),
    (["", "   "], r"no captions \(empty file\)"),
])
def test_score_file_bad_input(coco, tmp_path, lines, message):
    src = write_lines(tmp_path / "caps.jsonl", lines)
    with pytest.raises(DataError) as e:
        score_file(src, coco)
    assert str(e.value).startswith(str(src)) and "\n" not in str(e.value)
    assert re.search(message, str(e.value))
    assert not (tmp_path / "caps.chair.jsonl").exists()


def test_score_file_missing_inputs_and_overwrite(coco, tmp_path):
    with pytest.raises(DataError, match=r"captions file not found: .*absent\.jsonl"):
        score_file(tmp_path / "absent.jsonl", coco)
    src = write_lines(tmp_path / "caps.jsonl", ['{"image_id": 1, "caption": "a dog"}'])
    with pytest.raises(DataError, match=r"annotations dir not found: .*no_ann"):
        score_file(src, tmp_path / "no_ann")
    before = src.read_bytes()
    with pytest.raises(OutputError, match="overwrite the captions file"):
        score_file(src, coco, output=src)
    assert src.read_bytes() == before


# ----------------------------------------------------------------------------- ChairTask


def test_task_load_samples_images(coco, tmp_path):
    (tmp_path / "val2014").mkdir()
    task = ChairTask(coco, num_images=3, seed=0)
    samples = task.load()
    expected = random.Random(0).sample(sorted(IMAGE_IDS), 3)
    assert [s.meta["image_id"] for s in samples] == expected
    assert [s.id for s in samples] == [str(i) for i in expected]
    assert all(s.image == tmp_path / "val2014" / file_name(int(s.id)) for s in samples)
    assert all(s.question == "Please describe this image in detail." for s in samples)
    other = [s.meta["image_id"] for s in ChairTask(coco, num_images=3, seed=1).load()]
    assert other == random.Random(1).sample(sorted(IMAGE_IDS), 3) != expected
    everything = ChairTask(coco, num_images=50, prompt="Describe.").load()
    assert [s.meta["image_id"] for s in everything] == IMAGE_IDS and everything[0].question == "Describe."


@pytest.mark.parametrize("make, expected", [("val2014", "val2014"), ("images", "images"), (None, "annotations")])
def test_task_default_image_dir(tmp_path, make, expected):
    write_coco(tmp_path / "annotations")
    if make:
        (tmp_path / make).mkdir()
    task = ChairTask(tmp_path / "annotations", num_images=1)
    assert task.image_dir == tmp_path / expected
    assert ChairTask(tmp_path / "annotations", tmp_path / "mine").image_dir == tmp_path / "mine"


def test_task_score_and_outputs(coco):
    task = ChairTask(coco, num_images=4, seed=3)
    assert task.name == "chair" and task.default_max_new_tokens == 512
    samples = task.load()
    captions = {1: "A man with a dog.", 2: "A toilet and a sink.", 3: "An elephant.", 4: "A bus.",
                5: "A cat.", 6: "A teddy bear.", 7: "A room."}
    records = [{"id": s.id, "output": captions[s.meta["image_id"]], "meta": s.meta} for s in samples]
    metrics = task.score(records)
    expected, per = score_captions([(s.meta["image_id"], captions[s.meta["image_id"]]) for s in samples],
                                   EXPECTED_GT)
    assert metrics == expected
    extra = task.extra_outputs(records)
    assert extra["chair_per_caption.jsonl"] == per
    assert extra["image_ids.json"] == [s.meta["image_id"] for s in samples]
    assert task.summary(metrics) == format_summary(metrics)
    assert task.config() == {"task": "chair", "split": "val2014", "num_images": 4, "seed": 3,
                             "prompt": "Please describe this image in detail.", "annotations_dir": str(coco),
                             "vocab": "coco", "vocab_file": None}
    with pytest.raises(DataError, match=r"record '999': image id 999 has no ground truth"):
        task.score([{"id": "999", "output": "a dog", "meta": {"image_id": 999}}])
    with pytest.raises(DataError, match=r"record '1': 'output' must be a string"):
        task.score([{"id": "1", "meta": {"image_id": 1}}])


def test_task_errors(tmp_path):
    with pytest.raises(DataError, match="annotations dir not found"):
        ChairTask(tmp_path / "nowhere").load()
    with pytest.raises(DataError, match="num_images"):
        ChairTask(tmp_path, num_images=0)


# ----------------------------------------------------------------------------- ChairTask: a saved image-id list


@pytest.mark.parametrize("text", ["6\n2\n\n# a comment\n4\n", "[6, 2, 4]", '["6", 2, 4]'])
def test_task_image_ids_file_fixes_the_images_in_order(coco, tmp_path, text):
    ids = tmp_path / "ids.txt"
    ids.write_text(text)
    for seed in (0, 1):  # the seed no longer picks the images
        task = ChairTask(coco, num_images=2, seed=seed, image_ids=ids)
        assert [s.meta["image_id"] for s in task.load()] == [6, 2, 4]
        assert task.num_images == 3
    config = task.config()
    assert config["image_ids"] == [6, 2, 4] and config["image_ids_file"] == str(ids)
    assert "image_ids" not in ChairTask(coco).config()  # unchanged when no list is given (old runs resume)
    assert [s.meta["image_id"] for s in ChairTask(coco, image_ids=[5, 1]).load()] == [5, 1]


def test_task_image_ids_from_options(coco, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text("[3, 1]")
    options = chair.ChairOptions(annotations=str(coco), image_ids=str(ids), prompt="Describe it.")
    samples = ChairTask.from_options(options, seed=4).load()
    assert [s.meta["image_id"] for s in samples] == [3, 1]
    assert {s.question for s in samples} == {"Describe it."}


@pytest.mark.parametrize("text, message", [
    ("1\n2\nabc\n", r"ids.txt line 3: image id must be an integer, got 'abc'"),
    ("1\n-4\n", r"ids.txt line 2: image id must be an integer, got '-4'"),
    ("1\n\n2\n1\n", r"ids.txt line 4: image id 1 appears twice \(first at .*ids.txt line 1\)"),
    ("[1, 2.5]", r"ids.txt item 2: image id must be an integer, got 2.5"),
    ("[1, true]", r"ids.txt item 2: image id must be an integer, got True"),
    ("[1,\n 2,,]", r"ids.txt line 2: invalid JSON"),
    ("# nothing\n\n", r"ids.txt: no image ids"),
])
def test_task_image_ids_file_errors_name_file_and_line(coco, tmp_path, text, message):
    ids = tmp_path / "ids.txt"
    ids.write_text(text)
    with pytest.raises(DataError, match=message):
        ChairTask(coco, image_ids=ids)


def test_task_image_ids_not_in_the_annotations(coco, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("1\n2\n99\n")
    task = ChairTask(coco, image_ids=ids)  # read at once; checked against the annotations when loading
    with pytest.raises(DataError, match=r"ids.txt line 3: image id 99 is not an image of .*instances_val2014.json"):
        task.load()
    with pytest.raises(DataError, match="CHAIR image id file not found"):
        ChairTask(coco, image_ids=tmp_path / "missing.txt")
