"""Tasks registered by name (decorator and entry points) and CLI flags built from declared options:
every method config field settable from the command line, typed values, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

import attnkit
from attnkit import cli
from attnkit.errors import MethodArgumentError
from attnkit.eval import TASKS, Sample, Task, get_task_class, list_tasks, register_task
from attnkit.eval import registry as task_registry
from attnkit.methods.registry import get_method_class
from attnkit.options import option, option_specs


@pytest.fixture
def clean_tasks(monkeypatch):
    """A registry copy, so tasks registered by a test vanish after it."""
    task_registry._load()
    monkeypatch.setattr(task_registry, "_REGISTRY", dict(task_registry._REGISTRY))


@dataclasses.dataclass
class CountOptions:
    count: int = option(2, help="questions asked", lo=1, hi=5)
    word: str = option("circle", help="the object asked about")
    shout: bool = option(False, help="upper-case the question")
    sizes: list[int] | None = option(None, help="image sizes", lo=8)


class CountTask(Task):
    """A toy task: ``count`` questions about a blank image; metric: how many replies were not empty."""

    name = "counting"
    description = "a toy task for the tests"
    Options = CountOptions
    default_max_new_tokens = 2

    def __init__(self, count: int = 2, word: str = "circle", shout: bool = False, sizes: list[int] | None = None):
        self.count, self.word, self.shout, self.sizes = count, word, shout, sizes

    def load(self) -> list[Sample]:
        from PIL import Image

        q = f"Is there a {self.word}?"
        q = q.upper() if self.shout else q
        size = (self.sizes or [32])[0]
        return [Sample(str(i), Image.new("RGB", (size, size), "white"), q) for i in range(self.count)]

    def score(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(records), "answered": sum(bool(r["output"]) for r in records)}

    def config(self) -> dict[str, Any]:
        return {"task": self.name, "count": self.count, "word": self.word, "shout": self.shout}


def _args(*argv: str):
    argv = ["eval", "--model", "tiny:llava", "--output", "unused", *argv]
    return cli.build_parser(argv).parse_args(argv)


def test_registered_task_appears_in_the_cli_without_editing_it(clean_tasks, tmp_path, capsys):
    register_task(CountTask)
    assert list_tasks()[:4] == ["pope", "chair", "grounding", "mme"] and "counting" in list_tasks()
    assert TASKS["counting"] == "a toy task for the tests"
    with pytest.raises(TypeError):
        TASKS["counting"] = "x"  # read-only view
    # its options are flags, typed and range-checked
    task = cli._make_task(_args("--task", "counting", "--count", "3", "--word", "square", "--shout",
                                "--sizes", "16,24"))
    assert isinstance(task, CountTask)
    assert (task.count, task.word, task.shout, task.sizes) == (3, "square", True, [16, 24])
    with pytest.raises(attnkit.errors.AttnkitError, match=r"counting: count=9 is out of range \[1, 5\]"):
        cli._make_task(_args("--task", "counting", "--count", "9"))
    with pytest.raises(attnkit.errors.AttnkitError, match=r"counting: sizes=\[4\] is out of range"):
        cli._make_task(_args("--task", "counting", "--sizes", "4"))
    # --help of the task shows its options with help and range; list shows it
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", "counting", "--help"])
    out = capsys.readouterr().out
    assert "counting options (--task counting)" in out and "--count COUNT" in out
    assert "questions asked (int, in [1, 5]; default 2)" in out
    assert cli.main(["list"]) == 0 and "counting" in capsys.readouterr().out
    # and a whole run
    out_dir = tmp_path / "run"
    assert cli.main(["eval", "--model", "tiny:llava", "--task", "counting", "--count", "3", "--no-progress",
                     "--output", str(out_dir)]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert results["metrics"]["n"] == 3 and results["config"]["task"]["count"] == 3
    assert results["config"]["cli"]["count"] == 3 and "num_images" not in results["config"]["cli"]


def test_unknown_task_lists_the_registered_ones(clean_tasks, capsys):
    register_task(CountTask)
    assert cli.main(["eval", "--model", "tiny:llava", "--task", "vqa", "--output", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "attnkit: error: unknown task 'vqa' (valid: pope, chair, grounding, mme, counting)"


def test_entry_point_task_is_found(monkeypatch):
    class FakeEntryPoint:
        name, value = "counting", "thirdparty:CountTask"

        def load(self):
            return CountTask

    groups = []

    def fake_entry_points(group):
        groups.append(group)
        return [FakeEntryPoint()] if group == "attnkit.tasks" else []

    monkeypatch.setattr(task_registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(task_registry, "_REGISTRY", {})
    monkeypatch.setattr(task_registry, "_loaded", False)
    assert get_task_class("counting") is CountTask
    assert groups == ["attnkit.tasks"]
    assert list_tasks() == ["pope", "chair", "grounding", "mme", "counting"]
    task = cli._make_task(_args("--task", "counting", "--word", "disc"))
    assert task.word == "disc"


def test_cross_task_flag_is_ignored_with_a_warning(capsys, tmp_path):
    task = cli._make_task(_args("--task", "pope", "--data-dir", str(tmp_path), "--num-images", "5", "--split", "all"))
    assert task.splits == ("random", "popular", "adversarial")
    assert "--num-images is a chair option; --task pope ignores it" in capsys.readouterr().err


def test_grounding_layers_syntax(tmp_path):
    assert cli._make_task(_args("--task", "grounding", "--annotations", str(tmp_path), "--layers", "2,8-10")).layers \
        == (2, 8, 9, 10)
    assert cli._make_task(_args("--task", "grounding", "--annotations", str(tmp_path), "--layers", "all")).layers \
        is None
    with pytest.raises(attnkit.errors.AttnkitError, match="grounding: layers='8-x'"):
        cli._make_task(_args("--task", "grounding", "--annotations", str(tmp_path), "--layers", "8-x"))


# ----------------------------------------------------------------------------- every method field


def _text(value: Any) -> str:
    """The CLI's simple syntax for a value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return ";".join(f"{k}:{_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    return str(value)


def _candidates(spec) -> list[Any]:
    """Values of the field's type, non-default ones first tried in order."""
    tp, d = spec.type, spec.default
    text = str(tp)
    if spec.choices:
        return [c for c in spec.choices if c != d]
    if tp is bool:
        return [not d]
    if "dict" in text:
        return [{2: [0, 1]}, {0: [1], 3: [0, 2]}]
    if "tuple" in text or "list" in text:
        return [[3], [2533, 1415], [1, 2, 3], [2, 5, 9], [4, 8, 12], [1, 3, 20]]
    if "float" in text:
        base = d if isinstance(d, (int, float)) else 0.5
        return [base / 2, 0.3, base + 1.5]
    if "int" in text:
        base = d if isinstance(d, int) else 1
        return [base + 1, base + 10, 128, 576, 3, 40]
    if "str" in text:
        return ["text"]
    raise AssertionError(f"no candidate values for {spec.name}: {tp}")


METHOD_FIELDS = [(m, s.name) for m in attnkit.list_methods() for s in get_method_class(m).Config.options()]


def test_every_method_is_covered():
    assert {m for m, _ in METHOD_FIELDS} >= set(attnkit.list_methods()) - {"identity"}
    assert len(METHOD_FIELDS) >= 30


@pytest.mark.parametrize("method,field", METHOD_FIELDS)
def test_every_method_config_field_is_settable_from_the_cli(method, field):
    cls = get_method_class(method)
    spec = next(s for s in cls.Config.options() if s.name == field)
    assert spec.help, f"{method}.{field} has no help in its option() metadata"
    for value in _candidates(spec):
        try:
            expected = getattr(cls.Config(**{field: value}), field)
        except MethodArgumentError:
            continue
        if expected == spec.default:
            continue
        break
    else:
        raise AssertionError(f"no valid non-default value found for {method}.{field}")
    text = _text(value)
    for pairs in ([f"{method}.{field}={text}"], [f"{field}={text}"]):
        (made,) = cli._make_methods(method, pairs)
        assert getattr(made.config, field) == expected, pairs
        assert type(getattr(made.config, field)) is type(expected), pairs
    args = _args("--task", "pope", "--method", method, f"--{method}.{field.replace('_', '-')}", text)
    (made,) = cli._make_methods(args.method, [*args.method_arg, *cli._method_flag_pairs(args)])
    assert getattr(made.config, field) == expected


