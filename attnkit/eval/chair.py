"""CHAIR: object hallucination in captions (Rohrbach et al. 2018, "Object Hallucination in Image Captioning").

A caption mentions a COCO object through one of ~400 surface forms of the 80 categories
(``chair_words.SYNONYMS``). A mention is hallucinated when its category is not in the image's
ground truth: the categories of the image's instance annotations plus the objects its reference
captions mention (read with the same rules as the captions being scored).

- CHAIR_s = captions with >= 1 hallucinated mention / captions
- CHAIR_i = hallucinated mentions / mentions (every mention counts, repeats included)
- Recall  = sum over captions of |categories mentioned & ground truth| / sum of |ground truth|
- Len     = mean number of words per caption

How a caption is read: lower-case it; split it into sentences and each sentence into words
(runs of letters and digits, hyphenated words kept whole; punctuation and clitics such as
"'s" are not words and never join two words into a phrase); singularize every word
(``singularize``); join two-word phrases left to right: COCO phrases ("hot dog", "teddy bear",
"motor bike", ...), "baby X" / "adult X" for an animal X (-> X, not a person), "passenger
jet" / "passenger train" (-> the vehicle), "bow tie" (-> tie), "toilet seat" (-> toilet) and
"home plate" / "train track" (-> no object); if the caption has "toilet" anywhere, "seat"
counts nowhere in it; every remaining unit that is a surface form is a mention.

Deliberate differences from the two published scripts (both nltk-based: the "standalone"
port with Pattern's ``singularize`` and OPERA's copy with POS tags + WordNet lemmatizer).
Which way a difference moves the numbers follows from one rule: a mention newly recognised in
a *scored* caption can only raise CHAIR_s (if hallucinated) and can raise Recall, while an
object newly recognised in the *reference* captions enlarges the ground truth, which can only
lower CHAIR_s and CHAIR_i.

1. Normalisation is a rule-based noun singularizer (irregular plurals, -ses/-xes/-ches/-shes,
   -ies, -ves, and singular words ending in s), with no POS tagging and no verb lemmas.
   - vs the standalone port: singular words in -s stay whole. Pattern turns "bus" into "bu",
     so a singular "bus" counts in neither scored nor reference captions there; here it does
     (more bus mentions and ground truth). Pattern's "glass" -> "glas" is patched in the port
     with a "wine glas" phrase; here "wine glass" matches directly, so the counts agree.
   - vs OPERA's copy: "men" counts as person and "vases" as vase here; that copy leaves "men"
     unlemmatized and makes "vases" "vas", so neither counts there. More mentions here:
     mostly correct ones (lower CHAIR_i, higher Recall), plus any hallucinated ones (CHAIR_s up).
   - vs OPERA's copy: verb forms never become objects here. There, "seated" -> seat (chair),
     "tied" -> tie, "skiing"/"skateboarding"/"snowboarding" -> the object, in scored and
     reference captions alike. Fewer mentions here: a spurious "seated"/"tied" is usually
     hallucinated, so CHAIR_s and CHAIR_i are lower here where such words occur; for
     skis/skateboard/snowboard the reference side also shrinks, so the net direction is mixed.
   - "glasses" becomes "glass", which is no COCO word (COCO has only "wine glass"): neither
     eyeglasses nor drinking glasses count, as in the standalone port; "wine glasses" counts.
2. Three synonym entries that never match in either script count here: "motor bike" and
   "cheesecake" (stray leading space in the published list) and "iPhone" (capitalised while
   captions are lower-cased). More mentions; rare in practice.
3. Words are split at every non-letter, non-digit character except an inner hyphen, so
   "cup/mug" gives cup and mug (nltk keeps it one token, no mention): slightly more mentions.
   Sentence splitting matches the scripts (nltk splits sentences first): "table." is "table".
4. Len counts words. OPERA's Len counts tokens including punctuation and "'s" (a joined phrase
   as one token), so Len here is lower for the same captions; the standalone port has no Len.
5. An image id without ground truth is an error here; both scripts silently give it an empty
   ground truth, which makes every mention hallucinated. Ground truth is read from one split's
   files; the scripts merge train2014 and val2014, which gives the same sets for any image.

The per-image ground truth is built once and cached as JSON next to the annotations (or in
``~/.cache/attnkit``), keyed on the source files' size and mtime and on this code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import random
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from attnkit.errors import DataError, OutputError
from attnkit.eval import chair_words as W
from attnkit.eval.base import Sample, Task, coco_image_dir
from attnkit.eval.records import read_json
from attnkit.eval.registry import register_task
from attnkit.options import option

DEFAULT_PROMPT = "Please describe this image in detail."
_CACHE_FORMAT = "attnkit.chair.ground_truth/1"

# ----------------------------------------------------------------------------- singularizer


def singularize(word: str) -> str:
    """The singular of an English noun (lower-cased); words that are not plurals come back unchanged.

    Rule-based, no dictionary download: irregular plurals, -ses/-xes/-ches/-shes/-zes, -ies,
    -ves for the f/fe nouns, -oes, and words that end in s but are singular (bus, glass, lens).
    """
    w = word.lower()
    if w in W.IRREGULAR_PLURALS:
        return W.IRREGULAR_PLURALS[w]
    for plural, singular in W.IRREGULAR_SUFFIXES:
        if w.endswith(plural):
            return w[: -len(plural)] + singular
    if w.endswith("men") and w not in W.MEN_SINGULARS:
        return w[:-3] + "man"  # men, women, policemen, gentlemen
    if len(w) < 3 or not w.endswith("s") or w in W.UNCHANGED:
        return w
    if w.endswith(("ss", "us")):  # glass, dress, grass; bus, cactus, famous
        return w
    if w.endswith("is"):  # analysis, arthritis stay; skis, taxis lose the s
        return w if w.endswith(("sis", "itis")) else w[:-1]
    if w.endswith("ies"):
        return w[:-1] if len(w) <= 4 or w[:-1] in W.IE_SINGULARS else w[:-3] + "y"
    if w.endswith("oes"):
        return w[:-1] if w[:-1] in W.OE_SINGULARS or w.endswith("shoes") else w[:-2]
    if w.endswith("ses"):
        if w.endswith("sses") or w[:-2] in W.UNCHANGED:  # glasses, buses, lenses, gases
            return w[:-2]
        return w[:-1]  # horses, vases, cases, houses
    if w.endswith(("xes", "shes")):
        return w[:-2]
    if w.endswith("zes"):
        return w[:-2] if w.endswith("zzes") else w[:-1]  # buzzes; prizes
    if w.endswith("ches"):
        return w[:-1] if w[:-1] in W.CHE_SINGULARS else w[:-2]
    return w[:-1]


_singular = functools.lru_cache(maxsize=1 << 16)(singularize)  # captions repeat their words a lot

# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """The objects CHAIR counts: surface forms (singular words or two-word phrases) -> category.

    ``COCO`` is Rohrbach et al.'s table with its COCO-only phrase rules (baby/adult animals,
    passenger vehicles, bow tie, the toilet seat); ``load_vocabulary`` reads another set's
    categories and synonyms from JSON.
    """

    name: str
    surface_to_category: dict[str, str]
    phrase_to_word: dict[str, str]  # two singularized words -> the unit looked up in surface_to_category
    coco_rules: bool = False  # "seat" is no chair in a caption that mentions a toilet
    fingerprint: str = ""

    def category_of(self, name: str) -> str | None:
        """The category an annotation's category name stands for (None if the vocabulary lacks it)."""
        return self.surface_to_category.get(name.lower())


