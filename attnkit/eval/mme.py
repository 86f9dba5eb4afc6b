"""MME (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models").

Fourteen subtasks of yes/no questions, two per image (one true, one false): ten of perception
(existence, count, position, color, posters, celebrity, scene, landmark, artwork, OCR) and four
of cognition (commonsense_reasoning, numerical_calculation, text_translation, code_reasoning).
Scores as the official ``eval_tool/calculation.py`` defines them, per subtask:

- acc  = questions answered right / questions
- acc+ = images with both questions right / images
- score = 100 * acc + 100 * acc+ (at most 200)

and the perception total (sum of the ten perception scores, at most 2000) and the cognition
total (sum of the four, at most 800). A reply that is neither yes nor no ("other") is wrong.

Replies are read with the official rule (``parse_official``): lower-case the reply; "yes" if
"yes" occurs in its first four characters, else "no" if "no" does, else "other". ``parser=
"lmms-eval"`` uses lmms-eval's variant instead (``parse_lmms_eval``). attnkit's POPE parser
(``attnkit.eval.pope.parse_answer``) is not used: it reads the whole first sentence, so "The
answer is yes." is yes there and other here, and "Yes, there is no dog." is no there and yes here.

Two layouts load (``MmeTask.load``): the official release directory (one folder per subtask,
``<stem>.txt`` files of ``question<TAB>Yes|No`` lines next to the images or in
``questions_answers_YN/`` beside ``images/``) and the lmms-lab/MME Hugging Face dataset
(columns question_id, image, question, answer, category; images decoded only when used).

The prompt (``mme_prompt``): the released questions end with "Please answer yes or no.". By
default that ending is replaced by "\\nAnswer the question using a single word or phrase.", the
prompt behind LLaVA-1.5's published MME numbers (LLaVA's ``llava_mme.jsonl``; lmms-eval's default
``post_prompt`` does the same). ``suffix=""`` keeps each question exactly as released.

Where this departs from the official scripts:

1. Pairing. calculation.py pairs consecutive lines of a result file; here the two questions of an
   image are paired by subtask and image name, so order does not matter. An image with only one
   question scored (a run cut by ``--limit``) counts in acc but not in acc+ (the official script
   asserts two per image) and is reported as ``incomplete_images``.
2. A reply holding a tab or a newline breaks the official result file (the line is skipped, or the
   pairs shift); here the reply is parsed whole. The runner strips leading and trailing white
   space from every reply before parsing, as LLaVA's ``model_vqa_loader`` does.
3. Loading checks what the official scripts assert or crash on: every ``.txt`` line must be
   ``question<TAB>answer`` with a yes/no answer (any case, surrounding space ignored), every image
   must have exactly two questions, and a requested subtask folder must exist.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.errors import DataError
from attnkit.eval.base import Sample, Task
from attnkit.eval.pope import _RowImage
from attnkit.eval.registry import register_task
from attnkit.options import option

PERCEPTION: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                               "landmark", "artwork", "OCR")
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                              "code_reasoning")
SUBTASKS: tuple[str, ...] = PERCEPTION + COGNITION
GROUPS: dict[str, tuple[str, ...]] = {"perception": PERCEPTION, "cognition": COGNITION, "all": SUBTASKS}
#: what LLaVA-1.5's MME evaluation puts in place of "Please answer yes or no."
LLAVA_SUFFIX = "\nAnswer the question using a single word or phrase."
PARSERS: tuple[str, ...] = ("official", "lmms-eval")
YES, NO, OTHER = "yes", "no", "other"
RELEASE_DIR = "MME_Benchmark_release_version"
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
QUESTIONS_PER_IMAGE = 2
HF_SPLIT = "test"

_HF_FIELDS = ("question_id", "image", "question", "answer", "category")
_INSTRUCTION = re.compile(r"\s*Please answer yes or no\.?\s*$", re.IGNORECASE)
_CANON = {name.lower(): name for name in SUBTASKS}


# ----------------------------------------------------------------------------- names


def resolve_subtasks(subtasks: str | Iterable[str]) -> tuple[str, ...]:
    """Subtask names in MME's order from names and groups (perception, cognition, all), any case;
    a string is a comma list. DataError naming an unknown one."""
    names = subtasks.split(",") if isinstance(subtasks, str) else list(subtasks)
    chosen: set[str] = set()
    for raw in names:
        key = str(raw).strip().lower()
        if not key:
            continue
        if key in GROUPS:
            chosen.update(GROUPS[key])
        elif key in _CANON:
            chosen.add(_CANON[key])
        else:
            raise DataError(f"unknown MME subtask {str(raw).strip()!r}; valid: perception, cognition, all, "
                            f"{', '.join(SUBTASKS)}")
    if not chosen:
        raise DataError("no MME subtask given; valid: perception, cognition, all or subtask names")
    return tuple(s for s in SUBTASKS if s in chosen)


def group_of(subtask: str) -> str:
    """ "perception" or "cognition"."""
    return "perception" if subtask in PERCEPTION else "cognition"


# ----------------------------------------------------------------------------- prompt / parsers


def mme_prompt(question: str, suffix: str = LLAVA_SUFFIX) -> str:
    """The question as asked: with ``suffix`` in place of its "Please answer yes or no." ending (the
    suffix is appended if there is no such ending); ``suffix=""``: the question as released."""
    question = question.strip()
    if not suffix:
        return question
    return _INSTRUCTION.sub("", question) + suffix


def parse_official(text: str) -> str:
    """A reply -> "yes" | "no" | "other", as the official calculation.py reads it: lower-cased,
    "yes" if its first four characters contain "yes", else "no" if they contain "no", else "other"."""
    head = (text or "").lower()[:4]
    if YES in head:
        return YES
    if NO in head:
        return NO
    return OTHER


def parse_lmms_eval(text: str) -> str:
    """lmms-eval's reading: lower-case, strip, drop every "."; then a lone "y"/"n" is yes/no, and
    otherwise the official first-four-characters rule applies."""
    text = (text or "").lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": YES, "n": NO}.get(text, OTHER)
    return parse_official(text)


_PARSE = {"official": parse_official, "lmms-eval": parse_lmms_eval}


def parse_reply(text: str, parser: str = "official") -> str:
    """A reply read by the named parser (see PARSERS)."""
    if parser not in _PARSE:
        raise DataError(f"unknown MME parser {parser!r}; valid: {', '.join(PARSERS)}")
    return _PARSE[parser](text)


# ----------------------------------------------------------------------------- metrics


def subtask_metrics(items: Iterable[tuple[str, str, str]]) -> dict[str, Any]:
    """Metrics of one subtask from (image, parsed reply, label) per question.

    acc over questions; acc+ over images with both questions scored (those with one are counted
    as ``incomplete_images`` and left out of acc+); score = 100 * acc + 100 * acc+; ``other``:
    replies that are neither yes nor no (wrong)."""
    per_image: dict[str, list[bool]] = defaultdict(list)
    n = right = other = 0
    for image, parsed, label in items:
        ok = parsed == label
        per_image[image].append(ok)
        n += 1
        right += ok
        other += parsed not in (YES, NO)
    if not n:
        raise ValueError("no questions to score")
    complete = [oks for oks in per_image.values() if len(oks) == QUESTIONS_PER_IMAGE]
    acc = right / n
    acc_plus = sum(all(oks) for oks in complete) / len(complete) if complete else 0.0
    return {
        "acc": acc,
        "acc_plus": acc_plus,
        "score": 100 * acc + 100 * acc_plus,
        "questions": n,
        "images": len(complete),
        "incomplete_images": len(per_image) - len(complete),
        "other": other,
    }


# ----------------------------------------------------------------------------- release layout


def _child_dir(root: Path, name: str) -> Path | None:
    """``root/name``, matching the name in any case (the release spells OCR in capitals)."""
    if (root / name).is_dir():
        return root / name
    return next((d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() == name.lower()), None)


def release_root(data_dir: Path) -> Path | None:
    """The folder holding the subtask folders: ``data_dir`` or ``data_dir/MME_Benchmark_release_version``."""
    for root in (data_dir, data_dir / RELEASE_DIR):
        if root.is_dir() and any(_child_dir(root, s) is not None for s in SUBTASKS):
            return root
    return None


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    """(question, "yes"/"no") per line of one ``<stem>.txt`` file; DataError naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read MME question file {path}: {e}") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split("\t")
        if len(parts) != 2:
            what = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            raise DataError(f"{path}, line {lineno}: expected 'question<TAB>Yes|No', found {what}")
        question, answer = parts[0].strip(), parts[1].strip()
        if not question:
            raise DataError(f"{path}, line {lineno}: empty question")
        if answer.lower() not in (YES, NO):
            raise DataError(f"{path}, line {lineno}: answer must be Yes or No, got {answer!r}")
        out.append((question, answer.lower()))
    if len(out) != QUESTIONS_PER_IMAGE:
        raise DataError(f"{path}: expected {QUESTIONS_PER_IMAGE} questions (one pair per image), found {len(out)}")
    return out


