"""The `msa` command line: cheap to start, strict about configuration, and in step with the flows."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys

import pytest

from flows.cli import build_parser
from msa.runtime.spec import RunSpec

HEAVY = ("torch", "ray", "mlflow", "prefect", "transformers", "timm")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_imports_no_heavy_library() -> None:
    """`msa --help` and every `msa CMD --help` build the same parser: it must not pull in torch & co."""
    proc = _python("import sys, flows.cli as c; c.build_parser(); "
                   f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_version_and_every_command_has_help(capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("msa ")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert sub.description or sub.format_help(), name
        for action in sub._actions:
            if action.dest not in ("help",) and action.option_strings:
                assert action.help, f"msa {name} {action.option_strings[0]} has no help text"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=-4", "train.batch_size"),
        ("train.batch_size=16.5", "train.batch_size"),
        ("train.bf16=maybe", "train.bf16"),
        ("loss.triplet_negatives=bogus", "loss.triplet_negatives"),
        ("train.bogus=1", "train.bogus"),
        ("optim.lr=0", "optim.lr"),
        ("nonsense", "nonsense"),
    ],
)
def test_bad_override_exits_2_with_one_line_before_any_flow_starts(override, key) -> None:
    code = (f"import sys; from flows.cli import main; rc = main(['train', '--set', {override!r}]); "
            "print(rc, 'prefect' in sys.modules, 'ray' in sys.modules)")
    proc = _python(code)
    assert proc.stdout.split() == ["2", "False", "False"], (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr


# Flow parameter -> the command-line destination that sets it, where the names differ.
ALIASES = {"data_uri": "data", "images_dir": "images", "candidate_version": "candidate", "overrides": "set",
           "register_best": "no_register"}


@pytest.mark.parametrize(
    "command, flow",
    [("train", "flows.train_msa:train_msa"), ("demo", "flows.train_msa:train_msa"),
     ("tune", "flows.tune_msa:tune_msa"), ("ablate", "flows.ablate_msa:ablate_msa"),
     ("promote", "flows.promote_msa:promote_msa"),
     ("retrain", "flows.retrain_msa:retrain_msa")],
)
def test_every_flow_parameter_is_reachable_from_its_command(command, flow) -> None:
    import importlib

    module, name = flow.split(":")
    fn = importlib.import_module(module).__dict__[name].fn
    parameters = inspect.signature(fn).parameters
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    dests = {a.dest for a in sub._actions}
    aliases = {**ALIASES, "data_uri": "out"} if command == "retrain" else ALIASES
    missing = {p for p in parameters if aliases.get(p, p) not in dests}
    if command == "train":
        missing -= {"demo_images"}  # the demo corpus is made only by `msa demo`
    if command == "tune":
        missing -= {"demo_images"}
    if command in ("train", "demo", "tune", "ablate", "retrain"):
        assert "epochs" in dests
    assert not missing, f"msa {command} cannot set {sorted(missing)} of {flow}"
    # The run-specification parameters share RunSpec's names and defaults, wherever a flow takes them.
    for field, info in RunSpec.model_fields.items():
        if field in parameters and not (command == "tune" and field == "workers"):
            assert parameters[field].default == info.default, (flow, field)
            assert sub.get_default(field) == info.default, (command, field)


def test_config_prints_the_resolved_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "config", "--preset", "paper", "--set", "optim.lr=2e-5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)
    assert config["optim"]["lr"] == 2e-5 and config["image"]["backbone"] == "resnet50.tv_in1k"