COCO = Vocabulary("coco", W.SURFACE_TO_CATEGORY, W.PHRASE_TO_WORD, coco_rules=True, fingerprint="coco")
_SURFACE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*(?: [a-z0-9]+(?:-[a-z0-9]+)*)?$")


def vocabulary_from(categories: dict[str, Any], name: str = "custom", where: str = "vocabulary") -> Vocabulary:
    """A Vocabulary from ``{category: [synonym, ...]}``; each name and synonym is one word or two.

    Surface forms are lower-cased and singularized word by word, as caption words are; a form
    claimed by two categories is an error.
    """
    if not isinstance(categories, dict) or not categories:
        raise DataError(f"{where}: 'categories' must be a non-empty object of category -> list of synonyms")
    surface: dict[str, str] = {}
    phrases: dict[str, str] = {}
    for cat, synonyms in categories.items():
        if not isinstance(synonyms, list) or not all(isinstance(x, str) for x in synonyms):
            raise DataError(f"{where}: category {cat!r}: synonyms must be a list of strings")
        for form in [cat, *synonyms]:
            text = " ".join(form.lower().split())
            if not _SURFACE.match(text):
                raise DataError(f"{where}: category {cat!r}: {form!r} is not one word or two")
            words = [singularize(w) for w in text.split()]
            unit = " ".join(words)
            if surface.get(unit, cat) != cat:
                raise DataError(f"{where}: {form!r} is listed under both {surface[unit]!r} and {cat!r}")
            surface[unit] = cat
            if len(words) == 2:
                phrases[unit] = unit
    digest = hashlib.sha256(json.dumps(sorted(surface.items())).encode()).hexdigest()[:12]
    return Vocabulary(name, surface, phrases, coco_rules=False, fingerprint=f"{name}-{digest}")


