"""The testbed: the shapes set (determinism, COCO validity, co-occurrence), the CHAIR vocabulary, the
shipped model and data through the Auto classes and the CLI, every method on it, and the training script."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import cli, testbed
from attnkit.errors import DataError
from attnkit.eval.chair import COCO, extract_mentions, load_vocabulary, score_captions, score_file
from attnkit.testbed import shapes as S

ROOT = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return S.make_shapes(tmp_path_factory.mktemp("shapes"), n_train=300, n_val=40, seed=3)


def test_make_shapes_is_deterministic(small_set, tmp_path):
    again = S.make_shapes(tmp_path / "again", n_train=300, n_val=40, seed=3)
    assert _digest(again) == _digest(small_set)
    other = S.make_shapes(tmp_path / "other", n_train=0, n_val=40, seed=4)
    assert (other / "annotations" / "instances_val.json").read_bytes() != \
        (small_set / "annotations" / "instances_val.json").read_bytes()


def test_make_shapes_is_valid_coco(small_set):
    from pycocotools.coco import COCO as CocoIndex
    from PIL import Image

    for split, n in (("train", 300), ("val", 40)):
        inst = CocoIndex(str(small_set / "annotations" / f"instances_{split}.json"))
        caps = CocoIndex(str(small_set / "annotations" / f"captions_{split}.json"))
        assert len(inst.imgs) == n and len(caps.imgs) == n
        assert sorted(c["name"] for c in inst.cats.values()) == sorted(S.SHAPES)
        per_image = Counter(a["image_id"] for a in inst.anns.values())
        assert set(per_image.values()) <= {1, 2, 3} and len(per_image) == n
        assert all(len(caps.getAnnIds(imgIds=[i])) == 5 for i in caps.imgs)
        im = next(iter(inst.imgs.values()))
        image = Image.open(small_set / "images" / split / im["file_name"])
        assert image.size == (64, 64) and image.mode == "RGB"
        for ann in inst.loadAnns(inst.getAnnIds(imgIds=[im["id"]])):
            mask = inst.annToMask(ann)  # the polygon rasterises inside its box
            assert mask.shape == (64, 64) and mask.sum() > 0.5 * ann["area"]
            x, y, w, h = ann["bbox"]
            ys, xs = mask.nonzero()
            assert xs.min() >= int(x) - 1 and xs.max() <= x + w + 1 and ys.min() >= int(y) - 1 and ys.max() <= y + h + 1


def test_partners_co_occur_and_others_do_not(small_set):
    rows = S.read_split(small_set, "train")
    with_shape, with_partner, with_other = Counter(), Counter(), Counter()
    for _, anns in rows:
        present = {a["shape"] for a in anns}
        for s in present:
            with_shape[s] += 1
            with_partner[s] += S.partner_of(s) in present
            with_other[s] += len(present - {s, S.partner_of(s)}) > 0
    together = sum(with_partner.values()) / sum(with_shape.values())
    assert 0.65 < together < 0.9  # the prior the model learns
    # any one other shape is far rarer than the partner
    assert sum(with_other.values()) / sum(with_shape.values()) / 8 < together / 4


def test_captions_use_synonyms_and_name_only_present_shapes(small_set):
    vocab = load_vocabulary(small_set / "vocab.json")
    caps = json.loads((small_set / "annotations" / "captions_train.json").read_text())
    truth = {im["id"]: {a["shape"] for a in anns} for im, anns in S.read_split(small_set, "train")}
    words = Counter()
    for c in caps["annotations"]:
        found = extract_mentions(c["caption"], vocab)
        assert found and {cat for _, cat in found} == truth[c["image_id"]], c
        words.update(w for w, _ in found)
    assert words["ball"] > 0 and words["plus sign"] > 0 and words["circle"] > words["ball"]


def test_shapes_vocabulary_in_chair():
    vocab = load_vocabulary(testbed.DATA_DIR / "vocab.json")
    assert vocab.name == "shapes"
    # synonyms, plurals and the two-word "plus sign"; colour words and COCO objects are not shapes
    assert extract_mentions("Two red balls, a plus sign and a blue dog.", vocab) == [
        ("balls", "circle"), ("plus sign", "cross")]
    assert extract_mentions("a blue dog.", COCO) == [("dog", "dog")]
    gt = {1: {"circle", "square"}}
    metrics, (row,) = score_captions([(1, "A red ball, a green box and a moon. A crescent.")], gt, vocab=vocab)
    # by hand: mentions ball, box, moon, crescent; moon and crescent (both "moon") are hallucinated
    assert [m["object"] for m in row["hallucinated"]] == ["moon", "moon"]
    assert metrics["CHAIR_i"] == pytest.approx(50.0) and metrics["CHAIR_s"] == 100.0
    assert metrics["Recall"] == pytest.approx(100.0)


def test_vocabulary_file_errors(tmp_path):
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({"categories": {"circle": ["ball"], "sphere": ["ball"]}}))
    with pytest.raises(DataError, match=r"v\.json: 'ball' is listed under both 'circle' and 'sphere'"):
        load_vocabulary(bad)
    bad.write_text(json.dumps({"circle": ["a round ball"]}))
    with pytest.raises(DataError, match="'a round ball' is not one word or two"):
        load_vocabulary(bad)
    bad.write_text("{")
    with pytest.raises(DataError, match=r"v\.json, line 1: malformed JSON"):
        load_vocabulary(bad)
    with pytest.raises(DataError, match="CHAIR vocabulary file not found"):
        load_vocabulary(tmp_path / "missing.json")


def test_chair_cli_with_vocab(small_set, tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    first = S.read_split(small_set, "val")[0]
    shape = first[1][0]["shape"]
    absent = next(s for s in S.SHAPES if s not in {a["shape"] for a in first[1]})
    caps.write_text(json.dumps({"image_id": first[0]["id"], "caption": f"A red {shape} and a {absent}."}) + "\n")
    ann = small_set / "annotations"
    assert cli.main(["chair", str(caps), "--annotations", str(ann), "--split", "val"]) == 2
    assert "is not a COCO category (another set needs its vocabulary: --vocab)" in capsys.readouterr().err
    assert cli.main(["chair", str(caps), "--annotations", str(ann), "--split", "val",
                     "--vocab", str(small_set / "vocab.json")]) == 0
    assert "| 100.0 | 50.0 |" in capsys.readouterr().out  # CHAIR_s, CHAIR_i by hand: 1 of 2 mentions
    metrics, _ = score_file(caps, ann, split="val", vocab=small_set / "vocab.json", output=tmp_path / "o.jsonl")
    assert metrics["num_hallucinated"] == 1


def test_bundled_data_is_what_build_data_writes(tmp_path):
    fresh = testbed.build_data(tmp_path / "data")
    shipped = {k: v for k, v in _digest(testbed.DATA_DIR).items() if not k.startswith("annotations/chair_ground")}
    assert _digest(fresh) == shipped


# -- the shipped model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return attnkit.load_model("testbed")


def test_model_and_processor_load_through_the_auto_classes(shipped):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(testbed.MODEL_DIR)
    processor = AutoProcessor.from_pretrained(testbed.MODEL_DIR)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.float32
    assert type(processor).__name__ == "LlavaProcessor"
    assert attnkit.get_adapter(model).family == "llava"
    loaded, _ = shipped
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (testbed.MODEL_DIR / "model.safetensors").stat().st_size <= 10 * 2**20


def test_pope_end_to_end_is_clearly_above_chance(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["eval", "--model", "testbed", "--task", "pope", "--split", "random", "--limit", "60",
                     "--output", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    m = results["metrics"]["splits"]["random"]
    assert results["counts"]["scored"] == 60 and m["unknown"] == 0
    assert m["accuracy"] >= 0.75  # chance is 0.5; the shipped model scores ~0.9 on the full split
    assert "false yes: absent partner" in capsys.readouterr().out
    assert m["n_absent_partner"] + m["n_absent_other"] == 30


def test_every_registered_method_runs_on_the_testbed(shipped):
    from attnkit.eval.inputs import make_batch
    from attnkit.eval.pope import parse_answer
    from PIL import Image

    model, processor = shipped
    samples = testbed.pope_task(("adversarial",)).load()[:4]
    batch = make_batch(processor, "llava", [s.question for s in samples],
                       [Image.open(s.image).convert("RGB") for s in samples])
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=4)[:, n:]
    for name in attnkit.list_methods():
        method = attnkit.methods.ICD(processor=processor) if name == "icd" else name  # ICD needs the tokenizer
        with attnkit.wrap(model, method), torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4)[:, n:]
        answers = [parse_answer(t, strict=True) for t in processor.batch_decode(out, skip_special_tokens=True)]
        assert all(a in ("yes", "no") for a in answers), (name, answers)
        if name == "identity":
            assert torch.equal(out, plain)


def test_eval_chair_and_grounding_use_the_bundled_data(tmp_path):
    assert cli.main(["eval", "--model", "testbed", "--task", "chair", "--num-images", "6",
                     "--output", str(tmp_path / "c"), "--no-progress"]) == 0
    chair = json.loads((tmp_path / "c" / "results.json").read_text())
    assert chair["config"]["task"]["vocab"] == "shapes" and chair["counts"]["scored"] == 6
    assert {"CHAIR_s", "CHAIR_i", "partner_share"} <= set(chair["metrics"])
    assert cli.main(["eval", "--model", "testbed", "--task", "grounding", "--limit", "8",
                     "--output", str(tmp_path / "g"), "--no-progress"]) == 0
    g = json.loads((tmp_path / "g" / "results.json").read_text())["metrics"]
    assert g["n"] == 8 and 0 < g["chance_mass"] < 100
    assert cli.main(["eval", "--model", "testbed", "--task", "chair", "--split", "train",
                     "--output", str(tmp_path / "x")]) == 2


def test_demo_prints_one_table(capsys):
    assert cli.main(["demo", "--methods", "none,fastv", "--pope-questions", "8", "--chair-images", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line for line in out if line.startswith("| ")]
    assert table[0].startswith("| method | POPE-adv acc") and "false yes: absent partner" in table[0]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["none", "fastv"]
    assert table[1].split("|")[-2].strip() == "-" and float(table[2].split("|")[-2]) < 1.0  # FLOPs ratio


def test_training_script_runs_a_few_steps(tmp_path):
    out = tmp_path / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_testbed.py"), "--out", str(out),
                           "--n-train", "64", "--batch", "4", "--batch1", "4", "--stage1-steps", "2", "--stage2-steps", "4",
                           "--eval-every", "2", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 2 step 0" in proc.stdout and "probe: yes on present" in proc.stdout
    info = json.loads((out / "training.json").read_text())
    assert info["stage2_steps"] == 4 and [p["step"] for p in info["probe"]] == [2, 3]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.dtype == torch.float32


def test_pope_and_chair_tag_partners_by_hand():
    truth = {im["file_name"]: {a["shape"] for a in anns} for im, anns in S.read_split(testbed.DATA_DIR, "val")}
    samples = testbed.pope_task(("adversarial",)).load()
    kinds = Counter()
    for s in samples:
        present = truth[s.meta["image"]]
        if s.label == "yes":
            assert "absent" not in s.meta and s.meta["object"] in present
        else:
            partner = any(S.partner_of(p) == s.meta["object"] for p in present)
            assert s.meta["absent"] == ("partner" if partner else "other")
            kinds[s.meta["absent"]] += 1
    assert kinds["partner"] > 50 and kinds["other"] > 50  # adversarial asks about partners often
    # scores by hand: two partner questions (one answered yes), one other (answered no)
    recs = [{"id": "a", "meta": {"split": "adversarial", "absent": "partner"}, "label": "no", "parsed": "yes"},
            {"id": "b", "meta": {"split": "adversarial", "absent": "partner"}, "label": "no", "parsed": "no"},
            {"id": "c", "meta": {"split": "adversarial", "absent": "other"}, "label": "no", "parsed": "no"},
            {"id": "d", "meta": {"split": "adversarial"}, "label": "yes", "parsed": "yes"}]
    m = testbed.pope_task(("adversarial",)).score(recs)["splits"]["adversarial"]
    assert (m["false_yes_partner"], m["n_absent_partner"], m["false_yes_other"], m["n_absent_other"]) == (0.5, 2, 0.0, 1)
    # CHAIR: an image with a shape whose partner is absent; naming that partner is a partner
    # hallucination, naming a shape that is nobody's partner here is not
    image, present, partner, other = next(
        (im, p, S.partner_of(x), o) for im, anns in S.read_split(testbed.DATA_DIR, "val")
        for p in [{a["shape"] for a in anns}] for x in sorted(p) if S.partner_of(x) not in p
        for o in [next(y for y in S.SHAPES if y not in p and S.partner_of(y) not in p)])
    task = testbed.chair_task(5)
    caption = f"A {' and a '.join(sorted(present))}, a {partner} and a {other}."
    metrics = task.score([{"id": "x", "output": caption, "meta": {"image_id": image["id"]}}])
    assert metrics["num_hallucinated"] == 2 and metrics["hallucinated_partner"] == 1
    assert metrics["partner_share"] == pytest.approx(50.0)
