"""The command line as the README describes it: `make train` / `make test` / CI, the `srpo` dispatcher,
`python -m jobs.<command>`, and bad config input exiting with status 2 before any work."""
from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
HELPERS = {"__init__", "cli", "common"}  # jobs/ modules that are not commands


def _make_recipe(target: str) -> list[str]:
    """The recipe lines (tab-indented) of one Makefile target."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_train_make_test_and_ci():
    assert _make_recipe("train") == ["$(BIN)/srpo train --config configs/tiny.yaml"]
    (test,) = _make_recipe("test")
    assert test.startswith("$(BIN)/python -m pytest -q tests;")
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == "make test" and "set -euo pipefail" in ci


def test_every_command_is_a_jobs_module_with_a_main():
    on_disk = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem not in HELPERS)
    assert sorted(c.replace("-", "_") for c in COMMANDS) == on_disk
    for command, module in COMMANDS.items():
        assert module == "jobs." + command.replace("-", "_")
        assert callable(importlib.import_module(module).main), module
        # `python -m jobs.<command>` runs main(): the module ends with the __main__ guard.
        tree = ast.parse((REPO / "jobs" / f"{module.split('.')[1]}.py").read_text())
        guard = tree.body[-1]
        assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'", module
        assert ast.unparse(guard.body[0]) == "raise SystemExit(main())", module
    # The console script (Python 3.10 has no tomllib: the section is read as text).
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    assert scripts.strip() == 'srpo = "jobs.cli:main"'


def test_readme_lists_every_command():
    readme = (REPO / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if line.startswith("jobs/ ")]
    listed = line.split(None, 1)[1].removeprefix("srpo ").split(" | ")
    assert sorted(listed) == sorted(COMMANDS)


def test_dispatcher_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().err
    assert usage.startswith("usage: srpo {") and all(c in usage for c in COMMANDS)
    assert main(["trian"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == "srpo: unknown command 'trian'"
    assert main([]) == 2


def test_make_tiny_through_the_dispatcher_reuses_a_finished_world(tiny_world, capsys):
    root = Path(tiny_world["flux"]).parent
    stamp = (root / "WORLD.json").stat().st_mtime_ns
    assert main(["make-tiny", str(root)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in tiny_world} == tiny_world
    assert (root / "WORLD.json").stat().st_mtime_ns == stamp  # reused, not rewritten


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1e-5", "config error: unknown config key optim.learning_rate; valid keys here: ["),
    ("optim.lr=fast", "config error: optim.lr: got 'fast', expected a number"),
])
def test_bad_config_exits_2_with_one_line(override, message, capsys):
    """Unknown keys and wrong types fail at load, before the tiny world or any model is touched."""
    with pytest.raises(SystemExit, match="^2$"):
        main(["train", "--config", str(REPO / "configs/tiny.yaml"), override])
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
