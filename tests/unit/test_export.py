"""The export stage's output folder and the numbers it takes from a candidate's description.

A selector candidate is used throughout: exporting it copies files and loads no model.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from slm_contract import ContractError, TrainerResult
from slm_trainer import cli, export

SELECTOR = {"format": "slmfleet.dev/selector/v1", "threshold": 0.5, "score": 0.9, "parameters": 7}


def _candidate(tmp_path: Path, name: str = "selector.json", **fields: Any) -> Path:
    cand = tmp_path / "cand"
    cand.mkdir()
    (cand / name).write_text(json.dumps({**SELECTOR, **fields}))
    return cand


def _export(tmp_path: Path, cand: Path, output: Path) -> tuple[int, TrainerResult]:
    """The exit code and the reported result of the export stage, run as the Job runs it."""
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "export",
            "--candidate=c",
            "--model=m",
            f"--candidate-dir={cand}",
            f"--output={output}",
            "--model-name=weather",
            f"--result-path={result_path}",
        ]
    )
    return code, TrainerResult.from_json(result_path.read_text())


def _args(cand: Path, output: Path) -> export.Args:
    return export.Args(
        candidate="c", model="m", candidate_dir=cand, output=output, model_name="weather"
    )


def test_a_volumes_mount_point_as_output_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--output /models, where the PVC is mounted: the repository was staged on the parent
    filesystem, and the final rename crashed with EXDEV (exit 1, retried in vain), leaving
    the staging folder there. It is a wrong command line: exit 2, naming what to pass."""
    cand = _candidate(tmp_path)
    volume = tmp_path / "models"
    volume.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume or real(p))
    code, result = _export(tmp_path, cand, volume)
    assert code == cli.EXIT_BAD_ARGUMENTS
    assert not result.ok and "is the root of a mounted volume" in result.message
    assert str(volume / "model_repository") in result.message
    assert list(volume.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cand", "models", "result.json"]


def test_a_rename_refused_across_mounts_removes_the_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bind mount of the same filesystem is no mount point by device number, yet the
    kernel refuses a rename into it (EXDEV): refused as a mount point, nothing left behind."""
    cand = _candidate(tmp_path)
    real = os.replace

    def across_mounts(src: Any, dst: Any) -> None:
        if str(src).endswith(".tmp"):
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", across_mounts)
    code, result = _export(tmp_path, cand, tmp_path / "repo")
    assert code == cli.EXIT_BAD_ARGUMENTS
    assert "is the root of a mounted volume" in result.message
    assert list((tmp_path / "repo").iterdir()) == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_output_dot_stages_beside_the_repository_not_in_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Path('.').name is '': the staging folder was ./..weather.tmp, inside the repository,
    where Triton loads it (hidden folders too) once a killed export leaves it behind."""
    cand = _candidate(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)

    class Killed(Exception):
        pass

    def killed(*_: Any) -> None:
        raise Killed("killed before the rename")

    monkeypatch.setattr(export.os, "replace", killed)
    with pytest.raises(Killed):
        export.run(_args(cand, Path(".")), lambda _: None)
    assert os.listdir(repo) == []
    assert (tmp_path / ".repo.weather.tmp" / "config.pbtxt").is_file()


@pytest.mark.parametrize("name", ["selector.json", "manifest.json"])
@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("threshold", True, "threshold true is not a number in [0, 1]"),
        ("parameters", 2.2e7, "parameters 22000000.0 is not a non-negative integer"),
        ("score", 97.0, "score 97.0 is not a number in [0, 1]"),
        ("trainable_parameters", -1, "trainable_parameters -1 is not a non-negative integer"),
    ],
)
def test_numbers_a_result_cannot_carry_are_refused_before_writing(
    tmp_path: Path, name: str, field: str, value: Any, said: str
) -> None:
    """A threshold of true was served as 1.0; a float count or a score of 97 crashed the stage
    (exit 1, ContractError) with the repository already in place. The evaluate stage's rules
    (evaluate.description_numbers) decide, and the failure is reported (exit 3)."""
    extra = {"weights": "full"} if name == "manifest.json" else {}
    cand = _candidate(tmp_path, name, **extra, **{field: value})
    code, result = _export(tmp_path, cand, tmp_path / "repo")
    assert code == cli.EXIT_REPORTED
    assert not result.ok and str(cand / name) in result.message and said in result.message
    assert not (tmp_path / "repo").exists()


def test_a_result_that_cannot_be_built_leaves_no_repository_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result was built after the rename: a refused one crashed the stage with the
    repository served, and the Job's retry exported it again."""
    cand = _candidate(tmp_path)

    def refused(**fields: Any) -> TrainerResult:
        if fields.get("ok"):
            raise ContractError("refused")
        return TrainerResult(**fields)

    monkeypatch.setattr(export, "TrainerResult", refused)
    with pytest.raises(ContractError):
        export.run(_args(cand, tmp_path / "repo"), lambda _: None)
    assert not (tmp_path / "repo" / "weather").exists()


def test_a_valid_description_is_exported_with_its_numbers(tmp_path: Path) -> None:
    cand = _candidate(tmp_path, threshold=1, score=1)
    code, result = _export(tmp_path, cand, tmp_path / "repo")
    assert code == 0, result.message
    assert (result.threshold, result.score, result.parameters) == (1.0, 1.0, 7)
    meta = json.loads((tmp_path / "repo" / "weather" / "metadata.json").read_text())
    assert (meta["eval_threshold"], meta["eval_score"], meta["parameters"]) == (1.0, 1.0, 7)


def test_a_selector_with_a_generator_reports_the_score_measured_at_the_served_threshold(
    tmp_path: Path,
) -> None:
    """Side by side, the selector's confidence is served, so its threshold is recorded; the
    score beside it was the generator's, measured at another threshold (0.9 at 0.3 reported
    as if at 0.7). Score and threshold now come from the same description."""
    cand = _candidate(tmp_path, threshold=0.7, score=0.6)
    (cand / "manifest.json").write_text(
        json.dumps({"weights": "full", "score": 0.9, "threshold": 0.3, "max_new_tokens": 16})
    )
    code, result = _export(tmp_path, cand, tmp_path / "repo")
    assert code == 0, result.message
    assert (result.threshold, result.score) == (0.7, 0.6)
    meta = json.loads((tmp_path / "repo" / "weather" / "metadata.json").read_text())
    assert (meta["kind"], meta["eval_threshold"], meta["eval_score"]) == (
        "selector+generative",
        0.7,
        0.6,
    )


def test_a_base_named_under_home_is_served_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune trains from ``~/tiny`` (Job arguments see no shell, so it expands the name
    itself); export wrote ``~/tiny`` as a hub id into ``config.pbtxt``, and Triton could not
    load the model."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "tiny").mkdir(parents=True)
    assert export.resolve_base("~/tiny") == (str((tmp_path / "home" / "tiny").resolve()), "path")
