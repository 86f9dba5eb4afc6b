"""POPE: polling-based object probing (Li et al. 2023, "Evaluating Object Hallucination in LVLMs").

Yes/no questions "Is there a X in the image?", half about objects in the image and half about
absent ones, sampled three ways (random, popular, adversarial). This module loads the original
question files or the lmms-lab/POPE Hugging Face layout, builds new sets from a COCO-format
instances file, parses replies and scores them, with attnkit's own answer rule or with the rule
of the script a paper used (``PARSERS``), also for answers made elsewhere (``score_answers_file``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.errors import DataError, OutputError
from attnkit.eval.base import Sample, Task
from attnkit.eval.records import read_json
from attnkit.eval.registry import register_task
from attnkit.options import option

SOURCES: tuple[str, ...] = ("coco", "aokvqa", "gqa", "shapes")  # shapes: attnkit's testbed set
SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DEFAULT_SUFFIX = " Please answer yes or no."
#: config of the lmms-lab/POPE dataset whose splits are adversarial / popular / random
HF_CONFIG = "Full"
YES, NO, UNKNOWN = "yes", "no", "unknown"
#: the verdict of an answer that ICD's script leaves out of the counts (neither yes nor no)
LEFT_OUT = "left_out"

_FIELDS = ("question_id", "image", "text", "label")  # one line of an original question file
_HF_FIELDS = ("question_id", "question", "answer", "image")
_RATES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_QUESTION = re.compile(r"^\s*is there (?:a|an) (.+?) in the image\s*\?", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_SENTENCE_END = re.compile(r"[.!?\n]")
_NEGATIONS = frozenset({"no", "not", "cannot"})


# ----------------------------------------------------------------------------- names


def check_source(source: str) -> str:
    """``source`` if it is one of SOURCES, else DataError listing them."""
    if source not in SOURCES:
        raise DataError(f"unknown POPE source {source!r}; valid: {', '.join(SOURCES)}")
    return source


def resolve_splits(splits: str | Iterable[str]) -> tuple[str, ...]:
    """Validated split names in the given order, duplicates dropped; "all" means all three."""
    names = [splits] if isinstance(splits, str) else list(splits)
    out: list[str] = []
    for name in names:
        for split in SPLITS if name == "all" else (name,):
            if split not in SPLITS:
                raise DataError(f"unknown POPE split {split!r}; valid: {', '.join(SPLITS)}, all")
            if split not in out:
                out.append(split)
    if not out:
        raise DataError(f"no POPE split given; valid: {', '.join(SPLITS)}, all")
    return tuple(out)


def question_file_names(source: str, split: str) -> tuple[str, str]:
    """File names a split's questions may have: ``{source}_pope_{split}.json`` and the SEEM-built variant."""
    return f"{source}_pope_{split}.json", f"{source}_pope_seem_{split}.json"


# ----------------------------------------------------------------------------- prompt / parser


