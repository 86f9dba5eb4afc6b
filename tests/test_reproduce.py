"""`attnkit reproduce`: config validation (key paths), the shipped configs, plan/dry-run, runs with resume,
--rows, and the table's mean/std/delta (the testbed model and its bundled data; small limits)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics
from pathlib import Path

import pytest

import attnkit.loading
from attnkit import cli, testbed
from attnkit.errors import ConfigError, DataError, OutputError
from attnkit.eval import Sample, Task, register_task, reproduce
from attnkit.eval import registry as task_registry
from attnkit.eval.records import read_jsonl
from attnkit.options import option

REPO = Path(__file__).resolve().parents[1]

SMALL = """\
name: small
citation: {paper: "A paper", table: "Table 9"}
model: {id: testbed}
tasks:
  - name: pope
    options: {split: adversarial}
    batch_size: 1
    limit: 6
    metrics:
      acc: {path: splits.adversarial.accuracy, scale: 100}
rows:
  - name: baseline
    methods: []
    targets: {pope: {acc: 90.0}}
  - name: vhr
    methods:
      - {name: vhr, alpha: 2.0}
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def load_calls(monkeypatch):
    """attnkit.loading.load_model replaced by the testbed with a counted generate(); ``state["fail_after"]``
    makes the N+1-th generate call raise (a run killed mid-way)."""
    state = {"loads": 0, "generate": 0, "fail_after": None}

    def load(spec, **kwargs):
        assert spec == "testbed"
        state["loads"] += 1
        model, processor = testbed.load()
        real = model.generate

        def generate(*args, **kw):
            if state["fail_after"] is not None and state["generate"] >= state["fail_after"]:
                raise RuntimeError("injected failure")
            state["generate"] += 1
            return real(*args, **kw)

        model.generate = generate
        return model, processor

    monkeypatch.setattr(attnkit.loading, "load_model", load)
    return state


# ----------------------------------------------------------------------------- shipped configs


def test_shipped_configs_are_the_expected_ones():
    names = {p.name for p in reproduce.shipped_configs()}
    assert {"quickstart.yaml", "vhr_llava15_7b.yaml", "vcd_llava15_7b.yaml", "fastv_llava15_7b.yaml"} <= names
    assert reproduce.find_config("quickstart") == reproduce.find_config("quickstart.yaml")
    assert reproduce.find_config("quickstart").resolve() == (REPO / "configs" / "quickstart.yaml").resolve()
    with pytest.raises(ConfigError, match="config not found: nosuch"):
        reproduce.find_config("nosuch")