def _find_image(image_dir: Path, stem: str, files: dict[str, list[Path]], default_suffix: str) -> Path:
    """The image ``<stem>.<ext>`` in ``image_dir``; if there is none, the path it would most likely
    have (the runner reports it missing, or skips it with --skip-missing)."""
    found = files.get(stem, [])
    if len(found) > 1:
        raise DataError(f"{image_dir}: several images for {stem}: {', '.join(p.name for p in found)}")
    return found[0] if found else image_dir / f"{stem}{default_suffix}"


def load_release_subtask(root: Path, subtask: str, suffix: str = LLAVA_SUFFIX) -> list[Sample]:
    """Samples of one subtask folder of the official release, two per image, in image-name order."""
    folder = _child_dir(root, subtask)
    if folder is None:
        raise DataError(f"missing MME subtask folder {root / subtask} (--subtasks chooses which to load)")
    if (folder / "images").is_dir():
        image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
        if not qa_dir.is_dir():
            raise DataError(f"missing MME folder {qa_dir} (next to {image_dir})")
    else:
        image_dir = qa_dir = folder
    txts = sorted((p for p in qa_dir.iterdir() if p.suffix == ".txt" and p.is_file()), key=lambda p: p.stem)
    if not txts:
        raise DataError(f"MME subtask folder {qa_dir} has no question files (<image>.txt)")
    files: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            files[p.stem].append(p)
    suffixes = Counter(p.suffix for ps in files.values() for p in ps)
    default_suffix = suffixes.most_common(1)[0][0] if suffixes else ".jpg"
    samples = []
    for txt in txts:
        image = _find_image(image_dir, txt.stem, files, default_suffix)
        qid = image.relative_to(root).as_posix()  # LLaVA's question_id: artwork/images/10002.jpg
        for k, (question, answer) in enumerate(_read_pairs(txt)):
            samples.append(Sample(
                id=f"{subtask}/{txt.stem}/{k}",
                image=image,
                question=mme_prompt(question, suffix),
                label=answer,
                meta={"subtask": subtask, "image": image.name, "question_index": k, "question_id": qid},
            ))
    return samples


# ----------------------------------------------------------------------------- Hugging Face layout


def load_hf(name: str, subtasks: Iterable[str], suffix: str = LLAVA_SUFFIX) -> list[Sample]:
    """Samples of a dataset laid out like lmms-lab/MME (split "test", or the only split there is),
    the chosen subtasks only, ordered like the release loader's; images stay lazy."""
    import datasets  # heavy; only this layout needs it

    try:
        loaded = datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the message is what matters
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load {name} as a Hugging Face dataset: {type(e).__name__}: {first}") from None
    splits = list(loaded)
    if HF_SPLIT not in splits and len(splits) != 1:
        raise DataError(f"{name}: no split {HF_SPLIT!r} (splits: {', '.join(splits) or 'none'})")
    split = HF_SPLIT if HF_SPLIT in splits else splits[0]
    ds = loaded[split]
    where = f"{name} [{split}]"
    for field in _HF_FIELDS:
        if field not in ds.column_names:
            raise DataError(f"{where}: missing field {field!r} (columns: {', '.join(ds.column_names)})")
    rows = ds.select_columns([f for f in _HF_FIELDS if f != "image"]).to_list()  # no image is decoded here
    images = ds.select_columns(["image"])
    wanted = set(subtasks)
    by_image: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, row in enumerate(rows):
        qid, category = row["question_id"], row["category"]
        if not isinstance(qid, str) or not qid.strip():
            raise DataError(f"{where}: row {i}: missing question_id")
        subtask = _CANON.get(str(category).strip().lower())
        if subtask is None:
            raise DataError(f"{where}: row {i}: unknown category {category!r} (question_id {qid!r})")
        if subtask in wanted:
            by_image[subtask, qid].append((i, row))
    samples = []
    for subtask in (s for s in SUBTASKS if s in wanted):
        keys = sorted((k for k in by_image if k[0] == subtask), key=lambda k: Path(k[1]).stem)
        if not keys:
            raise DataError(f"{where}: no questions of subtask {subtask!r}")
        for _, qid in keys:
            group = by_image[subtask, qid]
            if len(group) != QUESTIONS_PER_IMAGE:
                raise DataError(f"{where}: question_id {qid!r} has {len(group)} questions, expected "
                                f"{QUESTIONS_PER_IMAGE} (one pair per image)")
            image = Path(qid).name
            for k, (i, row) in enumerate(group):
                question, answer = row["question"], row["answer"]
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f"{where}: row {i}: field 'question' is empty (question_id {qid!r})")
                label = answer.strip().lower() if isinstance(answer, str) else answer
                if label not in (YES, NO):
                    raise DataError(f"{where}: row {i}: field 'answer' must be Yes or No, got {answer!r} "
                                    f"(question_id {qid!r})")
                samples.append(Sample(
                    id=f"{subtask}/{Path(qid).stem}/{k}",
                    image=_RowImage(images, i, where),
                    question=mme_prompt(question, suffix),
                    label=label,
                    meta={"subtask": subtask, "image": image, "question_index": k, "question_id": qid},
                ))
    return samples