def pope_question(obj: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """ "Is there a {obj} in the image?" + suffix ("an" before a vowel, as the original files)."""
    article = "an" if obj[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return f"Is there {article} {obj} in the image?{suffix}"


def object_of(question: str) -> str | None:
    """The object of an "Is there a X in the image?" question, else None."""
    m = _QUESTION.match(question)
    return m.group(1).strip() if m else None


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def parse_answer(text: str, strict: bool = False) -> str:
    """A reply -> "yes" | "no" | "unknown" by attnkit's own rule (the ``attnkit`` parser).

    This is not the rule of POPE's script (that is the ``official`` parser, see ``PARSERS``); it
    reads free-form replies more robustly. Default: take the first sentence that has a word
    (sentences end at ``.``, ``!``, ``?`` or a newline); its words (letter runs with inner
    apostrophes; a typographic apostrophe reads as ``'``), lower-cased, mean "no" if one is
    no, not, cannot or ends in n't, else "yes". So, unlike the official rule, case and
    punctuation do not matter ("NO", "No!" are no) and "isn't", "I can't tell", "I cannot tell"
    are no.
    ``strict``: "yes"/"no" only if the reply's first word is yes/no (case and leading
    punctuation ignored) and it does not contain both words; else "unknown".
    A reply without any letter (empty, blank, punctuation) is "unknown" in both modes and is
    scored as wrong; the official rule counts it as "yes".
    """
    words = _words(text or "")
    if not words:
        return UNKNOWN
    if strict:
        if words[0] not in (YES, NO) or (YES in words and NO in words):
            return UNKNOWN
        return words[0]
    first = next(w for w in (_words(s) for s in _SENTENCE_END.split(text)) if w)
    return NO if any(w in _NEGATIONS or w.endswith("n't") for w in first) else YES


# ----------------------------------------------------------------------------- the papers' parsers
#
# Each function below restates the answer rule of one published POPE script (read from the
# repositories named in PARSERS), quirks included: case-sensitive words, words split on single
# spaces (a newline does not split), "." and "," handled as the script handles them.

_OFFICIAL_NEGATIONS = ("No", "not", "no")
_OPERA_NEGATIONS = ("No", "not", "no", "NO")
#: label-free readings of the vcd parser: which of the substrings "yes" and "no" the lower-cased answer holds
VCD_READINGS = ("yes_only", "no_only", "both", "neither")


def _script_words(text: str, *, first_sentence: bool) -> list[str]:
    """The words the scripts test: the text up to the first "." (``first_sentence``) or the text
    with every "." deleted, then every "," deleted, split on single spaces."""
    text = text.split(".", 1)[0] if first_sentence else text.replace(".", "")
    return text.replace(",", "").split(" ")


def read_official(text: str) -> str:
    """POPE's own rule (RUCAIBox/POPE ``evaluate.py``, the same in LLaVA's ``eval_pope.py``): "no"
    if a word of the first sentence is exactly "No", "not" or "no", else "yes"."""
    words = _script_words(text, first_sentence=True)
    return NO if any(w in _OFFICIAL_NEGATIONS for w in words) else YES


def read_opera(text: str) -> str:
    """OPERA's rule (also PAI's and HALC's): every "." and "," deleted, no sentence cut; "no" if a
    word is exactly "No", "not", "no" or "NO" or ends in "n't", else "yes"."""
    words = _script_words(text, first_sentence=False)
    return NO if any(w in _OPERA_NEGATIONS or w.endswith("n't") for w in words) else YES


def read_icd(text: str) -> str:
    """ICD's rule: the official one, except that the first sentence must have the word "Yes" or
    "yes" to count as yes; an answer with neither word is ``LEFT_OUT``."""
    words = _script_words(text, first_sentence=True)
    if any(w in _OFFICIAL_NEGATIONS for w in words):
        return NO
    return YES if "Yes" in words or "yes" in words else LEFT_OUT


def read_vcd(text: str) -> str:
    """VCD's reading without the label: which of the substrings "yes" and "no" the lower-cased
    answer contains (one of ``VCD_READINGS``). The verdict needs the label: see ``vcd_verdict``."""
    low = text.lower()
    has_yes, has_no = "yes" in low, "no" in low
    return "both" if has_yes and has_no else "yes_only" if has_yes else "no_only" if has_no else "neither"


def vcd_verdict(reading: str, label: str) -> str:
    """VCD's verdict: on a "yes" question the answer is yes (TP) if it contains "yes", else no
    (FN); on a "no" question it is no (TN) if it contains "no" (so "know", "snow", "not" count),
    else yes (FP). A reading that is not one of ``VCD_READINGS`` is "unknown"."""
    if reading not in VCD_READINGS:
        return UNKNOWN
    if label == YES:
        return YES if reading in ("yes_only", "both") else NO
    return NO if reading in ("no_only", "both") else YES


def _clean_label(label: Any) -> str:
    value = str(label).strip().lower()
    if value not in (YES, NO):
        raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
    return value


@dataclass(frozen=True)
class PopeParser:
    """One answer rule. ``read``: text -> a label-free reading (what ``attnkit eval`` stores as
    ``parsed``); ``verdict``: (reading, label) -> "yes" | "no" | "unknown" | "left_out", the answer
    as its script counts it (TP = yes on a yes question, FP = yes on a no question, ...).
    Calling the parser, ``parser(text, label)``, does both; ``label`` is needed only when
    ``needs_label`` (vcd)."""

    name: str
    read: Callable[[str], str]
    rule: str
    papers: str
    scripts: tuple[str, ...] = ()
    judge: Callable[[str, str], str] | None = None  # label-dependent verdict; None: the reading is the verdict

    @property
    def needs_label(self) -> bool:
        return self.judge is not None

    def verdict(self, reading: str, label: Any = None) -> str:
        if self.judge is None:
            return reading
        if label is None:
            raise ValueError(f"the {self.name} parser needs the question's label")
        return self.judge(reading, _clean_label(label))

    def __call__(self, text: str, label: Any = None) -> str:
        return self.verdict(self.read(text), label)


#: Answer parsers by name (``--parser``), and the papers whose evaluation script each reproduces
#: (the rules: each parser's ``rule`` and the ``read_*`` functions above):
#:
#: | name     | papers (scripts: repository, path)                                                     |
#: |----------|----------------------------------------------------------------------------------------|
#: | attnkit  | none: attnkit's own rule, ``parse_answer`` (the default)                               |
#: | official | POPE, LLaVA-1.5 (RUCAIBox/POPE evaluate.py; haotian-liu/LLaVA llava/eval/eval_pope.py) |
#: | opera    | OPERA, PAI, HALC (shikiw/OPERA pope_eval.py; LALBJ/PAI pope_ans.py;                    |
#: |          | BillChan226/HALC run_scripts/pope_eval.py)                                             |
#: | vcd      | VCD, AGLA and works built on their code (DAMO-NLP-SG/VCD                               |
#: |          | experiments/eval/eval_pope.py; Lackel/AGLA eval/eval_pope.py)                          |
#: | icd      | ICD (p1k0pan/ICD experiments/eval_scripts/eval_pope.py)                                |
#:
#: What the scripts compute from the verdicts, and how ``pope_metrics`` matches it: all of them
#: print accuracy, precision, recall and F1 (yes = positive) from TP/FP/TN/FN, and a yes ratio.
#: POPE, LLaVA, OPERA, PAI, HALC: every answer is yes or no; accuracy = (TP+TN)/all, yes ratio =
#: yes answers/all. VCD, AGLA: the same counts from the label-judged verdicts, accuracy =
#: (TP+TN)/questions, yes ratio = (TP+FP)/questions. ICD: left-out answers are in no count;
#: accuracy = (TP+TN)/(TP+TN+FP+FN), but the yes ratio divides by all answers, left-out ones
#: included (reproduced; ``left_out`` in the metrics says how many).
#:
#: Where attnkit departs from these scripts (the verdicts themselves are theirs): answers are
#: matched to questions by question id, not by position in the file; a label must be yes or no
#: (any case; 1/0 in an answers file) where the scripts count any label but "no" as yes (VCD and
#: AGLA: as an "unknown" question in the accuracy denominator); a zero denominator gives 0, not a
#: ZeroDivisionError; ICD's script reports 3000 minus the counted answers as its "other" count
#: (a hard-coded file size), attnkit the true number left out; ``attnkit eval`` strips each reply
#: of surrounding white space before any parser, ``attnkit pope`` takes answers as they are.
PARSERS: dict[str, PopeParser] = {
    "attnkit": PopeParser(
        "attnkit", parse_answer,
        "attnkit's own: the first sentence, any case; no, not, cannot or a word ending in n't means no; "
        "an answer without letters is unknown (scored as wrong)",
        "attnkit (default)"),
    "official": PopeParser(
        "official", read_official,
        "POPE's script: cut at the first '.', delete ',', split on spaces; a word 'No', 'not' or 'no' "
        "means no, anything else (an empty answer too) yes",
        "POPE, LLaVA-1.5", ("RUCAIBox/POPE: evaluate.py", "haotian-liu/LLaVA: llava/eval/eval_pope.py")),
    "opera": PopeParser(
        "opera", read_opera,
        "delete '.' and ',' (no sentence cut), split on spaces; a word 'No', 'not', 'no', 'NO' or ending "
        "in n't means no, else yes",
        "OPERA, PAI, HALC", ("shikiw/OPERA: pope_eval.py", "LALBJ/PAI: pope_ans.py",
                             "BillChan226/HALC: run_scripts/pope_eval.py")),
    "vcd": PopeParser(
        "vcd", read_vcd,
        "by the label: on a yes question yes iff 'yes' is in the lower-cased text, on a no question no "
        "iff 'no' is (so 'know' and 'snow' count as no)",
        "VCD, AGLA and works built on their code",
        ("DAMO-NLP-SG/VCD: experiments/eval/eval_pope.py", "Lackel/AGLA: eval/eval_pope.py"), vcd_verdict),
    "icd": PopeParser(
        "icd", read_icd,
        "the official rule, but yes only with a word 'Yes' or 'yes'; answers with neither are left out "
        "of the metrics (counted in left_out)",
        "ICD", ("p1k0pan/ICD: experiments/eval_scripts/eval_pope.py",)),
}


def get_parser(name: str) -> PopeParser:
    """The parser ``name`` (one of PARSERS), else DataError listing them."""
    if name not in PARSERS:
        raise DataError(f"unknown POPE parser {name!r}; valid: {', '.join(PARSERS)}")
    return PARSERS[name]


# ----------------------------------------------------------------------------- metrics


def pope_metrics(preds: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """Accuracy, precision, recall, f1 (positive = "yes"), yes_ratio, unknown, left_out, n and the counts.

    ``preds`` are verdicts (``PopeParser.verdict``). Any verdict other than "yes", "no" and
    "left_out" counts as unknown, and an unknown is wrong: it lowers accuracy, and on a "yes"
    question also recall (precision counts only "yes" verdicts). A "left_out" verdict (ICD's
    rule) is in no count: accuracy is (tp + tn) over the answers not left out. yes_ratio is the
    share of "yes" among all the answers, left-out ones included (as ICD's script computes it;
    the other rules leave nothing out). A ratio with a zero denominator is 0.
    """
    preds, labels = list(preds), [str(label).strip().lower() for label in labels]
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("no predictions to score")
    bad = next((label for label in labels if label not in (YES, NO)), None)
    if bad is not None:
        raise ValueError(f"label must be 'yes' or 'no', got {bad!r}")
    preds = [p if p in (YES, NO, LEFT_OUT) else UNKNOWN for p in preds]
    tp = sum(p == YES and t == YES for p, t in zip(preds, labels))
    fp = sum(p == YES and t == NO for p, t in zip(preds, labels))
    tn = sum(p == NO and t == NO for p, t in zip(preds, labels))
    fn = sum(p in (NO, UNKNOWN) and t == YES for p, t in zip(preds, labels))  # includes unknowns
    n = len(preds)
    left_out = preds.count(LEFT_OUT)
    scored = n - left_out
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / scored if scored else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
        "unknown": preds.count(UNKNOWN),
        "left_out": left_out,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def average_metrics(per_split: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Macro mean of each rate over the splits; n, unknown and left_out are totals."""
    if not per_split:
        raise ValueError("no splits to average")
    out: dict[str, Any] = {k: sum(m[k] for m in per_split) / len(per_split) for k in _RATES}
    out["n"] = sum(m["n"] for m in per_split)
    out["unknown"] = sum(m["unknown"] for m in per_split)
    out["left_out"] = sum(m.get("left_out", 0) for m in per_split)
    return out


def format_summary(metrics: dict[str, Any], left_out: bool | None = None) -> str:
    """Markdown table: one row per split and the average. A ``left_out`` column is added when
    ``left_out`` is True, or (None) when some answers were left out."""
    rows = [*metrics.get("splits", {}).items(), ("average", metrics["average"])]
    if left_out is None:
        left_out = any(m.get("left_out", 0) for _, m in rows)
    head = ["split", "acc", "precision", "recall", "f1", "yes_ratio", "unknown"] + (["left_out"] if left_out else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split, m in rows:
        cells = [split, *(f"{m[k]:.4f}" for k in _RATES), str(m["unknown"])]
        cells += [str(m.get("left_out", 0))] if left_out else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loaders


def find_question_file(data_dir: Path, source: str, split: str) -> Path | None:
    """The split's question file in ``data_dir`` or ``data_dir/<source>``, else None."""
    for folder in (data_dir, data_dir / source):
        for name in question_file_names(source, split):
            if (folder / name).is_file():
                return folder / name
    return None


def _rows(path: Path, what: str = "POPE question file") -> Iterable[tuple[str, Any]]:
    """(location, parsed JSON) per record: JSON lines, or a JSON array as in the SEEM-built files."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
        for i, row in enumerate(items, 1):
            yield f"{path}, item {i}", row
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: malformed JSON line ({e.msg})") from None
        yield f"{path}, line {lineno}", row


def _label(value: Any, where: str, field: str, qid: Any) -> str:
    label = value.strip().lower() if isinstance(value, str) else value
    if label not in (YES, NO):
        raise DataError(f"{where}: field {field!r} must be 'yes' or 'no', got {value!r} (question_id {qid!r})")
    return label


def load_question_file(
    path: Path, source: str, split: str, image_dir: Path, suffix: str = DEFAULT_SUFFIX
) -> list[Sample]:
    """Samples of one original question file (``{"question_id", "image", "text", "label"}`` per line)."""
    samples: list[Sample] = []
    seen: set[Any] = set()
    for where, row in _rows(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field in _FIELDS:
            if field not in row:
                raise DataError(f"{where}: missing field {field!r}")
        qid, image, text = row["question_id"], row["image"], row["text"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(f"{where}: field 'question_id' must be an integer or a string, got {qid!r}")
        if qid in seen:
            raise DataError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: field 'image' must be a file name (question_id {qid!r})")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string (question_id {qid!r})")
        samples.append(
            Sample(
                id=f"{source}/{split}/{qid}",
                image=image_dir / image,
                question=text.strip() + suffix,
                label=_label(row["label"], where, "label", qid),
                meta={"source": source, "split": split, "question_id": qid,
                      "object": object_of(text), "image": image},
            )
        )
    if not samples:
        raise DataError(f"POPE question file {path} is empty (no questions)")
    return samples


class _RowImage:
    """Zero-argument loader of one row's image of a datasets split (decoded on call)."""

    def __init__(self, images: Any, index: int, where: str) -> None:
        self.images, self.index, self.where = images, index, where

    def __call__(self) -> Any:
        image = self.images[self.index]["image"]
        if image is None:
            raise DataError(f"{self.where}: row {self.index} has no image")
        return image

    def __repr__(self) -> str:
        return f"<image of row {self.index} of {self.where}>"


def load_hf_split(name: str, source: str, split: str, suffix: str = DEFAULT_SUFFIX) -> list[Sample]:
    """Samples of one split of a dataset laid out like lmms-lab/POPE (config "Full"); images stay lazy."""
    import datasets  # heavy; only this layout needs it

    where = f"{name} [{HF_CONFIG}/{split}]"
    try:
        ds = datasets.load_dataset(name, HF_CONFIG, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        first = (str(e).strip().splitlines() or [""])[0]
        if "corresponds to no data" in first:  # how datasets reports an empty split
            raise DataError(f"{where}: empty split (no questions)") from None
        raise DataError(f"cannot load {where} as a Hugging Face dataset: {type(e).__name__}: {first}") from None
    for field in _HF_FIELDS:
        if field not in ds.column_names:
            raise DataError(f"{where}: missing field {field!r} (columns: {', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DataError(f"{where}: empty split (no questions)")
    text_cols = [c for c in ("question_id", "question", "answer", "image_source") if c in ds.column_names]
    rows = ds.select_columns(text_cols).to_list()  # no image is decoded here
    images = ds.select_columns(["image"])
    samples: list[Sample] = []
    seen: set[Any] = set()
    for i, row in enumerate(rows):
        qid, text = row["question_id"], row["question"]
        if qid is None or qid in seen:
            raise DataError(f"{where}: row {i}: {'missing' if qid is None else 'duplicate'} question_id {qid!r}")
        seen.add(qid)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: row {i}: field 'question' is empty (question_id {qid!r})")
        samples.append(
            Sample(
                id=f"{source}/{split}/{qid}",
                image=_RowImage(images, i, where),
                question=text.strip() + suffix,
                label=_label(row["answer"], f"{where}: row {i}", "answer", qid),
                meta={"source": source, "split": split, "question_id": qid,
                      "object": object_of(text), "image": row.get("image_source")},
            )
        )
    return samples


# ----------------------------------------------------------------------------- builder


def _read_instances(path: Path) -> tuple[dict[int, str], dict[int, set[str]]]:
    """(image id -> file name, image id -> distinct category names) of a COCO instances file."""
    data = read_json(path, "COCO instances file")
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing field {key!r} (a list)")

    def field(kind: str, j: int, item: Any, key: str) -> Any:
        if not isinstance(item, dict) or key not in item:
            raise DataError(f"{path}: {kind}[{j}] missing field {key!r}")
        return item[key]

    names = {field("categories", j, c, "id"): str(field("categories", j, c, "name")).strip()
             for j, c in enumerate(data["categories"])}
    files = {field("images", j, im, "id"): str(field("images", j, im, "file_name"))
             for j, im in enumerate(data["images"])}
    cats: dict[int, set[str]] = {image_id: set() for image_id in files}
    for j, ann in enumerate(data["annotations"]):
        image_id, cat_id = field("annotations", j, ann, "image_id"), field("annotations", j, ann, "category_id")
        if image_id not in files:
            raise DataError(f"{path}: annotations[{j}] refers to unknown image_id {image_id!r}")
        if cat_id not in names:
            raise DataError(f"{path}: annotations[{j}] refers to unknown category_id {cat_id!r}")
        cats[image_id].add(names[cat_id])
    return files, cats


def _negative(
    split: str,
    positive: str,
    absent: list[str],
    popular_order: list[str],
    cooc: dict[str, Counter[str]],
    rng: random.Random,
) -> str:
    """One absent category for the split's strategy; ``absent`` is sorted and non-empty."""
    candidates = set(absent)
    if split == "popular":
        return next(c for c in popular_order if c in candidates)
    if split == "adversarial":
        ranked = sorted((c for c, n in cooc[positive].items() if n > 0 and c in candidates),
                        key=lambda c: (-cooc[positive][c], c))
        if ranked:
            return ranked[0]
    return rng.choice(absent)  # random split, or no absent category ever co-occurs with the positive


def build_pope(
    instances_json: str | Path,
    out_dir: str | Path,
    *,
    source: str = "coco",
    num_images: int = 500,
    questions_per_image: int = 6,
    seed: int = 0,
    splits: str | Iterable[str] = SPLITS,
) -> dict[str, Path]:
    """Write ``{source}_pope_{split}.json`` files (original format) and ``{source}_pope_build.json``.

    Images: ``num_images`` drawn with ``seed`` among those with at least questions_per_image/2
    distinct categories. Per image, questions_per_image/2 present categories (same for every
    split), each followed by an absent one: random = uniform; popular = most frequent over all
    images of the file; adversarial = most co-occurring (same image) with that positive over
    all images of the file, falling back to random when none co-occurs.
    Returns {split: path}.
    """
    check_source(source)
    split_list = resolve_splits(splits)
    if isinstance(questions_per_image, bool) or questions_per_image < 2 or questions_per_image % 2:
        raise ValueError(f"questions_per_image must be an even number >= 2, got {questions_per_image!r}")
    if isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images!r}")
    k = questions_per_image // 2
    path = Path(instances_json)
    files, cats = _read_instances(path)

    freq: Counter[str] = Counter(c for cs in cats.values() for c in cs)  # images containing c
    cooc: dict[str, Counter[str]] = defaultdict(Counter)  # images containing both
    for cs in cats.values():
        for a in cs:
            cooc[a].update(b for b in cs if b != a)
    vocab = sorted(freq)
    popular_order = sorted(vocab, key=lambda c: (-freq[c], c))

    eligible = sorted(i for i, cs in cats.items() if len(cs) >= k)
    if len(eligible) < num_images:
        raise DataError(f"{path}: only {len(eligible)} images have >= {k} distinct categories; "
                        f"num_images={num_images}")
    rng = random.Random(seed)
    chosen = rng.sample(eligible, num_images)
    positives = {i: rng.sample(sorted(cats[i]), k) for i in chosen}

    questions: dict[str, list[dict[str, Any]]] = {}
    for split in split_list:
        split_rng = random.Random(f"{seed}/{split}")  # a split's negatives do not depend on the others
        rows: list[dict[str, Any]] = []
        for image_id in chosen:
            used = set(cats[image_id])
            for pos in positives[image_id]:
                absent = [c for c in vocab if c not in used]
                if not absent:
                    raise DataError(f"{path}: image {image_id} ({files[image_id]}) leaves fewer than {k} "
                                    f"absent categories to ask about")
                neg = _negative(split, pos, absent, popular_order, cooc, split_rng)
                used.add(neg)
                for obj, label in ((pos, YES), (neg, NO)):
                    rows.append({"question_id": len(rows) + 1, "image": files[image_id],
                                 "text": pope_question(obj, suffix=""), "label": label})
        questions[split] = rows

    out = Path(out_dir)
    written: dict[str, Path] = {}
    record = {
        "source": source,
        "seed": seed,
        "num_images": num_images,
        "questions_per_image": questions_per_image,
        "splits": list(split_list),
        "instances": str(path),
        "instances_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "eligible_images": len(eligible),
        "statistics": "image-level category frequency and co-occurrence over all images of the instances file",
        "image_ids": chosen,
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        for split, rows in questions.items():
            written[split] = out / question_file_names(source, split)[0]
            written[split].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (out / f"{source}_pope_build.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write POPE files to {out}: {e}") from None
    return written


# ----------------------------------------------------------------------------- answers made elsewhere

_QUESTION_FILE = re.compile(r"^(?P<source>.+?)_pope_(?:seem_)?(?P<split>.+)$")
_ANSWER_IDS = ("question_id", "id")


def find_question_files(paths: str | Path | Iterable[str | Path]) -> dict[str, Path]:
    """{split: question file} of question files and dirs. A dir gives its ``*_pope_*.json`` files
    (not ``*_pope_build.json``); a file's split is the ``{split}`` of ``{source}_pope_{split}.json``
    (or ``{source}_pope_seem_{split}.json``), else its name without suffix. Two files of one
    split are an error. Ordered random, popular, adversarial, then any other splits as given."""
    out: dict[str, Path] = {}
    for given in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(f for f in path.glob("*_pope_*.json") if f.is_file() and not f.stem.endswith("_pope_build"))
            if not found:
                raise DataError(f"no POPE question files ({{source}}_pope_{{split}}.json) in {path}")
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"POPE question file not found: {path}")
        for f in found:
            m = _QUESTION_FILE.match(f.stem)
            split = m.group("split") if m else f.stem
            if split in out and out[split].resolve() != f.resolve():
                raise DataError(f"{out[split]} and {f} both hold split {split!r}; score them one at a time")
            out[split] = f
    if not out:
        raise DataError("no POPE question file given")
    order = [s for s in SPLITS if s in out] + [s for s in out if s not in SPLITS]
    return {s: out[s] for s in order}


def _answer_label(value: Any, where: str, qid: Any) -> str:
    """An answer line's label: yes/no in any case, or 1/0 (PAI's answer files); else DataError."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return YES if value == 1 else NO
    if isinstance(value, str) and value.strip().lower() in (YES, NO):
        return value.strip().lower()
    raise DataError(f"{where}: field 'label' must be 'yes' or 'no' (or 1/0), got {value!r} (question_id {qid!r})")


def _answer_split(row: dict[str, Any], where: str, qid: Any) -> str | None:
    """The split an answer line names: its ``split`` or ``category`` field, or ``meta.split`` (as in
    attnkit's own samples.jsonl); None when it names none."""
    meta = row.get("meta")
    for field, value in (("split", row.get("split")), ("category", row.get("category")),
                         ("meta.split", meta.get("split") if isinstance(meta, dict) else None)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field {field!r} must be a split name, got {value!r} (question_id {qid!r})")
        return value.strip()
    return None


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines atomically (temp file, then rename): an old file survives a failure."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"cannot write POPE results to {path}: {e.strerror or e}") from None


def score_answers_file(
    answers: str | Path,
    questions: str | Path | Iterable[str | Path] | None = None,
    *,
    parser: str = "attnkit",
    answer_key: str = "text",
    output: str | Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score POPE answers made by another tool; write one result line per answer. Returns (metrics, path).

    ``answers``: JSON lines (or a JSON list), each with a question id (``question_id`` or ``id``)
    and the answer text under ``answer_key``. Labels: the line's ``label`` field (yes/no, or 1/0)
    when it has one, else the question files ``questions`` (files or dirs, see
    ``find_question_files``); with both, they must agree. Splits: the question file an answer's
    question is in. Question ids repeat across POPE's split files (each counts from 1), so with
    several question files an answer must name its split (a ``split`` or ``category`` field, or
    ``meta.split``) unless its id is in one file only; an ambiguous id is an error. Without
    question files the split is the one the line names, else "all".

    Metrics as ``PopeTask.score``: {"splits": {split: pope_metrics}, "average": ...}, plus the
    parser, the files, and ``unanswered`` ({split: questions without an answer}) when question
    files are given. ``output`` (default ``<answers without suffix>.pope.jsonl``) gets
    ``{"question_id", "split", "answer", "label", "verdict"}`` per answer, in the answers' order;
    it may not be the answers file or a question file. Bad input is a DataError naming the file,
    the line and the question id; nothing is written then.
    """
    rule = get_parser(parser)
    src = Path(answers).expanduser()
    out = Path(output).expanduser() if output is not None else src.with_name(src.with_suffix("").name + ".pope.jsonl")
    files = find_question_files(questions) if questions is not None else {}
    for protected in (src, *files.values()):
        if out.resolve() == protected.resolve():
            raise OutputError(f"{out}: the results would overwrite the input {protected}; choose another --output")

    index: dict[str, dict[str, tuple[Any, str]]] = {}  # split -> str(question_id) -> (question_id, label)
    for split, path in files.items():
        m = _QUESTION_FILE.match(path.stem)
        source = m.group("source") if m else "pope"
        index[split] = {str(q.meta["question_id"]): (q.meta["question_id"], q.label)
                        for q in load_question_file(path, source, split, Path("."), suffix="")}

    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], str] = {}
    for where, row in _rows(src, "POPE answers file"):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        id_field = next((f for f in _ANSWER_IDS if f in row), None)
        if id_field is None:
            raise DataError(f"{where}: missing field 'question_id' (or 'id')")
        qid = row[id_field]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataError(f"{where}: field {id_field!r} must be an integer or a string, got {qid!r}")
        if answer_key not in row:
            raise DataError(f"{where}: missing answer field {answer_key!r} (question_id {qid!r}; see --answer-key)")
        text = row[answer_key]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {answer_key!r} must be a string, got {text!r} (question_id {qid!r})")
        label = _answer_label(row["label"], where, qid) if "label" in row else None
        named = _answer_split(row, where, qid)
        key = str(qid)
        if index:
            if named is not None:
                if named not in index:
                    raise DataError(f"{where}: split {named!r} has no question file (question_id {qid!r}; "
                                    f"splits: {', '.join(index)})")
                split = named
            elif len(index) == 1:
                split = next(iter(index))
            else:
                holding = [s for s in index if key in index[s]]
                if len(holding) > 1:
                    raise DataError(f"{where}: question_id {qid!r} is in several question files "
                                    f"({', '.join(holding)}); give each answer a 'split' field, or score one "
                                    f"answers file per question file")
                if not holding:
                    raise DataError(f"{where}: question_id {qid!r} is in none of the question files "
                                    f"({', '.join(str(p) for p in files.values())})")
                split = holding[0]
            if key not in index[split]:
                raise DataError(f"{where}: question_id {qid!r} is not in {files[split]}")
            truth = index[split][key][1]
            if label is not None and label != truth:
                raise DataError(f"{where}: label {label!r} differs from {truth!r} in {files[split]} "
                                f"(question_id {qid!r})")
            label = truth
        else:
            if label is None:
                raise DataError(f"{where}: no label for question_id {qid!r}: the line has no 'label' field "
                                f"and no question files were given (--questions)")
            split = named if named is not None else "all"
        if (split, key) in seen:
            raise DataError(f"{where}: a second answer to question_id {qid!r} of split {split!r} "
                            f"(the first at {seen[split, key].rsplit(', ', 1)[-1]})")
        seen[split, key] = where
        rows.append({"question_id": qid, "split": split, "answer": text, "label": label,
                     "verdict": rule(text, label)})
    if not rows:
        raise DataError(f"{src}: no answers (empty file)")

    first_seen = list(dict.fromkeys(r["split"] for r in rows))
    order = [s for s in SPLITS if s in first_seen] + [s for s in first_seen if s not in SPLITS]
    per_split = {s: pope_metrics([r["verdict"] for r in rows if r["split"] == s],
                                 [r["label"] for r in rows if r["split"] == s]) for s in order}
    metrics: dict[str, Any] = {"parser": rule.name, "answers": str(src), "per_answer": str(out)}
    if files:
        metrics["questions"] = {s: str(p) for s, p in files.items()}
        answered = Counter(r["split"] for r in rows)
        metrics["unanswered"] = {s: len(index[s]) - answered[s] for s in files}
    metrics["splits"] = per_split
    metrics["average"] = average_metrics(list(per_split.values()))
    _write_jsonl(out, rows)
    return metrics, out


# ----------------------------------------------------------------------------- task


@dataclass
class PopeOptions:
    """``attnkit eval --task pope`` options."""

    data_dir: str | None = option(None, help="question files ({source}_pope_{split}.json) or the lmms-lab/POPE "
                                             "dataset (a local copy or the hub name)")
    image_dir: str | None = option(None, help="images of the question files (default DATA_DIR/images)")
    source: str = option("coco", help="question source: coco, aokvqa, gqa (shapes: the testbed's)")
    split: str = option("adversarial", help="random, popular, adversarial, a comma list or all")
    strict: bool = option(False, help="replies that are not clearly yes/no count as unknown (attnkit parser)")
    suffix: str = option(DEFAULT_SUFFIX, help="text appended to each question")
    parser: str = option("attnkit", choices=tuple(PARSERS),
                         help="answer rule: attnkit's own, or the script of POPE (official), OPERA/PAI/HALC "
                              "(opera), VCD/AGLA (vcd) or ICD (icd)")


@register_task
class PopeTask(Task):
    """POPE yes/no object probing over one source and one or more splits.

    ``data_dir`` holds the original question files (``{source}_pope_{split}.json``, also looked
    for in ``data_dir/<source>``; images in ``image_dir``, default ``data_dir/images``), or is a
    Hugging Face dataset in the lmms-lab/POPE layout (a local directory or a hub name).
    ``parser`` names the answer rule (``PARSERS``; default attnkit's own); ``strict`` applies to
    the attnkit rule only.
    """

    name = "pope"
    description = "POPE yes/no object probing (Li et al. 2023): accuracy, precision, recall, F1, yes-ratio"
    Options = PopeOptions
    default_max_new_tokens = 16

    @classmethod
    def from_options(cls, options: PopeOptions, *, seed: int = 0) -> PopeTask:
        if options.data_dir is None:
            raise DataError("--task pope needs --data-dir (question files or the lmms-lab/POPE dataset)")
        return cls(options.data_dir, source=options.source, splits=options.split.split(","),
                   image_dir=options.image_dir, suffix=options.suffix, strict=options.strict,
                   parser=options.parser)

    def __init__(
        self,
        data_dir: str | Path,
        *,
        source: str = "coco",
        splits: str | Iterable[str] = ("adversarial",),
        image_dir: str | Path | None = None,
        suffix: str = DEFAULT_SUFFIX,
        strict: bool = False,
        parser: str = "attnkit",
    ) -> None:
        self.data_dir = data_dir
        self.source = check_source(source)
        self.splits = resolve_splits(splits)
        self.image_dir = Path(image_dir) if image_dir is not None else Path(data_dir) / "images"
        self.suffix = suffix
        self.rule = get_parser(parser)
        if strict and parser != "attnkit":
            raise DataError(f"--strict applies to the attnkit parser only, not to --parser {parser}")
        self.parser = parser
        self.strict = strict
        self.layout: str | None = None  # "original" or "hf", known after load()
        self.files: dict[str, str] = {}

    def load(self) -> list[Sample]:
        root = Path(self.data_dir)
        if root.is_dir():
            found = {s: find_question_file(root, self.source, s) for s in self.splits}
            if any(found.values()) or any(root.glob("*_pope_*.json")) or any(root.glob("*/*_pope_*.json")):
                missing = [s for s, p in found.items() if p is None]
                if missing:
                    name = question_file_names(self.source, missing[0])[0]
                    raise DataError(f"missing POPE question file {root / name}")
                self.layout = "original"
                self.files = {s: str(p) for s, p in found.items()}
                return [s for split, p in found.items() if p is not None
                        for s in load_question_file(p, self.source, split, self.image_dir, self.suffix)]
        elif root.exists():
            raise DataError(f"POPE data dir is not a directory: {root}")
        elif root.is_absolute() or str(self.data_dir).startswith((".", "~")) or str(self.data_dir).count("/") != 1:
            raise DataError(f"POPE data dir not found: {root}")
        self.layout = "hf"
        name = str(self.data_dir)
        return [s for split in self.splits for s in load_hf_split(name, self.source, split, self.suffix)]

    def parse(self, output: str) -> str:
        """The parser's label-free reading of a reply (the verdict itself, except for vcd)."""
        if self.parser == "attnkit":
            return parse_answer(output, strict=self.strict)
        return self.rule.read(output)

    def verdict(self, record: dict[str, Any]) -> str:
        """The record's verdict ("yes", "no", "unknown" or "left_out") under the task's parser: its
        ``parsed`` reading (parsed again from ``output`` when missing) judged with its label."""
        parsed = record.get("parsed")
        if parsed is None:
            parsed = self.parse(record.get("output") or "")
        try:
            return self.rule.verdict(parsed, record.get("label"))
        except ValueError as e:
            raise DataError(f"record {record.get('id')!r}: {e}") from None

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """{"splits": {split: pope_metrics}, "average": average_metrics over those splits}."""
        by_split: dict[str, tuple[list[Any], list[Any]]] = {}
        for r in records:
            split = (r.get("meta") or {}).get("split")
            if split not in SPLITS:
                raise DataError(f"record {r.get('id')!r}: meta.split must be one of {', '.join(SPLITS)}, "
                                f"got {split!r}")
            preds, labels = by_split.setdefault(split, ([], []))
            preds.append(self.verdict(r))
            labels.append(r.get("label"))
        if not by_split:
            raise DataError("no POPE records to score")
        order = [s for s in self.splits if s in by_split]
        order += [s for s in SPLITS if s in by_split and s not in order]
        try:
            per_split = {s: pope_metrics(*by_split[s]) for s in order}
        except ValueError as e:
            raise DataError(f"cannot score POPE records: {e}") from None
        return {"splits": per_split, "average": average_metrics(list(per_split.values()))}

    def summary(self, metrics: dict[str, Any]) -> str:
        """Markdown table: one row per split and the average (with a left_out column for icd)."""
        return format_summary(metrics, left_out=True if self.parser == "icd" else None)

    def config(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "source": self.source,
            "splits": list(self.splits),
            "data_dir": str(self.data_dir),
            "image_dir": str(self.image_dir) if self.layout != "hf" else None,
            "layout": self.layout,
            "files": dict(self.files),
            "suffix": self.suffix,
            "strict": self.strict,
            "parser": self.parser,
        }