@pytest.mark.parametrize("path", reproduce.shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = reproduce.load_config(path)
    assert config.rows and config.tasks
    for row in config.rows:
        for (label, metric), number in row.targets.items():
            assert metric in config.tasks[label].metrics and math.isfinite(number)
            cite = config.citation_of(row)
            assert cite and cite["paper"] and cite["table"]


def test_paper_configs_carry_the_published_numbers():
    vhr = reproduce.load_config(REPO / "configs" / "vhr_llava15_7b.yaml")
    assert vhr.model.id == "llava-hf/llava-1.5-7b-hf"
    chair = next(t for t in vhr.tasks.values() if t.task == "chair")
    assert len(chair.seeds) == 5 and chair.options.num_images == 500
    assert chair.options.prompt == "Please describe this image in detail."
    assert chair.base_decoding.max_new_tokens == 512
    targets = {r.name: r.targets for r in vhr.rows}
    assert sorted(targets["baseline"].values()) == [14.32, 49.68, 84.98]
    assert sorted(targets["vhr"].values()) == [9.71, 33.32, 85.47]
    vcd = reproduce.load_config(REPO / "configs" / "vcd_llava15_7b.yaml")
    pope = vcd.tasks["pope"]
    assert pope.options.suffix == " Please answer this question with one word." and pope.options.parser == "vcd"
    assert pope.base_decoding == reproduce.Decoding(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                                    max_new_tokens=1024)
    assert [m.describe() for m in vcd.row("vcd").methods] == ["vcd(alpha=1.0, beta=0.2, noise_step=500)"]
    assert [list(r.targets.values()) for r in vcd.rows] == [[83.29, 81.88, 78.96], [87.73, 85.38, 80.88]]
    fastv = reproduce.load_config(REPO / "configs" / "fastv_llava15_7b.yaml")
    mme = fastv.tasks["mme"]
    assert mme.task == "mme" and mme.metrics["perception"].dotted == "perception.score"
    assert mme.options.parser == "lmms-eval" and mme.base_decoding.max_new_tokens == 16
    assert [m.describe() for m in fastv.row("fastv").methods] == ["fastv(k=3, r=0.5, mode='drop')"]
    assert [r.targets[("mme", "perception")] for r in fastv.rows] == [1510.8, 1511.7]


# ----------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize("edit, where, message", [
    (("rows:", "rowz: []\nrows:"), "rowz", r"unknown key \(valid: name, description"),
    (("    methods: []", "    method: []"), r"rows\[0\]\.method", r"unknown key \(valid: name, methods"),
    (("{name: vhr, alpha: 2.0}", "{name: nope}"), r"rows\[1\]\.methods\[0\]\.name", r"unknown method 'nope'"),
    (("{name: vhr, alpha: 2.0}", "{name: vhr, alpha: x}"), r"rows\[1\]\.methods\[0\]\.alpha",
     r"expected number.*got str 'x'"),
    (("{name: vhr, alpha: 2.0}", "{name: vhr, alpha: -1}"), r"rows\[1\]\.methods\[0\]\.alpha",
     r"out of range"),
    (("{name: vhr, alpha: 2.0}", "{name: vhr, beta: 1}"), r"rows\[1\]\.methods\[0\]\.beta",
     r"unknown argument of vhr \(valid: alpha,"),
    (("{name: vhr, alpha: 2.0}", "{name: vhr, last_layers: 0}"), r"rows\[1\]\.methods\[0\]\.last_layers",
     r"out of range"),
    (("  - name: pope\n", "  - name: pope\n    task: nope\n"), r"tasks\[0\]\.task", r"unknown task 'nope'"),
    (("{split: adversarial}", "{split: adversarial, colour: red}"), r"tasks\[0\]\.options\.colour",
     r"unknown option of task pope \(valid: data_dir,"),
    (("{split: adversarial}", "{strict: maybe}"), r"tasks\[0\]\.options\.strict", r"expected true/false"),
    (("    limit: 6", "    limit: 0"), r"tasks\[0\]\.limit", r"must be >= 1"),
    (("    batch_size: 1", "    batch_size: 1\n    seeds: [1, 1]"), r"tasks\[0\]\.seeds", r"seed 1 is listed twice"),
    (("    batch_size: 1", "    batch_size: 1\n    decoding: {temperature: 0.7}"), r"tasks\[0\]\.decoding\.temperature",
     r"only with do_sample: true"),
    (("    batch_size: 1", "    batch_size: 1\n    decoding: {do_sample: true, top_p: 2}"),
     r"tasks\[0\]\.decoding\.top_p", r"must be in \(0, 1\]"),
    (("scale: 100}", "scale: lots}"), r"tasks\[0\]\.metrics\.acc\.scale", r"expected a number"),
    (("{pope: {acc: 90.0}}", "{pope: {f1: 90.0}}"), r"rows\[0\]\.targets\.pope\.f1", r"metric 'f1' is not declared"),
    (("{pope: {acc: 90.0}}", "{chair: {acc: 90.0}}"), r"rows\[0\]\.targets\.chair", r"not a task this row runs"),
    (('citation: {paper: "A paper", table: "Table 9"}\n', ""), r"rows\[0\]\.targets", r"need a citation"),
    (("model: {id: testbed}", "model: {id: testbed, dtype: float8}"), r"model\.dtype", r"not one of auto, float32"),
    (("  - name: vhr\n", "  - name: baseline\n"), r"rows\[1\]\.name", r"used twice"),
    (("  - name: vhr\n", "  - name: v/hr\n"), r"rows\[1\]\.name", r"not a valid name"),
])
def test_bad_config_is_one_line_naming_the_key_path(tmp_path, edit, where, message):
    old, new = edit
    assert old in SMALL
    path = write(tmp_path, SMALL.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        reproduce.load_config(path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert re.search(rf"^{re.escape(str(path))}: {where}: .*{message}", text), text


def test_row_decoding_overrides_the_task_s_key_by_key(tmp_path):
    text = SMALL.replace("    batch_size: 1", "    batch_size: 1\n    decoding: {do_sample: true, temperature: 0.7}")
    config = reproduce.load_config(write(tmp_path, text.replace(
        "      - {name: vhr, alpha: 2.0}\n", "      - {name: vhr, alpha: 2.0}\n    decoding: {temperature: 1.5, top_k: 0}\n")))
    assert config.decodings[("baseline", "pope")] == reproduce.Decoding(do_sample=True, temperature=0.7)
    assert config.decodings[("vhr", "pope")] == reproduce.Decoding(do_sample=True, temperature=1.5, top_k=0)
    greedy_row = text.replace("      - {name: vhr, alpha: 2.0}\n",
                              "      - {name: vhr, alpha: 2.0}\n    decoding: {do_sample: false}\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: tasks\[0\]\.decoding\.temperature: only with do_sample: true "
                                          r".*do_sample is set at rows\[1\]\.decoding\.do_sample"):
        reproduce.load_config(write(tmp_path, greedy_row))


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, SMALL.replace("    limit: 6\n", "    limit: [6\n"))
    with pytest.raises(ConfigError, match=r"x\.yaml line \d+, column \d+: invalid YAML"):
        reproduce.load_config(path)
    with pytest.raises(ConfigError, match=r"x\.yaml: the file is empty"):
        reproduce.load_config(write(tmp_path, "# nothing\n"))
    with pytest.raises(ConfigError, match=r"x\.yaml: model: missing \(required\)"):
        reproduce.load_config(write(tmp_path, "tasks: []\nrows: []\n"))


@pytest.mark.parametrize("edit, where", [
    (("{name: vhr, alpha: 2.0}", "{name: vhr, alpha: x}"), "rows[1].methods[0].alpha"),
    (("  - name: pope\n", "  - name: pope\n    task: nope\n"), "tasks[0].task"),
])
def test_cli_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path, capsys, edit, where):
    path = write(tmp_path, SMALL.replace(*edit, 1))
    assert cli.main(["reproduce", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"attnkit: error: {path}: {where}: ")
    assert not (tmp_path / "out").exists()


def test_cli_needs_output_unless_dry_run_and_checks_rows(tmp_path, capsys):
    path = write(tmp_path, SMALL)
    assert cli.main(["reproduce", str(path)]) == 2
    assert "--output DIR is required" in capsys.readouterr().err
    assert cli.main(["reproduce", str(path), "--dry-run", "--rows", "baseline,nope"]) == 2
    assert "has no row 'nope' (rows: baseline, vhr)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- dry run


def test_dry_run_loads_no_model_and_prints_the_plan(tmp_path, capsys, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("dry run loaded a model")

    monkeypatch.setattr(attnkit.loading, "load_model", refuse)
    monkeypatch.setattr(testbed, "load", refuse)
    assert cli.main(["reproduce", "quickstart", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for row in ("baseline", "pai", "vhr", "vcd"):
        assert f"  {row}: " in out
    assert "pope: task pope, seeds 0, greedy, max_new_tokens 16, batch 32; 1600 samples per run" in out
    assert "chair: task chair, seeds 0, 1, 2, greedy, max_new_tokens 64, batch 32; 100 samples per run" in out
    assert "  vcd / chair / seed 2: 100 samples, <= 256 forward passes" in out  # ceil(100 / 32) x 64
    assert "total: 16 runs, 7,600 samples, <= 6,272 forward passes" in out
    assert cli.main(["reproduce", "quickstart", "--dry-run", "--limit", "5", "--rows", "vhr"]) == 0
    out = capsys.readouterr().out
    assert "  vhr / pope / seed 0: 5 samples, <= 16 forward passes" in out  # one batch x 16
    assert "  baseline" not in out
    assert "total: 4 runs, 20 samples" in out and "not comparable" in out


def test_dry_run_without_data_says_where_counts_come_from(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attnkit.loading, "load_model", lambda *a, **kw: pytest.fail("loaded a model"))
    (tmp_path / "ids.txt").write_text("5\n9\n7\n")
    path = write(tmp_path, f"""\
model: {{id: llava-hf/llava-1.5-7b-hf, dtype: float16}}
tasks:
  - name: chair
    options: {{annotations: nowhere/annotations, num_images: 500}}
    seeds: [0, 1]
    decoding: {{max_new_tokens: 512}}
  - name: pope
    options: {{data_dir: nowhere/data/pope, split: all}}
  - name: chair_ids
    task: chair
    options: {{annotations: nowhere/annotations, image_ids: {tmp_path / "ids.txt"}}}
rows:
  - name: baseline
    tasks: [chair, pope]
  - name: fixed
    tasks: [chair_ids]
""")
    assert cli.main(["reproduce", str(path), "--dry-run", "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "500 samples per run (num_images from the config; data not read: COCO annotations dir not found" in out
    assert "unknown samples per run (data not read: POPE data dir not found" in out
    # ceil(500 / 8) batches x 512 new tokens
    assert "  baseline / chair / seed 1: 500 samples, <= 32,256 forward passes; new" in out
    assert "  baseline / pope / seed 0: unknown samples; new" in out
    assert "chair_ids: task chair, seeds 0, greedy, max_new_tokens 512, batch 8; 3 samples per run (num_images" in out
    assert "total: 4 runs, 1,003 samples, <= 65,024 forward passes (+ 1 runs of unknown size)" in out
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- runs


def test_quickstart_with_limit_writes_the_table(tmp_path, capsys, load_calls):
    out = tmp_path / "qs"
    assert cli.main(["reproduce", "quickstart", "--limit", "2", "--output", str(out), "--no-progress"]) == 0
    assert load_calls["loads"] == 1  # one model for every row
    assert load_calls["generate"] == 4 * 4  # 4 rows x (POPE, CHAIR x 3 seeds), 2 samples each, one batch each
    table = json.loads((out / "table.json").read_text())
    assert table["rows"] == ["baseline", "pai", "vhr", "vcd"] and table["limit"] == 2
    got = [(e["row"], e["task"], e["metric"]) for e in table["entries"]]
    metrics = [("pope", m) for m in ("accuracy", "F1", "yes_ratio", "false_yes_partner")] + \
              [("chair", m) for m in ("CHAIR_s", "CHAIR_i", "Recall")]
    assert got == [(r, t, m) for r in table["rows"] for t, m in metrics]
    for e in table["entries"]:
        run_dir = out / e["row"] / e["task"]
        per_seed = [json.loads((run_dir / f"seed{s}" / "results.json").read_text())["metrics"] for s in e["seeds"]]
        values = []
        for m in per_seed:
            node = m
            for key in e["path"].split("."):
                node = node[key]
            values.append(node * e["scale"])
        assert e["per_seed"] == values and e["paper"] is None and e["delta"] is None
        assert e["seeds"] == ([0] if e["task"] == "pope" else [0, 1, 2])
    md = (out / "table.md").read_text()
    assert "| row | methods | task | metric | paper | ours | seeds | delta |" in md
    assert md.count("\n| ") == 1 + len(got) and "--limit 2: not comparable with the paper" in md
    assert "| vhr | vhr(alpha=2.0) | chair | CHAIR_s | - | " in md
    printed = capsys.readouterr()
    assert "| baseline | none | pope | accuracy |" in printed.out and "written:" in printed.out
    assert "[16/16] row vcd / task chair / seed 2" in printed.err


def test_resumes_after_a_kill_without_regenerating(tmp_path, load_calls):
    config = reproduce.load_config(write(tmp_path, SMALL))
    out = tmp_path / "out"
    load_calls["fail_after"] = 3  # the 4th generate call raises: 3 baseline samples are logged
    with pytest.raises(RuntimeError, match="injected failure"):
        reproduce.run(config, out, progress=False, log=lambda m: None)
    assert len(read_jsonl(out / "baseline" / "pope" / "seed0" / "samples.jsonl")) == 3
    assert not (out / "table.json").exists()
    load_calls.update(generate=0, fail_after=None)
    table = reproduce.run(config, out, progress=False, log=lambda m: None)
    assert load_calls["generate"] == 3 + 6  # the 3 baseline samples left, then the whole vhr row
    for row in ("baseline", "vhr"):
        ids = [r["id"] for r in read_jsonl(out / row / "pope" / "seed0" / "samples.jsonl")]
        assert len(ids) == 6 == len(set(ids))
    load_calls.update(generate=0, loads=0)
    again = reproduce.run(config, out, progress=False, log=lambda m: None)
    assert load_calls == {"loads": 0, "generate": 0, "fail_after": None}  # all done: no model, no generation
    assert again == table
    fresh = reproduce.run(config, tmp_path / "fresh", progress=False, log=lambda m: None)
    assert fresh["entries"] == table["entries"]  # greedy: the resumed run equals an uninterrupted one
    entry = table["entries"][0]
    assert entry["paper"] == 90.0 and entry["delta"] == pytest.approx(entry["mean"] - 90.0)
    assert table["citations"] == [{"paper": "A paper", "table": "Table 9"}] and entry["citation"] == 1


def test_rows_filter_and_changed_settings_are_refused(tmp_path, load_calls):
    path = write(tmp_path, SMALL)
    out = tmp_path / "out"
    assert cli.main(["reproduce", str(path), "--rows", "vhr", "--limit", "2", "--output", str(out),
                     "--no-progress"]) == 0
    assert load_calls["generate"] == 2
    assert not (out / "baseline").exists()
    assert json.loads((out / "table.json").read_text())["rows"] == ["vhr"]
    changed = write(tmp_path, SMALL.replace("alpha: 2.0", "alpha: 3.0"), "y.yaml")
    with pytest.raises(OutputError, match=r"vhr/pope/seed0 holds a run with other settings "
                                          r"\(methods\[0\]\.config\.alpha: 2\.0 there, 3\.0 now\)"):
        reproduce.run(reproduce.load_config(changed), out, rows=["vhr"], limit=2, progress=False, log=lambda m: None)
    # a larger limit continues the same runs: only the new samples are generated
    load_calls["generate"] = 0
    reproduce.run(reproduce.load_config(path), out, rows=["vhr"], limit=4, progress=False, log=lambda m: None)
    assert load_calls["generate"] == 2


def test_a_metric_path_missing_after_scoring_is_named(tmp_path, load_calls):
    path = write(tmp_path, SMALL.replace("splits.adversarial.accuracy", "splits.adversarial.acc"))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"x\.yaml: tasks\[0\]\.metrics\.acc\.path: 'splits\.adversarial\.acc' is "
                                        r"not in the metrics of task pope: no 'acc' at splits\.adversarial "
                                        r"\(there: n, accuracy, precision"):
        reproduce.run(reproduce.load_config(path), out, limit=1, progress=False, log=lambda m: None)
    assert (out / "baseline" / "pope" / "seed0" / "results.json").is_file()  # nothing written is lost


# ----------------------------------------------------------------------------- the table


TABLE = """\
name: t
citation: {paper: "P", table: "T1"}
model: {id: testbed}
tasks:
  - name: pope
    options: {split: all}
    seeds: [0]
    metrics:
      acc: {path: splits.random.accuracy, scale: 100}
  - name: chair
    seeds: [0, 1, 2]
    metrics:
      CHAIR_s: {path: CHAIR_s, scale: 1}
rows:
  - name: base
    targets: {pope: {acc: 83.29}, chair: {CHAIR_s: 12.5}}
  - name: other
    methods: [pai]
    tasks: [chair]
    citation: {paper: "Q", table: "T2", url: "https://example.org"}
    targets: {chair: {CHAIR_s: 10}}
"""


def test_table_mean_std_delta_from_known_per_seed_metrics(tmp_path):
    config = reproduce.load_config(write(tmp_path, TABLE))
    metrics = {("base", "pope", 0): {"splits": {"random": {"accuracy": 0.8}}},
               ("base", "chair", 0): {"CHAIR_s": 10.0}, ("base", "chair", 1): {"CHAIR_s": 12.0},
               ("base", "chair", 2): {"CHAIR_s": 17.0},
               ("other", "chair", 0): {"CHAIR_s": 9.0}, ("other", "chair", 1): {"CHAIR_s": 9.0},
               ("other", "chair", 2): {"CHAIR_s": 12.0}}
    table = reproduce.build_table(config, metrics)
    by = {(e["row"], e["task"], e["metric"]): e for e in table["entries"]}
    assert list(by) == [("base", "pope", "acc"), ("base", "chair", "CHAIR_s"), ("other", "chair", "CHAIR_s")]
    acc = by[("base", "pope", "acc")]
    assert acc["per_seed"] == [80.0] and acc["mean"] == 80.0 and acc["std"] is None
    assert acc["delta"] == pytest.approx(80.0 - 83.29)
    base = by[("base", "chair", "CHAIR_s")]
    assert base["mean"] == 13.0 and base["std"] == pytest.approx(math.sqrt((9 + 1 + 16) / 2))
    assert base["delta"] == pytest.approx(0.5)
    other = by[("other", "chair", "CHAIR_s")]
    assert other["mean"] == 10.0 and other["std"] == pytest.approx(statistics.stdev([9, 9, 12]))
    assert other["delta"] == 0.0 and other["citation"] == 2 and base["citation"] == 1
    md = reproduce.table_markdown(table)
    assert "| base | none | pope | acc | 83.29 [1] | 80.00 | 1 | -3.29 |" in md
    assert "| base | none | chair | CHAIR_s | 12.50 [1] | 13.00 ± 3.61 | 3 | +0.50 |" in md
    assert "| other | pai | chair | CHAIR_s | 10.00 [2] | 10.00 ± 1.73 | 3 | +0.00 |" in md
    assert "[1] P, T1" in md and "[2] Q, T2 (https://example.org)" in md
    only = reproduce.build_table(config, metrics, rows=["other"])
    assert [e["row"] for e in only["entries"]] == ["other"] and only["citations"][0]["paper"] == "Q"
    with pytest.raises(DataError, match=r"no results for row base, task chair, seed 2"):
        reproduce.build_table(config, {k: v for k, v in metrics.items() if k != ("base", "chair", 2)})
    bad = dict(metrics)
    bad[("base", "chair", 1)] = {"CHAIR_s": "n/a"}
    with pytest.raises(DataError, match=r"tasks\[1\]\.metrics\.CHAIR_s\.path: 'CHAIR_s' in the metrics of task chair "
                                        r"is not a number"):
        reproduce.build_table(config, bad)


# ----------------------------------------------------------------------------- a task registered later


@dataclasses.dataclass
class BlankOptions:
    count: int = option(2, help="questions", lo=1, hi=5)
    sizes: list[int] | None = option(None, help="image sizes", lo=8)
    shout: bool = option(False, help="upper-case")
    mode: str = option("plain", help="how", choices=("plain", "fancy"))


class BlankTask(Task):
    """``count`` questions about blank images; metrics nested one level."""

    name = "blank"
    Options = BlankOptions
    default_max_new_tokens = 2

    def __init__(self, count=2, sizes=None, shout=False, mode="plain"):
        self.count, self.sizes, self.shout, self.mode = count, sizes, shout, mode

    def load(self):
        from PIL import Image

        size = (self.sizes or [32])[0]
        return [Sample(str(i), Image.new("RGB", (size, size), "white"), "IS THERE A CIRCLE?" if self.shout
                       else "Is there a circle?") for i in range(self.count)]

    def score(self, records):
        return {"summary": {"answered": sum(bool(r["output"]) for r in records) / len(records)}}


BLANK = """\
model: {id: testbed}
tasks:
  - name: blank
    options: {count: 3, sizes: [16, 24], shout: true, mode: fancy}
    metrics:
      answered: {path: summary.answered, scale: 100}
rows:
  - name: baseline
"""


def test_a_task_registered_later_is_validated_from_its_options(tmp_path, monkeypatch, load_calls):
    task_registry._load()
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))
    register_task(BlankTask)
    config = reproduce.load_config(write(tmp_path, BLANK))
    options = config.tasks["blank"].options
    assert (options.count, options.sizes, options.shout, options.mode) == (3, [16, 24], True, "fancy")
    for old, new, message in [
        ("count: 3", "count: 9", r"tasks\[0\]\.options\.count: count=9 is out of range \[1, 5\]"),
        ("sizes: [16, 24]", "sizes: [4]", r"tasks\[0\]\.options\.sizes: sizes=\[4\] is out of range"),
        ("sizes: [16, 24]", "sizes: [a]", r"tasks\[0\]\.options\.sizes: expected list of int or none"),
        ("mode: fancy", "mode: odd", r"tasks\[0\]\.options\.mode: mode='odd' must be one of plain, fancy"),
        ("shout: true", "shout: 2", r"tasks\[0\]\.options\.shout: expected true/false, got int 2"),
    ]:
        with pytest.raises(ConfigError, match=message):
            reproduce.load_config(write(tmp_path, BLANK.replace(old, new), "bad.yaml"))
    table = reproduce.run(config, tmp_path / "out", progress=False, log=lambda m: None)
    records = read_jsonl(tmp_path / "out" / "baseline" / "blank" / "seed0" / "samples.jsonl")
    assert [r["prompt"] for r in records] == ["IS THERE A CIRCLE?"] * 3
    answered = 100 * sum(bool(r["output"]) for r in records) / 3
    assert [(e["metric"], e["mean"]) for e in table["entries"]] == [("answered", answered)]


def test_dry_run_counts_samples_offline(tmp_path, monkeypatch, capsys):
    """A dry run never downloads: while it counts samples, the hub and datasets are in offline mode."""
    import huggingface_hub.constants

    seen = []

    class Probe(BlankTask):
        name = "probe"

        def load(self):
            seen.append((os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
                         huggingface_hub.constants.HF_HUB_OFFLINE))
            return super().load()

    task_registry._load()
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))
    register_task(Probe)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    path = write(tmp_path, BLANK.replace("  - name: blank\n", "  - name: blank\n    task: probe\n"))
    assert cli.main(["reproduce", str(path), "--dry-run"]) == 0
    assert "3 samples per run" in capsys.readouterr().out
    assert seen == [("1", "1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored
