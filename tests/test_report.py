"""attnkit.inspect.report and ``attnkit report``: one self-contained HTML file of real tiny eval runs (one run
dir, and a reproduce-like dir with runs nested below it), one entry per sample with its embedded image,
CHAIR hallucinations, grounding overlays, missing images, and one-line errors for bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from attnkit import cli, testing
from attnkit.errors import DataError
from attnkit.eval.pope import build_pope
from attnkit.eval.records import read_jsonl
from attnkit.inspect import render_report, write_report

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


class _Page(HTMLParser):
    """The tags (name, attrs) and text of a page, and the samples' text, by html.parser."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.samples: list[dict] = []  # per sample: attrs, thumb class list, text
        self.style = ""
        self._in_style = False
        self._depth = 0  # open divs inside the current sample
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        if tag == "style":
            self._in_style = True
        if tag == "div" and "sample" in classes and not self._depth:
            self.samples.append({"attrs": attrs, "thumb": None, "text": ""})
            self._depth = 1
            return
        if self._depth and tag == "div":
            self._depth += 1
            if "thumb" in classes and self.samples[-1]["thumb"] is None:
                self.samples[-1]["thumb"] = classes

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if self._depth and tag == "div":
            self._depth -= 1

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        elif self._depth:
            self.samples[-1]["text"] += data

    def images(self) -> dict[str, Image.Image]:
        """class name -> the image embedded for it in the style sheet."""
        out = {}
        for name, data in re.findall(r'\.(i\d+)\{background-image:url\("data:image/jpeg;base64,([^"]+)"\)\}', self.style):
            out[name] = Image.open(io.BytesIO(base64.b64decode(data)))
        return out


