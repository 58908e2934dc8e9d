"""The repository layout keeps Python's standard library intact and the operator light."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {"PYTHONPATH": f"{REPO / 'operator'}:{REPO / 'trainer'}:{REPO / 'e2e'}"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_import_operator_is_the_standard_library_module() -> None:
    """``operator/`` is a source root, not a package: ``import operator`` from the repository
    root (where ``operator/`` sits) must still give the stdlib module that json/typing use."""
    assert not (REPO / "operator" / "__init__.py").exists()
    out = _run(
        "import operator, json; print(operator.__file__); print(operator.itemgetter(1)([5, 7]))"
    )
    path, value = out.splitlines()
    assert Path(path).parent == Path(sysconfig.get_paths()["stdlib"])
    assert value == "7"


def test_operator_never_imports_the_training_stack() -> None:
    """The operator image installs without torch; importing it must not need torch."""
    out = _run(
        "import sys, slm_operator.main, slm_operator.plan, slm_operator.builders;"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    assert out == "[]"
