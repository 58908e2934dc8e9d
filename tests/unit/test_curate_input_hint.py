"""curate pointed at the capture root instead of one task's folder: a failure that says so.

Why: the gateway captures to ``calls/<namespace>/<task>/`` and curate reads the ``*.jsonl``
directly in the folder it is given. Given ``calls/``, it said "no call log at calls/ yet", which
the operator reads as "wait for data" (DataReady WaitingForData), and the task waited for
ever, curating again every recheck, while the subfolders held thousands of calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from slm_contract import EXIT_REPORTED, TrainerResult
from slm_trainer import cli
from slm_trainer.curate import Args, run

CALL = b'{"schema": 1}\n'


def _capture_root(root: Path, *folders: str) -> Path:
    """``root`` with a shard in each of ``folders`` (relative), as the gateway writes them."""
    for folder in folders:
        (root / folder).mkdir(parents=True)
        (root / folder / "calls-0.jsonl").write_bytes(CALL)
    return root


def test_the_capture_root_fails_naming_task_folders(tmp_path: Path) -> None:
    root = _capture_root(
        tmp_path / "calls", "agents/weather", "agents/router", "team-b/triage", "team-c/x"
    )
    result = run(Args(input=root, output_dir=tmp_path / "out"))
    assert not result.ok
    # No example count: the operator fails the revision instead of waiting on it.
    assert result.examples is None, result.message
    assert "agents/router/, agents/weather/, team-b/triage/ and more" in result.message
    assert "point dataset.uri at one task's folder (calls/<namespace>/<task>/)" in result.message


def test_a_namespace_folder_names_its_task_folders(tmp_path: Path) -> None:
    root = _capture_root(tmp_path / "calls", "agents/weather")
    result = run(Args(input=root / "agents", output_dir=tmp_path / "out"))
    assert (result.ok, result.examples) == (False, None)
    assert "(weather/)" in result.message, result.message


def test_the_command_line_exits_as_a_reported_failure(tmp_path: Path) -> None:
    """Exit 3: the data-prep Job fails at once (podFailurePolicy), no retries, and its
    message is what DataReady says."""
    root = _capture_root(tmp_path / "calls", "agents/weather")
    result_path = tmp_path / "result.json"
    code = cli.main(
        [
            "curate",
            f"--input={root}",
            f"--output-dir={tmp_path / 'out'}",
            f"--result-path={result_path}",
        ]
    )
    result = TrainerResult.from_json(result_path.read_text())
    assert (code, result.ok, result.examples) == (EXIT_REPORTED, False, None)
    assert "agents/weather/" in result.message


@pytest.mark.parametrize("folders", [(), ("agents/weather/empty",), ("a/b/c",)])
def test_no_shard_within_two_levels_still_waits(tmp_path: Path, folders: tuple[str, ...]) -> None:
    """Empty subfolders, or shards deeper than a task's folder: still "no call log yet"."""
    root = tmp_path / "calls"
    root.mkdir()
    for folder in folders:
        (root / folder).mkdir(parents=True)
    if folders == ("a/b/c",):
        (root / "a/b/c/calls-0.jsonl").write_bytes(CALL)
    result = run(Args(input=root, output_dir=tmp_path / "out"))
    assert (result.ok, result.examples) == (False, 0)
    assert "no call log" in result.message


@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"bucket-{uuid.uuid4().hex}/calls"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def test_an_object_store_capture_root_fails_the_same_way(tmp_path: Path, memory_root: str) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/{memory_root}/agents/weather/calls-0.jsonl", CALL)
    fs.pipe_file(f"/{memory_root}/agents/router/calls-0.jsonl.part", CALL)  # not finished
    result = run(Args(input=f"memory://{memory_root}/", output_dir=tmp_path / "o"))
    assert (result.ok, result.examples) == (False, None), result.message
    assert "(agents/weather/)" in result.message, result.message