# ----------------------------------------------------------------------------- task


@dataclass
class MmeOptions:
    """``attnkit eval --task mme`` options."""

    data_dir: str | None = option(None, help="MME_Benchmark_release_version/ (or its parent), or the lmms-lab/MME "
                                             "dataset (a local copy or the hub name)")
    subtasks: str = option("perception", help="perception, cognition, all, or a comma list of subtask names")
    suffix: str = option(LLAVA_SUFFIX, help="text put in place of each question's 'Please answer yes or no.' "
                                            "(LLaVA-1.5's by default; none: the questions as released)",
                         aliases={"none": ""})
    parser: str = option("official", help="how replies are read: official (calculation.py) or lmms-eval",
                         choices=PARSERS)


@register_task
class MmeTask(Task):
    """MME yes/no perception (and cognition) subtasks: acc, acc+ and score per subtask, and totals.

    ``data_dir`` is the official release directory (``MME_Benchmark_release_version`` or the
    folder holding it) or a Hugging Face dataset in the lmms-lab/MME layout (a local directory or
    a hub name). Sample ids are ``<subtask>/<image stem>/<0|1>``.
    """

    name = "mme"
    description = "MME yes/no benchmark (Fu et al. 2023): acc, acc+, score per subtask; perception total /2000"
    Options = MmeOptions
    default_max_new_tokens = 16  # as lmms-eval; the official parser reads only the first four characters

    @classmethod
    def from_options(cls, options: MmeOptions, *, seed: int = 0) -> MmeTask:
        if options.data_dir is None:
            raise DataError("--task mme needs --data-dir (MME_Benchmark_release_version/ or the lmms-lab/MME dataset)")
        return cls(options.data_dir, subtasks=options.subtasks, suffix=options.suffix, parser=options.parser)

    def __init__(
        self,
        data_dir: str | Path,
        *,
        subtasks: str | Iterable[str] = "perception",
        suffix: str = LLAVA_SUFFIX,
        parser: str = "official",
    ) -> None:
        if parser not in PARSERS:
            raise DataError(f"unknown MME parser {parser!r}; valid: {', '.join(PARSERS)}")
        self.data_dir = data_dir
        self.subtasks = resolve_subtasks(subtasks)
        self.suffix = suffix
        self.parser = parser
        self.layout: str | None = None  # "release" or "hf", known after load()
        self.root: str | None = None

    def load(self) -> list[Sample]:
        path = Path(self.data_dir)
        if path.is_dir():
            root = release_root(path)
            if root is not None:
                self.layout, self.root = "release", str(root)
                return [s for sub in self.subtasks for s in load_release_subtask(root, sub, self.suffix)]
            if not any(path.rglob("*.parquet")):
                raise DataError(f"{path} holds neither the MME release layout (subtask folders such as existence/, "
                                f"OCR/) nor a Hugging Face dataset (parquet files)")
        elif path.exists():
            raise DataError(f"MME data dir is not a directory: {path}")
        elif path.is_absolute() or str(self.data_dir).startswith((".", "~")) or str(self.data_dir).count("/") != 1:
            raise DataError(f"MME data dir not found: {path}")
        self.layout = "hf"
        return load_hf(str(self.data_dir), self.subtasks, self.suffix)

    def parse(self, output: str) -> str:
        return parse_reply(output, self.parser)

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """{"subtasks": {name: subtask_metrics}, "perception"/"cognition": {"score", "subtasks", "max"}}
        (a group only when one of its subtasks was scored)."""
        items: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        seen: set[tuple[str, str, Any]] = set()
        for r in records:
            meta = r.get("meta") or {}
            subtask, image = meta.get("subtask"), meta.get("image")
            if subtask not in SUBTASKS:
                raise DataError(f"record {r.get('id')!r}: meta.subtask must be an MME subtask, got {subtask!r}")
            if not image:
                raise DataError(f"record {r.get('id')!r}: meta.image is missing")
            key = (subtask, str(image), meta.get("question_index"))
            if key in seen:
                raise DataError(f"record {r.get('id')!r}: a second record for question {key[2]!r} of image "
                                f"{image!r} ({subtask})")
            seen.add(key)
            label = str(r.get("label")).strip().lower()
            if label not in (YES, NO):
                raise DataError(f"record {r.get('id')!r}: label must be yes or no, got {r.get('label')!r}")
            parsed = r.get("parsed")
            if parsed is None:
                parsed = self.parse(r.get("output") or "")
            items[subtask].append((str(image), parsed, label))
        if not items:
            raise DataError("no MME records to score")
        per = {s: subtask_metrics(items[s]) for s in SUBTASKS if s in items}
        out: dict[str, Any] = {"subtasks": per}
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
            scored = [s for s in names if s in per]
            if scored:
                out[group] = {"score": sum(per[s]["score"] for s in scored), "subtasks": len(scored),
                              "max": 200 * len(scored)}
        return out

    def summary(self, metrics: dict[str, Any]) -> str:
        """Markdown table: acc and acc+ (%) and score per subtask, then the perception/cognition totals."""
        lines = ["| subtask | acc | acc+ | score | other |", "|---|---|---|---|---|"]
        for name, m in metrics["subtasks"].items():
            lines.append(f"| {name} | {100 * m['acc']:.2f} | {100 * m['acc_plus']:.2f} | {m['score']:.2f} "
                         f"| {m['other']} |")
        for group, full in (("perception", PERCEPTION), ("cognition", COGNITION)):
            if group in metrics:
                g = metrics[group]
                lines.append(f"| **{group}** ({g['subtasks']}/{len(full)} subtasks) | | | "
                             f"**{g['score']:.2f}** / {g['max']} | |")
        return "\n".join(lines)

    def config(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "data_dir": str(self.data_dir),
            "layout": self.layout,
            "root": self.root,
            "subtasks": list(self.subtasks),
            "suffix": self.suffix,
            "parser": self.parser,
        }
