"""The testbed: a synthetic COCO-format "shapes" set and a tiny trained VLM that ship with attnkit.

- ``make_shapes(out_dir, n_train, n_val, seed)`` writes the set (``attnkit.testbed.shapes``).
- ``load()`` returns the shipped model and processor (``attnkit.load_model("testbed")``,
  ``attnkit eval --model testbed``); they are stock transformers LLaVA classes, saved with
  ``save_pretrained`` in ``MODEL_DIR``.
- ``DATA_DIR`` holds the val split (500 images, instances, captions), the CHAIR vocabulary and the
  POPE question files built from it; ``pope_task`` / ``chair_task`` / ``grounding_task`` point the
  eval tasks there. ``build_data(out_dir)`` re-creates those files from scratch.

The model learned a co-occurrence prior on purpose (``shapes.PARTNERS``): it says "yes" to an
absent partner of a present shape far more often than to other absent shapes, and names absent
partners in its descriptions. It is a place to see methods act, offline; it is no substitute for
results on real models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .shapes import PARTNERS, make_shapes, partner_of

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
DATA_DIR = ROOT / "data"
SPLIT = "val"
#: how the bundled POPE files are built from the val split
POPE_IMAGES, POPE_QUESTIONS_PER_IMAGE, POPE_SEED = 400, 4, 0
N_VAL, DATA_SEED = 500, 0


def build_data(out_dir: str | Path) -> Path:
    """Write the bundled data (val split, vocab.json, pope/shapes_pope_*.json) under ``out_dir``."""
    from ..eval.pope import build_pope

    root = make_shapes(out_dir, n_train=0, n_val=N_VAL, seed=DATA_SEED)
    build_pope(root / "annotations" / f"instances_{SPLIT}.json", root / "pope", source="shapes",
               num_images=POPE_IMAGES, questions_per_image=POPE_QUESTIONS_PER_IMAGE, seed=POPE_SEED)
    build = root / "pope" / "shapes_pope_build.json"  # record the path relative to the data dir
    text = build.read_text(encoding="utf-8").replace(str(root / "annotations"), "annotations")
    build.write_text(text, encoding="utf-8")
    return root


def load(dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, processor) of the shipped testbed, loaded with the Auto classes (float32)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..loading import ModelLoadError

    if not (MODEL_DIR / "model.safetensors").is_file():
        raise ModelLoadError(f"the testbed weights are missing from {MODEL_DIR} (re-create them with "
                             f"scripts/train_testbed.py --out {MODEL_DIR})")
    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR, dtype=dtype or torch.float32)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def pope_task(splits: str | Iterable[str] = ("adversarial",), **kwargs: Any) -> Any:
    """POPE on the bundled val questions; the scores add the false-yes rates on absent partners and others."""
    from .tasks import ShapesPopeTask

    return ShapesPopeTask(DATA_DIR / "pope", splits=splits, image_dir=DATA_DIR / "images" / SPLIT, **kwargs)


def chair_task(num_images: int = N_VAL, seed: int = 0, **kwargs: Any) -> Any:
    """CHAIR on the bundled val images with the shapes vocabulary; scores add the share of partner hallucinations."""
    from .tasks import ShapesChairTask

    kwargs.setdefault("vocab", DATA_DIR / "vocab.json")
    return ShapesChairTask(DATA_DIR / "annotations", DATA_DIR / "images" / SPLIT, split=SPLIT,
                           num_images=num_images, seed=seed, **kwargs)


def grounding_task(**kwargs: Any) -> Any:
    """Pointing game on the bundled val boxes."""
    from ..eval.grounding import GroundingTask

    return GroundingTask(DATA_DIR / "annotations", DATA_DIR / "images" / SPLIT, split=SPLIT, **kwargs)


__all__ = ["DATA_DIR", "MODEL_DIR", "PARTNERS", "build_data", "chair_task", "grounding_task", "load",
           "make_shapes", "partner_of", "pope_task"]
