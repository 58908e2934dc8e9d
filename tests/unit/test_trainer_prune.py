"""``slm-trainer prune``: a task's superseded revision folders go, and nothing else does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_plan import make_task
from test_trainer_cli import HEAVY, REPO

from slm_contract import TrainerResult
from slm_operator import naming as n
from slm_trainer import cli

KEPT, TRAINING, OLD1, OLD2 = "0123456789", "abcdef0123", "1111111111", "2222222222"


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def _revision(root: Path, rev: str, size: int) -> None:
    """A revision folder as the Jobs leave it: data, a candidate, its checkpoint, a repository."""
    base = root / "weather" / rev
    _write(base / "data" / "train.jsonl", size)
    _write(base / "candidates" / "small" / "adapter.safetensors", size)
    _write(base / "checkpoints" / "small" / "checkpoint.pt", size)
    _write(base / "model_repositories" / "small" / "weather" / "config.pbtxt", size)


def _prune(root: Path, *extra: str) -> tuple[int, TrainerResult]:
    result_path = root.parent / "result.json"
    code = cli.main(
        ["prune", f"--root={root}", "--task=weather", *extra, f"--result-path={result_path}"]
    )
    return code, TrainerResult.from_json(result_path.read_text())


def test_it_removes_every_revision_folder_but_the_kept_ones_and_says_what_it_freed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "workspace"
    for rev, size in ((KEPT, 10), (TRAINING, 10), (OLD1, 1000), (OLD2, 24)):
        _revision(root, rev, size)
    # Not revisions, or not the task's: left alone.
    _write(root / "weather" / "notes" / "readme.txt", 5)
    _write(root / "weather" / "ABCDEF0123" / "x", 5)  # not as naming.revision_of spells one
    _write(root / "weather" / "base-model.bin", 5)
    _write(root / "other-task" / OLD1 / "data" / "x", 5)
    _write(root / ".cache" / "huggingface" / "x", 5)

    code, result = _prune(root, f"--keep={KEPT},{TRAINING}")

    assert code == 0 and result.ok
    left = sorted(p.name for p in (root / "weather").iterdir())
    assert left == sorted([KEPT, TRAINING, "notes", "ABCDEF0123", "base-model.bin"])
    assert (root / "weather" / KEPT / "checkpoints" / "small" / "checkpoint.pt").is_file()
    assert (root / "other-task" / OLD1 / "data" / "x").is_file()
    assert (root / ".cache" / "huggingface" / "x").is_file()
    freed = 4 * 1000 + 4 * 24
    assert result.message == (
        f"removed 2 earlier revision folder(s) of weather: {freed} bytes freed (0.00 GiB); "
        f"kept {KEPT}, {TRAINING}; removed {OLD1}, {OLD2}"
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    removed = [x for x in lines if x.get("event") == "progress"]
    assert [(x["revision"], x["bytes"]) for x in removed] == [(OLD1, 4000), (OLD2, 96)]
    assert lines[-1]["event"] == "result" and lines[-1]["ok"] is True


def test_it_never_follows_a_symbolic_link(tmp_path: Path) -> None:
    """A link inside a superseded revision goes with it, its target stays; a link named like a
    revision is not a revision folder; a task folder that is a link is not pruned through."""
    root = tmp_path / "workspace"
    outside = tmp_path / "elsewhere"
    _write(outside / "precious.bin", 7)
    _revision(root, KEPT, 1)
    _revision(root, OLD1, 1)
    (root / "weather" / OLD1 / "link-to-elsewhere").symlink_to(outside)
    (root / "weather" / OLD2).symlink_to(outside)

    code, result = _prune(root, f"--keep={KEPT}")

    assert code == 0 and result.ok, result.message
    assert not (root / "weather" / OLD1).exists()
    assert (root / "weather" / OLD2).is_symlink()
    assert (outside / "precious.bin").read_bytes() == b"x" * 7

    linked = tmp_path / "linked"
    _revision(outside, OLD1, 1)
    linked.mkdir()
    (linked / "weather").symlink_to(outside / "weather")
    code, result = _prune(linked, f"--keep={KEPT}")
    assert code == cli.EXIT_REPORTED and not result.ok
    assert "symbolic link" in result.message
    assert (outside / "weather" / OLD1 / "data" / "train.jsonl").is_file()


def test_a_task_without_a_folder_has_nothing_to_remove(tmp_path: Path) -> None:
    code, result = _prune(tmp_path / "workspace", f"--keep={KEPT}")
    assert code == 0 and result.ok and "nothing to remove" in result.message


def test_only_the_kept_revisions_left_is_nothing_to_remove(tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    _revision(root, KEPT, 3)
    code, result = _prune(root, f"--keep={KEPT}")
    assert code == 0 and result.ok and "nothing to remove" in result.message
    assert (root / "weather" / KEPT / "data" / "train.jsonl").is_file()


def test_a_folder_it_cannot_remove_is_a_reported_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The others are still removed; the Job fails (exit 3) and the operator says so."""
    import shutil

    root = tmp_path / "workspace"
    for rev in (KEPT, OLD1, OLD2):
        _revision(root, rev, 1)
    real = shutil.rmtree

    def rmtree(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        if Path(path).name == OLD2:
            raise PermissionError(13, "Permission denied", str(path))
        real(path)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    code, result = _prune(root, f"--keep={KEPT}")
    assert code == cli.EXIT_REPORTED and not result.ok
    assert result.message == (
        "could not remove 1 of 2 earlier revision folder(s) of weather: removed 1, 4 bytes "
        f"freed (0.00 GiB); kept {KEPT}; could not remove {OLD2}: Permission denied; "
        f"removed {OLD1}"
    )
    assert not (root / "weather" / OLD1).exists() and (root / "weather" / OLD2).is_dir()


@pytest.mark.parametrize(
    "argv",
    [
        ["--task=weather", "--keep="],  # nothing kept would remove the served revision too
        ["--task=weather", "--keep=latest"],  # a typo would keep nothing
        ["--task=weather", f"--keep={KEPT},ABCDEF0123"],
        ["--task=../weather", f"--keep={KEPT}"],
        ["--task=a/b", f"--keep={KEPT}"],
        ["--task=", f"--keep={KEPT}"],
        ["--task=weather"],
    ],
)
def test_bad_arguments_exit_2_and_remove_nothing(argv: list[str], tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    _revision(root, OLD1, 1)
    with pytest.raises(SystemExit) as exc:
        cli.main(["prune", f"--root={root}", *argv, "--result-path="])
    assert exc.value.code == 2
    assert (root / "weather" / OLD1 / "data" / "train.jsonl").is_file()


def test_revisions_are_named_as_the_operator_names_them() -> None:
    """The stage recognises a revision folder by its name alone: the operator's spelling."""
    from slm_trainer import prune

    spec = make_task()["spec"]
    for rev in (n.revision_of(spec), n.revision_of(spec, 3), n.legacy_revision_of(spec)):
        assert prune.looks_like_revision(rev)
    assert not prune.looks_like_revision("data")


def test_prune_help_imports_nothing_heavy() -> None:
    code = (
        "import json, sys\n"
        "from slm_trainer.__main__ import main\n"
        "try:\n"
        "    main(['prune', '--help'])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"code": 0, "heavy": []}
    assert "--keep" in proc.stdout


def test_a_file_renamed_while_its_folder_is_removed_does_not_pass_for_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pod of a deleted Job still ending renames its checkpoint's temporary file into place
    just after the removal listed the folder: unlinking the listed name finds nothing. That
    was taken for "already removed", and the folder was reported removed with most of it
    left on the claim; it is removed again, as when a file appears meanwhile."""
    from slm_trainer import prune

    root = tmp_path / "workspace"
    _revision(root, KEPT, 1)
    old = root / "weather" / OLD1 / "candidates" / "small"
    for i in range(5):
        _write(old / f"shard{i}.bin", 100)
    _write(old / "checkpoints" / ".last.pt.tmp", 200)
    real = os.unlink

    def unlink(path: str, *args: object, dir_fd: int | None = None, **kwargs: object) -> None:
        if path == ".last.pt.tmp":
            os.rename(path, "last.pt", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(prune, "REMOVE_PAUSE_S", 0.0)
    code, result = _prune(root, f"--keep={KEPT}")

    assert not (root / "weather" / OLD1).exists()
    assert code == 0 and result.ok, result.message
    assert "700 bytes freed" in result.message


def test_the_totals_come_first_however_many_revisions_were_removed(tmp_path: Path) -> None:
    """The result's message is cut to fit the kubelet's 4 KiB: with hundreds of revisions it
    listed every name before the totals, and the cut took the bytes freed and what was kept.
    The totals come first, then ten names at most."""
    root = tmp_path / "workspace"
    _revision(root, KEPT, 1)
    removed = [f"{i:010x}" for i in range(1, 401)]
    for rev in removed:
        (root / "weather" / rev).mkdir(parents=True)
    _write(root / "weather" / removed[0] / "x.bin", 30)

    code, result = _prune(root, f"--keep={KEPT}")

    assert code == 0 and result.ok
    assert len(result.to_json().encode()) <= 4096 and "[truncated]" not in result.to_json()
    assert result.message.startswith(
        f"removed 400 earlier revision folder(s) of weather: 30 bytes freed (0.00 GiB); "
        f"kept {KEPT}; "
    )
    assert f"{', '.join(removed[:10])} and 390 more" in result.message
    assert removed[10] not in result.message
    assert not [p for p in (root / "weather").iterdir() if p.name != KEPT]


def test_a_failure_names_the_path_that_stayed_and_counts_what_went_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure named the file by its bare name ("Permission denied: 'checkpoint.pt'"), not
    where it is, and the bytes removed before it did not count as freed."""
    root = tmp_path / "workspace"
    _revision(root, KEPT, 1)
    _revision(root, OLD1, 24)
    real = os.unlink
    unlinked: list[str] = []

    def unlink(path: str, *args: object, dir_fd: int | None = None, **kwargs: object) -> None:
        if len(unlinked) == 2:  # two files of the folder went, the third stays
            raise PermissionError(13, "Permission denied", path)
        real(path, dir_fd=dir_fd)
        unlinked.append(path)

    monkeypatch.setattr(os, "unlink", unlink)
    code, result = _prune(root, f"--keep={KEPT}")

    assert code == cli.EXIT_REPORTED and not result.ok
    assert result.message.startswith(
        "could not remove 1 of 1 earlier revision folder(s) of weather: "
        f"removed 0, 48 bytes freed (0.00 GiB); kept {KEPT}; "
    ), result.message
    named = re.search(rf"could not remove ({OLD1}/\S+): Permission denied", result.message)
    assert named, result.message
    assert (root / "weather" / named.group(1)).is_file()
    left = [p for p in (root / "weather" / OLD1).rglob("*") if p.is_file()]
    assert len(left) == 2
