"""POPE and CHAIR on the shapes set, with what the set was built to show: hallucinated partners.

POPE adds, per split, the false-yes rate on "no" questions whose object is the absent partner of a
shape in the image, next to the rate on the other "no" questions. CHAIR adds the share of
hallucinated mentions that name the partner of a shape in the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from ..eval.base import Sample
from ..eval.chair import ChairTask
from ..eval.pope import SPLITS, YES, PopeTask, object_of
from ..eval.records import read_json
from .shapes import partner_of


def _image_shapes(instances: Path) -> dict[str, set[str]]:
    """Image file name -> shapes in it."""
    data = read_json(instances, "shapes instances file")
    try:
        names = {c["id"]: c["name"] for c in data["categories"]}
        files = {im["id"]: im["file_name"] for im in data["images"]}
        out: dict[str, set[str]] = {f: set() for f in files.values()}
        for a in data["annotations"]:
            out[files[a["image_id"]]].add(names[a["category_id"]])
    except (KeyError, TypeError) as e:
        raise DataError(f"{instances}: not a COCO instances file ({type(e).__name__}: {e})") from None
    return out


def _partners_of(shapes: set[str]) -> set[str]:
    return {partner_of(s) for s in shapes} - shapes


def _rate(hits: int, n: int) -> float:
    return hits / n if n else 0.0


class ShapesPopeTask(PopeTask):
    """PopeTask on the shapes set; each "no" question is tagged ``absent_partner`` or ``absent_other``."""

    def __init__(self, data_dir: str | Path, *, instances: str | Path | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("source", "shapes")
        super().__init__(data_dir, **kwargs)
        self.instances = Path(instances) if instances is not None else \
            Path(data_dir).parent / "annotations" / "instances_val.json"

    def load(self) -> list[Sample]:
        samples = super().load()
        shapes = _image_shapes(self.instances)
        for s in samples:
            name = Path(str(s.meta.get("image") or s.image)).name
            if name not in shapes:
                raise DataError(f"question {s.id}: image {name} is not in {self.instances}")
            if str(s.label).lower() != YES:
                obj = s.meta.get("object") or object_of(s.question)
                s.meta["absent"] = "partner" if obj in _partners_of(shapes[name]) else "other"
        return samples

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics = super().score(records)
        for split, m in metrics["splits"].items():
            counts = {"partner": [0, 0], "other": [0, 0]}
            for r in records:
                meta = r.get("meta") or {}
                kind = meta.get("absent")
                if meta.get("split") == split and kind in counts:
                    counts[kind][0] += self.verdict(r) == YES
                    counts[kind][1] += 1
            m["false_yes_partner"] = _rate(*counts["partner"])
            m["false_yes_other"] = _rate(*counts["other"])
            m["n_absent_partner"], m["n_absent_other"] = counts["partner"][1], counts["other"][1]
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        lines = [super().summary(metrics), "", "| split | false yes: absent partner | false yes: other absent |",
                 "|---|---|---|"]
        for split in [s for s in SPLITS if s in metrics["splits"]]:
            m = metrics["splits"][split]
            lines.append(f"| {split} | {m['false_yes_partner']:.4f} ({m['n_absent_partner']}) | "
                         f"{m['false_yes_other']:.4f} ({m['n_absent_other']}) |")
        return "\n".join(lines)


class ShapesChairTask(ChairTask):
    """ChairTask on the shapes set; scores add ``partner_share``: hallucinated mentions that are partners."""

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        metrics, per = self._score(records)
        partner = sum(h["object"] in _partners_of(set(row["ground_truth"])) for row in per for h in row["hallucinated"])
        total = sum(len(row["hallucinated"]) for row in per)
        metrics["hallucinated_partner"] = partner
        metrics["partner_share"] = 100.0 * partner / total if total else 0.0
        return metrics

    def summary(self, metrics: dict[str, Any]) -> str:
        return (super().summary(metrics) + f"\n\nhallucinated mentions naming a present shape's partner: "
                f"{metrics['hallucinated_partner']} of {metrics['num_hallucinated']} ({metrics['partner_share']:.1f}%)")


def testbed_task(name: str, options: Any, *, seed: int = 0) -> Any:
    """The task ``name`` on the testbed's bundled val data (``attnkit eval --model testbed``), or None when
    ``options`` point at other data (a data dir or annotations) or the testbed has nothing for ``name``."""
    from .. import testbed
    from ..errors import AttnkitError

    from ..eval.chair import ChairOptions
    from ..eval.grounding import GroundingOptions
    from ..eval.pope import PopeOptions

    builtin = {"pope": PopeOptions, "chair": ChairOptions, "grounding": GroundingOptions}
    if type(options) is not builtin.get(name):
        return None
    if getattr(options, "data_dir", None) is not None or getattr(options, "annotations", None) is not None:
        return None
    if name == "pope":
        return testbed.pope_task(options.split.split(","), strict=options.strict, suffix=options.suffix,
                                 parser=options.parser)
    if options.split is not None and options.split != testbed.SPLIT:
        raise AttnkitError(f"--split {options.split}: the testbed ships only its {testbed.SPLIT!r} split")
    if name == "chair":
        kw = {"vocab": options.vocab} if options.vocab is not None else {}
        return testbed.chair_task(min(options.num_images, testbed.N_VAL), seed=seed, **kw)
    return testbed.grounding_task(layers=options.layers, suffix=options.suffix)
