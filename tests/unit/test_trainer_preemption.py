"""Checkpoints on a volume that fails: a full disk during a save, a read that fails once.

No filesystem is filled here: a save gets a disk with room for a few bytes
(:func:`full_disk`), and a read fails as a network volume's does during a failover
(``torch.load`` raising EIO).
"""

from __future__ import annotations

import errno
import io
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slm_contract import EXIT_CRASHED, TrainerResult
from slm_trainer import cli, preemption

torch = pytest.importorskip("torch")

#: What torch's own writer raises when a save by path meets a full disk (seen on a 600 kB
#: tmpfs): nothing in it, nor in its chain, says ENOSPC.
TORCH_PATH_WRITER_ERROR = "[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598"


#: What torch raises when the CPU allocator gets no memory (a plain RuntimeError).
CPU_OUT_OF_MEMORY = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
    "memory: you tried to allocate 100000000000000 bytes. Error code 12"
)


class _NoRoomAfter(io.RawIOBase):
    """A file with room for ``room`` more bytes; a write past them fails as a full disk's."""

    def __init__(self, fh: Any, room: int) -> None:
        self._fh = fh
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = min(len(data), self._room)
        self._fh.write(bytes(data[:n]))
        self._room -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return int(self._fh.fileno())


def full_disk(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """From now on ``torch.save`` finds ``room`` bytes left on the disk, whether it is
    given a path (its own C++ writer: a RuntimeError that names no cause) or a file."""
    real_save: Callable[..., None] = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, str | Path):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            Path(f).write_bytes(buffer.getvalue()[:room])
            raise RuntimeError(TORCH_PATH_WRITER_ERROR)
        real_save(obj, _NoRoomAfter(f, room), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    # statvfs on the real tmp_path would show plenty of room: a full disk's, once written
    # to, shows none, and the number it reports is checked below.
    free = types.SimpleNamespace(f_bavail=0, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda _: free)


def test_a_save_on_a_full_disk_says_so_and_leaves_the_last_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk gave "RuntimeError: ... unexpected pos 175936 vs 175828" and left the torn
    temporary file on the volume, where it held the room the next pod's save needed."""
    target = tmp_path / "ckpt" / "checkpoint.pt"
    preemption.save_atomically({"step": 1, "weights": torch.zeros(256)}, target)
    before = target.read_bytes()
    full_disk(monkeypatch, room=600)

    with pytest.raises(OSError) as caught:
        preemption.save_atomically({"step": 2, "weights": torch.ones(256)}, target)

    assert caught.value.errno == errno.ENOSPC
    said = str(caught.value)
    assert f"cannot save checkpoint {target}: no space left on {target.parent}" in said
    assert (
        "(0 bytes free; a save needs about the checkpoint's size again while the previous" in said
    )
    assert said.endswith(f"; the last one saved is {len(before)} bytes)")
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint.pt"]  # no .tmp
    assert target.read_bytes() == before  # the previous checkpoint, whole
    assert torch.load(target, weights_only=True)["step"] == 1


@dataclass
class SaveArgs:
    """Saves one checkpoint."""

    checkpoint_dir: str = ""


def test_a_full_disk_is_the_result_message_of_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator copies into the task's conditions: a full disk, not a torch
    internal. Exit 1, a crash the Job retries: the volume is shared by every candidate's
    Job, whose saves come and go, and space freed meanwhile lets the next pod go on from
    the last checkpoint."""

    def run(args: SaveArgs, progress: Any) -> TrainerResult:
        preemption.save_atomically({"weights": torch.ones(256)}, Path(args.checkpoint_dir) / "c.pt")
        return TrainerResult(stage="finetune", ok=True)

    module = types.ModuleType("fake_stage_saves")
    module.Args = SaveArgs  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    module.CONTRACT_STAGE = "finetune"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.STAGES, "saves", module.__name__)
    full_disk(monkeypatch, room=600)
    result_path = tmp_path / "result.json"

    argv = ["saves", "--checkpoint-dir", str(tmp_path / "ckpt"), "--result-path", str(result_path)]
    assert cli.main(argv) == EXIT_CRASHED
    message = TrainerResult.from_json(result_path.read_text()).message
    assert message.startswith("saves crashed: OSError: [Errno 28] cannot save checkpoint ")
    assert "no space left on" in message and "0 bytes free" in message
    assert not list((tmp_path / "ckpt").iterdir())


def test_a_save_that_fails_otherwise_removes_its_temporary_file_and_raises_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint.pt"

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        (f.write if hasattr(f, "write") else Path(f).write_bytes)(b"PK\x03\x04 half")
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TypeError, match="cannot pickle"):
        preemption.save_atomically({"lock": object()}, target)
    assert not list(tmp_path.iterdir())


def _checkpoint(directory: Path) -> Path:
    path = directory / "checkpoint.pt"
    preemption.save_atomically({"step": 7, "weights": torch.zeros(4096)}, path)
    return path


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.EIO, "Input/output error"),
        OSError(errno.ESTALE, "Stale file handle"),
        MemoryError(),
        RuntimeError(CPU_OUT_OF_MEMORY),
    ],
    ids=["EIO", "ESTALE", "MemoryError", "cpu-allocator"],
)
def test_a_read_that_fails_for_want_of_storage_or_memory_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    """A sound checkpoint whose read failed once (an NFS or CephFS failover) was renamed
    .corrupt-<time>, and training started again from step 0. Now the load raises, the Job
    retries the crash, and the next pod resumes from the same file."""
    path = _checkpoint(tmp_path)
    real_load = torch.load
    calls = []

    def load_once_failing(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise failure
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_once_failing)
    with pytest.raises(type(failure)) as caught:
        preemption.load_or_set_aside(path, weights_only=True)
    if isinstance(failure, OSError):
        assert isinstance(caught.value, OSError) and caught.value.errno == failure.errno
        assert f"cannot read checkpoint {path}" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    state, why = preemption.load_or_set_aside(path, weights_only=True)  # the next pod
    assert why is None and state["step"] == 7


@pytest.mark.parametrize("cut", ["half", "all-but-10", "empty"])
def test_a_torn_checkpoint_is_still_set_aside(tmp_path: Path, cut: str) -> None:
    """A file cut short makes torch's zip reader seek before its start: an OSError (EINVAL)
    that says the file is torn, not that the volume failed."""
    path = _checkpoint(tmp_path)
    whole = path.read_bytes()
    torn = {"half": whole[: len(whole) // 2], "all-but-10": whole[:-10], "empty": b""}[cut]
    path.write_bytes(torn)
    state, why = preemption.load_or_set_aside(path, weights_only=True)
    assert state is None and why is not None and "unreadable checkpoint" in why
    (aside,) = tmp_path.glob("checkpoint.pt.corrupt-*")
    assert aside.read_bytes() == torn and not path.exists()