@pytest.mark.parametrize("method,field", METHOD_FIELDS)
def test_declared_ranges_agree_with_validate(method, field):
    """A value just outside a declared range is refused by the config itself (metadata is not decoration)."""
    cls = get_method_class(method)
    spec = next(s for s in cls.Config.options() if s.name == field)
    bad = []
    if spec.lo is not None:
        bad.append(spec.lo - 1)
    if spec.hi is not None:
        bad.append(spec.hi + 1)
    for b in bad:
        if isinstance(spec.default, (tuple, list)) or "list" in str(spec.type):
            value: Any = [b] if "list" in str(spec.type) and "tuple" not in str(spec.type) else (b, 10, 20)
        elif "dict" in str(spec.type):
            value = {b: [0]}
        else:
            value = int(b) if "int" in str(spec.type) and "float" not in str(spec.type) else float(b)
        with pytest.raises(MethodArgumentError):
            cls.Config(**{field: value})


def test_act_heads_and_var_sink_dims_round_trip():
    (act,) = cli._make_methods("act", ["heads=2:0,3;4:1"])
    assert act.config.heads == {2: [0, 3], 4: [1]}
    (act,) = cli._make_methods("act", ['act.heads={"2": [3, 0], "4": [1]}'])
    assert act.config.heads == {2: [0, 3], 4: [1]}
    (act,) = cli._make_methods("act", ["heads=none"])
    assert act.config.heads is None
    (var,) = cli._make_methods("var", ["sink_dims=2533,1415"])
    assert var.config.sink_dims == [2533, 1415]
    (var,) = cli._make_methods("var", ["var.sink_dims=[458, 2570]"])
    assert var.config.sink_dims == [458, 2570]
    var, act = cli._make_methods("var,act", ["start_layer=3", "act.heads=5:2"])
    assert var.config.start_layer == act.config.start_layer == 3 and act.config.heads == {5: [2]}
    args = _args("--task", "pope", "--method", "act,var", "--act.heads", "2:0,3", "--var.sink-dims", "7,9")
    act, var = cli._make_methods(args.method, [*args.method_arg, *cli._method_flag_pairs(args)])
    assert act.config.heads == {2: [0, 3]} and var.config.sink_dims == [7, 9]


@pytest.mark.parametrize("args,needles", [
    (["--method", "var", "--method-arg", "sink_dims=a,b"], ["var: sink_dims='a,b'", "list of int"]),
    (["--method", "act", "--method-arg", "heads=3"], ["act: heads='3'", "dict int -> list of int"]),
    (["--method", "act", "--method-arg", "act.heads={bad json"], ["act: heads=", "dict int -> list of int"]),
    (["--method", "var", "--var.p", "abc"], ["var: p='abc'", "number"]),
    (["--method", "sparsevlm", "--method-arg", "recycle=maybe"], ["sparsevlm: recycle='maybe'", "true/false"]),
    (["--method", "sparsevlm", "--method-arg", "layers=1,2"], ["sparsevlm: layers=(1, 2) must be 3"]),
    (["--method", "fastv", "--method-arg", "k=1.5"], ["fastv: k='1.5'", "int"]),
    (["--task", "chair", "--num-images", "x"], ["chair: num_images='x'", "int"]),
    (["--task", "chair", "--num-images", "0"], ["chair: num_images=0 is out of range [1, inf]"]),
])
def test_bad_values_give_one_line_errors(args, needles, tmp_path, capsys):
    argv = ["eval", "--model", "tiny:llava", "--output", str(tmp_path / "o")]
    argv += args if "--task" in args else ["--task", "pope", "--data-dir", str(tmp_path), *args]
    if "chair" in args:
        argv += ["--annotations", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    assert not (tmp_path / "o").exists()


def test_list_verbose_shows_every_option(capsys):
    assert cli.main(["list", "--verbose"]) == 0
    out = capsys.readouterr().out
    for m in attnkit.list_methods():
        assert f"  {m}:" in out
        for s in get_method_class(m).Config.options():
            assert f"{m}.{s.name}=" in out
    for t in list_tasks():
        for s in option_specs(get_task_class(t).Options):
            assert s.flag in out
    assert "in [0.0, 1.0]; default 0.6" in out  # var p: range and default from the metadata
