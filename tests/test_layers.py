"""Every module of msa/ sits on a floor that an import-linter contract checks, and the README says so."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import msa

ROOT = Path(__file__).resolve().parent.parent


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_msa_module_has_a_floor_and_the_readme_names_it() -> None:
    contracts = _contracts()
    core = next(c for c in contracts if c["type"] == "forbidden" and "msa.runtime" in c["forbidden_modules"])
    upper = {name.strip() for c in contracts if c["type"] == "layers" for layer in c["layers"]
             for name in layer.split("|")}
    modules = {f"msa.{info.name}" for info in pkgutil.iter_modules(msa.__path__)}
    unassigned = modules - set(core["source_modules"]) - upper
    assert not unassigned, f"modules with no floor in pyproject.toml's import contracts: {sorted(unassigned)}"
    readme = (ROOT / "README.md").read_text()
    for module in core["source_modules"]:
        assert f"`{module.removeprefix('msa.')}`" in readme, f"README's layer table does not list {module}"
    for package in upper - {"flows"}:
        assert f"`{package.replace('.', '/')}/`" in readme, f"README's layer table does not list {package}"


def test_core_contract_forbids_the_runtime_libraries() -> None:
    core = next(c for c in _contracts() if c["type"] == "forbidden" and "msa.runtime" in c["forbidden_modules"])
    assert {"ray", "mlflow", "prefect", "flows", "shards"} <= set(core["forbidden_modules"])