def load_vocabulary(path: str | Path | None) -> Vocabulary:
    """COCO's vocabulary for None, else the JSON file ``path``.

    The file holds ``{"name": ..., "categories": {category: [synonym, ...]}}`` (or just the
    categories object); e.g. ``attnkit/testbed/data/vocab.json`` of the shapes set.
    """
    if path is None:
        return COCO
    src = Path(path).expanduser()
    data = read_json(src, "CHAIR vocabulary file")
    if isinstance(data, dict) and "categories" in data:
        name = data.get("name") or src.stem
        return vocabulary_from(data["categories"], str(name), str(src))
    return vocabulary_from(data, src.stem, str(src))


# ----------------------------------------------------------------------------- reading captions

_TOKEN = re.compile(r"(?P<clitic>'(?:s|re|ve|ll|d|m|t)\b)|(?P<word>[^\W_]+(?:-[^\W_]+)*)|(?P<mark>\S)")


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after . ! ? followed by whitespace (a newline alone is not an end)."""
    parts = re.split(r"(?<=[.!?])\s+", text)
    return [p.strip() for p in parts if p.strip()]


def _sentence_tokens(sentence: str) -> list[str | None]:
    """Words of one sentence in order; None marks punctuation or a clitic (a phrase boundary)."""
    return [m.group("word") for m in _TOKEN.finditer(sentence)]


def _read(caption: str, vocab: Vocabulary = COCO) -> tuple[list[tuple[str, str]], int]:
    """(mentions as (surface words, category), number of words) of one caption."""
    text = caption.lower().replace("\u2019", "'")
    units: list[tuple[str, str]] = []  # (surface, unit word)
    n_words = 0
    for sentence in split_sentences(text):
        tokens = _sentence_tokens(sentence)
        n_words += sum(t is not None for t in tokens)
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok is None:
                i += 1
                continue
            sing = _singular(tok)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None:
                second = _singular(nxt)
                # first word singularized, or as written ("sports ball", "tennis racket")
                target = vocab.phrase_to_word.get(f"{sing} {second}") or vocab.phrase_to_word.get(f"{tok} {second}")
                if target is not None:
                    units.append((f"{tok} {nxt}", target))
                    i += 2
                    continue
            units.append((tok, sing))
            i += 1
    if vocab.coco_rules and any(u == "toilet" for _, u in units):  # "the seat of the toilet" is no chair
        units = [(s, u) for s, u in units if u != "seat"]
    table = vocab.surface_to_category
    mentions = [(s, table[u]) for s, u in units if u in table]
    return mentions, n_words


def extract_mentions(caption: str, vocab: Vocabulary = COCO) -> list[tuple[str, str]]:
    """Every object mention of ``caption`` in order, as (surface words, category)."""
    return _read(caption, vocab)[0]


def count_words(caption: str) -> int:
    """Number of words of ``caption`` (what Len averages)."""
    return _read(caption)[1]


# ----------------------------------------------------------------------------- ground truth


def _annotation_files(annotations_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(instances, captions) files of ``split``; DataError naming what is missing."""
    root = Path(annotations_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"COCO annotations dir not found: {root}")
    files = (root / f"instances_{split}.json", root / f"captions_{split}.json")
    for path in files:
        if not path.is_file():
            raise DataError(f"COCO annotation file not found: {path}")
    return files


