"""``attnkit demo``: the testbed model on POPE-adversarial and CHAIR, unwrapped and with every method.

One markdown table, one row per method at its defaults (VisionZip's and HiPrune's budgets scaled to
the testbed's 64 image tokens, ``TESTBED_ARGS``): POPE accuracy / F1 / yes-ratio, the
false-yes rates on absent partners and on other absent shapes, CHAIR_s / CHAIR_i and the share
of hallucinations that name a partner; pruning methods add the share of image tokens their
layers keep on average and the prefill FLOPs ratio of the decoder layers.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

#: the rows of the demo table, in order ("none" = the unwrapped model)
DEFAULT_METHODS: tuple[str, ...] = ("none", "pai", "var", "act", "vhr", "vcd", "icd", "fastv", "pdrop", "sparsevlm",
                                    "visionzip", "hiprune")
#: vision-side budgets are token counts for LLaVA's 576 image tokens, where the defaults keep all 64 of the
#: testbed's: scaled here to the same share (VisionZip 54+10 of 576 -> 6+1 of 64; HiPrune 192 of 576 -> 21)
TESTBED_ARGS: dict[str, dict[str, Any]] = {"visionzip": {"dominant": 6, "contextual": 1}, "hiprune": {"budget": 21}}


def _prune_columns(methods: list[Any]) -> tuple[str, str]:
    reports = [m.report for m in methods if hasattr(m, "report")]
    if not reports:
        return "-", "-"
    r = reports[-1]
    kept = sum(r.image_kept_per_layer) / max(1, len(r.image_kept_per_layer) * r.image_tokens)
    return f"{100 * kept:.0f}%", f"{r.flops_ratio:.2f}"


def run(methods: tuple[str, ...] = DEFAULT_METHODS, *, pope_questions: int = 800, chair_images: int = 200,
        batch_size: int = 32, out_dir: str | Path | None = None, progress: bool = True,
        log: Any = print) -> str:
    """Evaluate the testbed with each method; returns the markdown table (also logs each row's time)."""
    from .. import testbed
    from ..eval.runner import RunSettings, run_task
    from ..methods.registry import make_method

    model, processor = testbed.load()
    if out_dir is None:  # the run directories are only read back here
        with tempfile.TemporaryDirectory(prefix="attnkit-demo-") as tmp:
            return run(methods, pope_questions=pope_questions, chair_images=chair_images, batch_size=batch_size,
                       out_dir=tmp, progress=progress, log=log)
    root = Path(out_dir)
    header = ("| method | POPE-adv acc | F1 | yes ratio | false yes: absent partner | false yes: other absent "
              "| CHAIR_s | CHAIR_i | partner share of CHAIR hallucinations | image tokens kept | prefill FLOPs |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for name in methods:
        t0 = time.time()
        objs = [] if name == "none" else [make_method(name, **TESTBED_ARGS.get(name, {}))]
        pope = run_task(testbed.pope_task(("adversarial",)), model, processor, objs, root / name / "pope",
                        RunSettings(batch_size=batch_size, progress=progress, limit=pope_questions),
                        model_id="testbed", print_summary=False)
        kept, flops = _prune_columns(objs)
        chair = run_task(testbed.chair_task(chair_images), model, processor, objs, root / name / "chair",
                         RunSettings(batch_size=batch_size, progress=progress),
                         model_id="testbed", print_summary=False)
        p = pope["metrics"]["splits"]["adversarial"]
        c = chair["metrics"]
        rows.append(f"| {name} | {p['accuracy']:.3f} | {p['f1']:.3f} | {p['yes_ratio']:.3f} | "
                    f"{p['false_yes_partner']:.3f} | {p['false_yes_other']:.3f} | {c['CHAIR_s']:.1f} | "
                    f"{c['CHAIR_i']:.1f} | {c['partner_share']:.0f}% | {kept} | {flops} |")
        log(f"{name}: {time.time() - t0:.1f}s")
    return "\n".join(rows)