def _eval(*args: str) -> list[str]:
    return ["eval", "--model", "tiny:llava", "--max-new-tokens", "3", "--no-progress", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A reproduce-like dir: table.md, table.json and three real tiny eval runs below it (POPE, CHAIR, grounding)."""
    tmp = tmp_path_factory.mktemp("report")
    ann = testing.write_coco(tmp / "coco")
    build_pope(ann / "instances_val2014.json", tmp / "pope", num_images=2, seed=1)
    shutil.copytree(tmp / "coco" / "val2014", tmp / "pope" / "images")
    root = tmp / "repro"
    assert cli.main(_eval("--task", "pope", "--split", "adversarial", "--data-dir", str(tmp / "pope"),
                          "--limit", "8", "--batch-size", "4", "--output", str(root / "pope" / "seed0"))) == 0
    assert cli.main(_eval("--task", "chair", "--annotations", str(ann), "--num-images", "3",
                          "--output", str(root / "chair" / "seed0"))) == 0
    assert cli.main(_eval("--task", "grounding", "--annotations", str(ann), "--layers", "0-1",
                          "--output", str(root / "grounding" / "seed0"))) == 0
    (root / "table.md").write_text("| row | POPE F1 |\n|---|---|\n| none | 85.7 |\n")
    (root / "table.json").write_text(json.dumps([{"row": "none", "POPE F1": 85.7}]))
    return root


def _self_contained(text: str) -> None:
    page = _Page(text)
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value or value.startswith(("data:", "#")), f"<{tag} {key}={value!r}> is not embedded"
        assert tag != "link"
    assert not re.search(r"url\((?!\"?data:)", page.style), "every CSS url() is a data URI"


def test_report_of_one_eval_run(runs):
    run = runs / "pope" / "seed0"
    text = render_report(run)
    _self_contained(text)
    page = _Page(text)
    records = read_jsonl(run / "samples.jsonl")
    assert len(page.samples) == len(records) == 8
    images = page.images()
    assert len(images) == 2, "two distinct images, each embedded once"
    for sample, record in zip(page.samples, records):
        name = next(c for c in sample["thumb"] if re.fullmatch(r"i\d+", c))
        assert images[name].size == (64, 48)  # the 64x48 test image, kept (thumbnails only shrink)
        assert record["prompt"] in sample["text"] and record["output"] in sample["text"]
        assert f"label: {record['label']}" in sample["text"]
        wrong = record["parsed"] != record["label"]
        assert sample["attrs"]["data-wrong"] == ("1" if wrong else "0")
    # the filter: a checkbox and inline JS that toggles the class the CSS hides the right answers by
    assert ("input", {"type": "checkbox", "id": "only-wrong"}) in page.tags
    assert "only-wrong" in text.split("<script>")[1] and 'body.only-wrong .sample[data-wrong="0"]' in page.style
    # the metrics: POPE's splits as a table
    results = json.loads((run / "results.json").read_text())
    assert f"{results['metrics']['splits']['adversarial']['f1']:.4g}" in text


def test_report_of_nested_run_dirs(runs, tmp_path, capsys):
    out = tmp_path / "all.html"
    assert cli.main(["report", str(runs), "--out", str(out)]) == 0
    assert f"3 runs: wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    _self_contained(text)
    page = _Page(text)
    counts = [len(read_jsonl(runs / t / "seed0" / "samples.jsonl")) for t in ("chair", "grounding", "pope")]
    assert len(page.samples) == sum(counts) == 3 + 6 + 8
    assert text.count('<section class="run">') == 3
    assert [a["href"] for t, a in page.tags if t == "a"] == ["#run0", "#run1", "#run2"]
    assert "<th>POPE F1</th>" in text and "<td>85.7</td>" in text  # table.json's rows
    chair = page.samples[:3]
    assert all("hallucinated:" in s["text"] and "ground truth:" in s["text"] for s in chair)
    grounding = page.samples[3:9]
    records = read_jsonl(runs / "grounding" / "seed0" / "samples.jsonl")
    for sample, record in zip(grounding, records):
        assert ("pointing: hit" if record["grounding"]["hit"] else "pointing: miss") in sample["text"]
        assert sample["attrs"]["data-wrong"] == ("0" if record["grounding"]["hit"] else "1")
    overlays = [a for t, a in page.tags if t == "div" and a.get("class") in ("box", "pt")]
    assert len(overlays) == 2 * 6, "each grounding sample: its box and its argmax cell"
    assert "not the attention map itself" in text
    # default output: RUN_DIR/report.html
    assert write_report(runs / "chair" / "seed0") == runs / "chair" / "seed0" / "report.html"


def test_chair_hallucinations_and_missing_images(runs, tmp_path):
    run = tmp_path / "chair"
    shutil.copytree(runs / "chair" / "seed0", run)
    per = read_jsonl_any(run / "chair_per_caption.jsonl")
    per[0]["hallucinated"] = [{"word": "giraffe", "object": "giraffe"}]
    (run / "chair_per_caption.jsonl").write_text("".join(json.dumps(p) + "\n" for p in per))
    records = read_jsonl(run / "samples.jsonl")
    records[1]["image"] = str(tmp_path / "gone.jpg")
    del records[2]["image"]  # a run written before records kept the image path
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = _Page(render_report(run))
    assert len(page.samples) == 3
    first = next(s for s in page.samples if records[0]["id"] == s["text"][: len(records[0]["id"])])
    assert "giraffe" in first["text"] and first["attrs"]["data-wrong"] == "1"
    assert sum(s["attrs"]["data-wrong"] == "1" for s in page.samples) == 1
    missing = [s for s in page.samples if "missing" in s["thumb"]]
    assert len(missing) == 2
    assert f"image missing: {tmp_path / 'gone.jpg'}" in missing[0]["text"] and "image not recorded" in missing[1]["text"]


def read_jsonl_any(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bad_input_is_one_line_naming_file_and_line(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: not a run directory"):
        render_report(empty)
    run = tmp_path / "run"
    shutil.copytree(runs / "pope" / "seed0", run)
    lines = (run / "samples.jsonl").read_text().splitlines()
    lines[1] = '{"id": "x", "prompt": '
    (run / "samples.jsonl").write_text("\n".join(lines) + "\n")
    cases = [(empty, f"{empty}: not a run directory"), (tmp_path / "none", "run dir not found"),
             (run, f"{run / 'samples.jsonl'} line 2: invalid JSON")]
    for path, message in cases:
        assert cli.main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    (run / "samples.jsonl").write_text("\n".join(lines[:1]) + "\n")
    (run / "results.json").write_text('{\n  "metrics": {,\n}')
    with pytest.raises(DataError, match=rf"{run / 'results.json'}, line 2: malformed JSON"):
        render_report(run)
    (run / "results.json").write_text("{}")
    (run / "samples.jsonl").write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{run / 'samples.jsonl'} line 2: not a sample record"):
        render_report(run)
    assert not (run / "report.html").exists()