def _read_coco(path: Path) -> Any:
    """A pycocotools COCO index of ``path`` (its progress prints silenced); DataError if unreadable."""
    from pycocotools.coco import COCO

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except (AssertionError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO annotation file ({type(e).__name__}: {e})") from None


def _int_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: image id must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise DataError(f"{where}: image id must be an integer, got {value!r}")


def _build_ground_truth(instances: Path, captions: Path, vocab: Vocabulary = COCO) -> dict[int, set[str]]:
    """Image id -> instance categories + categories mentioned in the reference captions."""
    inst = _read_coco(instances)
    caps = _read_coco(captions)
    gt: dict[int, set[str]] = {}
    for coco, path in ((inst, instances), (caps, captions)):
        for image_id in coco.imgs:
            gt.setdefault(_int_id(image_id, f"{path} images"), set())
    names: dict[Any, str] = {}
    for cat_id, cat in inst.cats.items():
        category = vocab.category_of(str(cat.get("name", "")))
        if category is None:
            what = "a COCO category (another set needs its vocabulary: --vocab)" if vocab is COCO else \
                f"a category of the {vocab.name} vocabulary"
            raise DataError(f"{instances}: category {cat_id} {cat.get('name')!r} is not {what}")
        names[cat_id] = category
    for ann in inst.anns.values():
        cat_id = ann.get("category_id")
        if cat_id not in names:
            raise DataError(f"{instances}: annotation {ann.get('id')} has unknown category_id {cat_id!r}")
        image_id = _int_id(ann.get("image_id"), f"{instances}: annotation {ann.get('id')}")
        gt.setdefault(image_id, set()).add(names[cat_id])
    for ann in caps.anns.values():
        text = ann.get("caption")
        if not isinstance(text, str):
            raise DataError(f"{captions}: annotation {ann.get('id')} has no 'caption' string")
        image_id = _int_id(ann.get("image_id"), f"{captions}: annotation {ann.get('id')}")
        gt.setdefault(image_id, set()).update(cat for _, cat in extract_mentions(text, vocab))
    return gt


def _code_fingerprint() -> str:
    """Hash of this module and its word lists: a cache built by other rules is not reused."""
    h = hashlib.sha256()
    for path in (Path(__file__), Path(W.__file__)):
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(str(path).encode())
    return h.hexdigest()[:16]


def _stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_path(annotations_dir: str | Path, split: str = "val2014", cache_dir: str | Path | None = None,
               vocab: Vocabulary = COCO) -> Path:
    """Where the ground-truth cache of ``split`` lives.

    ``cache_dir`` if given, else the annotations dir if writable, else ``~/.cache/attnkit``; outside
    the annotations dir the name carries a hash of its path, so one cache dir serves many. A
    vocabulary other than COCO's adds its fingerprint to the name.
    """
    root = Path(annotations_dir).expanduser()
    tag = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    split = split if vocab is COCO else f"{split}_{vocab.fingerprint}"
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / f"chair_ground_truth_{split}_{tag}.json"
    if os.access(root, os.W_OK):
        return root / f"chair_ground_truth_{split}.json"
    return Path.home() / ".cache" / "attnkit" / f"chair_ground_truth_{split}_{tag}.json"


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in ``path``'s dir, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_cache(path: Path, key: dict[str, Any]) -> dict[int, set[str]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        return {int(k): set(v) for k, v in data["ground_truth"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, stale or damaged: rebuild


def load_ground_truth(
    annotations_dir: str | Path, split: str = "val2014", cache_dir: str | Path | None = None,
    vocab: Vocabulary = COCO,
) -> dict[int, set[str]]:
    """Image id -> set of categories (instances U reference-caption mentions) of ``split``.

    Reads ``instances_{split}.json`` and ``captions_{split}.json`` with pycocotools once, then
    reuses a JSON cache (see ``cache_path``) while both files keep their size and mtime.
    """
    instances, captions = _annotation_files(annotations_dir, split)
    key = {"format": _CACHE_FORMAT, "code": _code_fingerprint(), "split": split, "vocab": vocab.fingerprint,
           "sources": [_stamp(instances), _stamp(captions)]}  # stamped before reading: a change mid-build rebuilds
    target = cache_path(annotations_dir, split, cache_dir, vocab)
    cached = _read_cache(target, key)
    if cached is not None:
        return cached
    gt = _build_ground_truth(instances, captions, vocab)
    payload = {"key": key, "ground_truth": {str(k): sorted(v) for k, v in sorted(gt.items())}}
    try:
        _atomic_write(target, json.dumps(payload, separators=(",", ":")))
    except OSError as e:
        warnings.warn(f"CHAIR ground-truth cache not written ({target}: {e}); it will be rebuilt next time",
                      stacklevel=2)
    return gt


# ----------------------------------------------------------------------------- scoring


def score_captions(
    items: Sequence[tuple[Any, str]],
    ground_truth: dict[int, set[str]],
    where: Sequence[str] | None = None,
    vocab: Vocabulary = COCO,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, per-caption results) of (image_id, caption) pairs against ``ground_truth``.

    Metrics: CHAIR_s, CHAIR_i, Recall in percent (0.0 when their denominator is 0), Len in words,
    and the counts behind them. ``where`` (one location string per item, e.g. "caps.jsonl line
    3") prefixes error messages; default "caption N".
    """
    items = list(items)
    if where is not None and len(where) != len(items):
        raise ValueError(f"where has {len(where)} entries for {len(items)} captions")
    if not items:
        raise DataError("no captions to score")
    per: list[dict[str, Any]] = []
    n_hall_caps = n_mentions = n_hall = n_words = n_recalled = n_gt = 0
    for k, (raw_id, caption) in enumerate(items):
        loc = where[k] if where is not None else f"caption {k + 1}"
        image_id = _int_id(raw_id, loc)
        gt = ground_truth.get(image_id)
        if gt is None:
            raise DataError(f"{loc}: image id {image_id} has no ground truth (not an image of the annotation split)")
        if not isinstance(caption, str):
            raise DataError(f"{loc}: caption must be a string, got {type(caption).__name__}")
        mentions, words = _read(caption, vocab)
        hallucinated = [(s, c) for s, c in mentions if c not in gt]
        n_mentions += len(mentions)
        n_hall += len(hallucinated)
        n_hall_caps += bool(hallucinated)
        n_words += words
        n_recalled += len({c for _, c in mentions} & gt)
        n_gt += len(gt)
        per.append({
            "image_id": image_id,
            "caption": caption,
            "mentioned": [{"word": s, "object": c} for s, c in mentions],
            "hallucinated": [{"word": s, "object": c} for s, c in hallucinated],
            "ground_truth": sorted(gt),
        })
    n = len(items)
    metrics = {
        "CHAIR_s": 100.0 * n_hall_caps / n,
        "CHAIR_i": 100.0 * n_hall / n_mentions if n_mentions else 0.0,
        "Recall": 100.0 * n_recalled / n_gt if n_gt else 0.0,
        "Len": n_words / n,
        "num_captions": n,
        "num_mentions": n_mentions,
        "num_hallucinated": n_hall,
        "num_hallucinated_captions": n_hall_caps,
    }
    return metrics, per


def _json_list(text: str, path: Any, what: str) -> list[Any]:
    """``text`` (the file at ``path``) parsed as a JSON list of ``what``; one-line DataError naming the file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def _caption_rows(path: Path) -> Iterable[tuple[str, Any]]:
    """(location, parsed object) of each record of a JSONL file, or of a .json file holding a list."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"captions file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read captions file {path}: {e}") from None
    if path.suffix.lower() == ".json":
        data = _json_list(text, path, "objects")
        return [(f"{path} item {i}", obj) for i, obj in enumerate(data, 1)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
    return rows


def score_file(
    captions_path: str | Path,
    annotations_dir: str | Path,
    *,
    split: str = "val2014",
    image_id_key: str = "image_id",
    caption_key: str = "caption",
    output: str | Path | None = None,
    cache_dir: str | Path | None = None,
    vocab: str | Path | Vocabulary | None = None,
) -> tuple[dict[str, Any], Path]:
    """Score a JSONL (or .json list) file of captions; write per-caption results as JSONL.

    ``output`` defaults to ``<captions path without suffix>.chair.jsonl``; the input file is never
    overwritten. ``vocab``: a Vocabulary or a vocabulary JSON file (default COCO's). Returns
    (metrics, path written).
    """
    vocab = vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab)
    src = Path(captions_path).expanduser()
    stem = src.with_suffix("")
    out = Path(output).expanduser() if output is not None else stem.with_name(stem.name + ".chair.jsonl")
    if out.resolve() == src.resolve():
        raise OutputError(f"{out}: output would overwrite the captions file; choose another output path")
    items: list[tuple[Any, str]] = []
    where: list[str] = []
    for loc, obj in _caption_rows(src):
        if not isinstance(obj, dict):
            raise DataError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
        for key in (image_id_key, caption_key):
            if key not in obj:
                raise DataError(f"{loc}: missing key {key!r}")
        if not isinstance(obj[caption_key], str):
            raise DataError(f"{loc}: key {caption_key!r} must be a string, got {type(obj[caption_key]).__name__}")
        items.append((_int_id(obj[image_id_key], f"{loc}: key {image_id_key!r}"), obj[caption_key]))
        where.append(loc)
    if not items:
        raise DataError(f"{src}: no captions (empty file)")
    gt = load_ground_truth(annotations_dir, split, cache_dir, vocab)
    metrics, per = score_captions(items, gt, where, vocab)
    try:
        _atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per))
    except OSError as e:
        raise OutputError(f"cannot write CHAIR results to {out}: {e}") from None
    return metrics, out


def format_summary(metrics: dict[str, Any]) -> str:
    """Markdown table of CHAIR_s, CHAIR_i, Recall (percent) and Len, one decimal each."""
    cols = ("CHAIR_s", "CHAIR_i", "Recall", "Len")
    return "\n".join([
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        "| " + " | ".join(f"{float(metrics[c]):.1f}" for c in cols) + " |",
    ])


def read_image_ids(path: str | Path) -> list[tuple[int, str]]:
    """The image ids of a saved list, in order, each with where it was read (``FILE line N`` / ``FILE item N``).

    The file holds one integer id per line (blank lines and lines starting with ``#`` are skipped) or a
    JSON list of integers (e.g. a run's ``image_ids.json``). DataError naming the file and line (or item)
    for an id that is not an integer or appears twice, and for an empty list."""
    src = Path(path).expanduser()
    try:
        text = src.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"CHAIR image id file not found: {src}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CHAIR image id file {src}: {e}") from None
    entries: list[tuple[Any, str]] = []
    if text.lstrip().startswith("["):
        data = _json_list(text, src, "image ids")
        entries = [(v, f"{src} item {k}") for k, v in enumerate(data, 1)]
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            value = line.strip()
            if value and not value.startswith("#"):
                entries.append((value, f"{src} line {lineno}"))
    out: list[tuple[int, str]] = []
    first: dict[int, str] = {}
    for value, where in entries:
        if isinstance(value, str) and not re.fullmatch(r"[0-9]+", value):
            raise DataError(f"{where}: image id must be an integer, got {value!r}")
        image_id = _int_id(value, where)
        if image_id in first:
            raise DataError(f"{where}: image id {image_id} appears twice (first at {first[image_id]})")
        first[image_id] = where
        out.append((image_id, where))
    if not out:
        raise DataError(f"{src}: no image ids")
    return out


# ----------------------------------------------------------------------------- task


@dataclasses.dataclass
class ChairOptions:
    """``attnkit eval --task chair`` options."""

    annotations: str | None = option(None, help="COCO annotations dir (instances_SPLIT.json, captions_SPLIT.json)")
    data_dir: str | None = option(None, help="same as --annotations")
    image_dir: str | None = option(None, help="images (default: SPLIT/ or images/ next to the annotations dir)")
    split: str | None = option(None, help="COCO split (default val2014)")
    num_images: int = option(500, help="images sampled from the split (with --seed)", lo=1)
    image_ids: str | None = option(None, help="file of the image ids to caption, in order, instead of sampling "
                                              "--num-images: one id per line or a JSON list")
    prompt: str = option(DEFAULT_PROMPT, help="the instruction asked with each image")
    vocab: str | None = option(None, help="vocabulary JSON ({category: [synonyms]}) of a non-COCO set "
                                          "(default COCO's)")


@register_task
class ChairTask(Task):
    """CHAIR over ``num_images`` images sampled from a COCO split, one detailed-description prompt each.

    ``image_ids`` (a file of ids, see ``read_image_ids``, or a list) fixes the images instead, in that order:
    the same captioned set for every seed, e.g. a paper's released list; ``num_images`` is then its length.
    ``annotations_dir`` holds ``instances_{split}.json`` and ``captions_{split}.json``. Images are
    looked up in ``image_dir``; by default ``<annotations_dir>/../{split}`` if it exists, else
    ``<annotations_dir>/../images`` if it exists, else ``annotations_dir`` itself.
    """

    name = "chair"
    description = "CHAIR caption hallucination on COCO (Rohrbach et al. 2018): CHAIR_s, CHAIR_i, Recall, Len"
    Options = ChairOptions
    default_max_new_tokens = 512

    @classmethod
    def from_options(cls, options: ChairOptions, *, seed: int = 0) -> ChairTask:
        annotations = options.annotations or options.data_dir
        if annotations is None:
            raise DataError("--task chair needs --annotations (the COCO annotations dir)")
        return cls(annotations, options.image_dir, split=options.split or "val2014", num_images=options.num_images,
                   seed=seed, prompt=options.prompt, vocab=options.vocab, image_ids=options.image_ids)

    def __init__(
        self,
        annotations_dir: str | Path,
        image_dir: str | Path | None = None,
        *,
        split: str = "val2014",
        num_images: int = 500,
        seed: int = 0,
        prompt: str = DEFAULT_PROMPT,
        cache_dir: str | Path | None = None,
        vocab: str | Path | Vocabulary | None = None,
        image_ids: str | Path | Sequence[int] | None = None,
    ) -> None:
        if not isinstance(num_images, int) or num_images < 1:
            raise DataError(f"CHAIR num_images must be a positive integer, got {num_images!r}")
        self.image_ids_file: str | None = None
        self._fixed_ids: list[tuple[int, str]] | None = None  # (id, where it was read) when the ids are given
        if image_ids is not None:
            if isinstance(image_ids, (str, Path)):
                self.image_ids_file = str(image_ids)
                self._fixed_ids = read_image_ids(image_ids)
            else:
                self._fixed_ids = [(_int_id(v, f"image_ids[{k}]"), f"image_ids[{k}]") for k, v in enumerate(image_ids)]
                if not self._fixed_ids:
                    raise DataError("CHAIR image_ids: the list is empty")
            num_images = len(self._fixed_ids)
        self.annotations_dir = Path(annotations_dir).expanduser()
        if image_dir is None:
            image_dir = coco_image_dir(self.annotations_dir, split)
        self.image_dir = Path(image_dir).expanduser()
        self.split = split
        self.num_images = num_images
        self.seed = seed
        self.prompt = prompt
        self.cache_dir = cache_dir
        self.vocab_file = None if vocab is None or isinstance(vocab, Vocabulary) else str(vocab)
        self.vocab = vocab if isinstance(vocab, Vocabulary) else load_vocabulary(vocab)
        self._image_ids: list[int] | None = None
        self._ground_truth: dict[int, set[str]] | None = None

    def _sample(self) -> list[tuple[int, str]]:
        """(image id, file name) of the sampled images, in sampling order."""
        instances, _ = _annotation_files(self.annotations_dir, self.split)
        images = {_int_id(k, f"{instances} images"): v for k, v in _read_coco(instances).imgs.items()}
        if not images:
            raise DataError(f"{instances}: no images")
        if self._fixed_ids is not None:
            for image_id, where in self._fixed_ids:
                if image_id not in images:
                    raise DataError(f"{where}: image id {image_id} is not an image of {instances}")
            chosen = [i for i, _ in self._fixed_ids]
        else:
            ids = sorted(images)
            chosen = ids if self.num_images >= len(ids) else random.Random(self.seed).sample(ids, self.num_images)
        out = []
        for image_id in chosen:
            file_name = images[image_id].get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise DataError(f"{instances}: image {image_id} has no 'file_name'")
            out.append((image_id, file_name))
        self._image_ids = [i for i, _ in out]
        return out

    def load(self) -> list[Sample]:
        return [
            Sample(id=str(image_id), image=self.image_dir / file_name, question=self.prompt,
                   meta={"image_id": image_id})
            for image_id, file_name in self._sample()
        ]

    def ground_truth(self) -> dict[int, set[str]]:
        """The split's ground truth, loaded (or read from the cache) once per task."""
        if self._ground_truth is None:
            self._ground_truth = load_ground_truth(self.annotations_dir, self.split, self.cache_dir, self.vocab)
        return self._ground_truth

    def _score(self, records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        items: list[tuple[Any, str]] = []
        where: list[str] = []
        for r in records:
            loc = f"record {r.get('id')!r}"
            output = r.get("output")
            if not isinstance(output, str):
                raise DataError(f"{loc}: 'output' must be a string, got {type(output).__name__}")
            image_id = (r.get("meta") or {}).get("image_id", r.get("id"))
            items.append((image_id, output))
            where.append(loc)
        if not items:
            raise DataError("no CHAIR records to score")
        return score_captions(items, self.ground_truth(), where, self.vocab)

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return self._score(records)[0]

    def extra_outputs(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """chair_per_caption.jsonl (mentions, hallucinations, ground truth) and image_ids.json."""
        ids = self._image_ids if self._image_ids is not None else [i for i, _ in self._sample()]
        return {"chair_per_caption.jsonl": self._score(records)[1], "image_ids.json": list(ids)}

    def config(self) -> dict[str, Any]:
        out = {"task": self.name, "split": self.split, "num_images": self.num_images, "seed": self.seed,
               "prompt": self.prompt, "annotations_dir": str(self.annotations_dir), "vocab": self.vocab.name,
               "vocab_file": self.vocab_file}
        if self._fixed_ids is not None:  # only then, so that runs made before this option still resume
            out["image_ids"] = [i for i, _ in self._fixed_ids]
            out["image_ids_file"] = self.image_ids_file
        return out

    def summary(self, metrics: dict[str, Any]) -> str:
        return format_summary(metrics)
