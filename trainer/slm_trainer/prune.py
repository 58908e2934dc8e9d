"""The ``prune`` stage: remove the storage claim's folders of a task's superseded revisions.

Why a stage: every revision an AgentTask trains writes ``<root>/<task>/<revision>/`` on its
storage claim (curated data, each candidate's output, its checkpoints, which keep the
optimizer state and are several times the model with method full, and the exported model
repositories), and a retraining or a spec edit trains a new revision beside it. Nothing
else removes a folder once its revision is superseded, so after enough retrainings the claim
is full and the next Job fails writing. The operator runs this stage once per promoted
revision, once the earlier revision's Triton pods are gone and no other Job of the task runs,
keeping the served revision and the one in training (``--keep``).

What it touches, and only that: the direct children of ``<root>/<task>/`` whose names are
revisions as the operator names them (ten lower-case hex digits,
``slm_operator.naming.revision_of``), that are folders themselves (not symbolic links), and
are not kept. Anything else there (a base model, notes, another task's folder, the Hugging
Face cache) stays. Symbolic links are never followed: a task folder that is one is refused,
a link named like a revision is left alone, and a link inside a removed folder is removed
as a link (``shutil.rmtree`` works on file descriptors, so a link swapped in meanwhile is
not followed either).

It reports on stdout one progress line per removed folder (its revision and bytes) and in its
result's message how many folders it removed, the bytes freed (those of a folder it removed
in part included) and the kept revisions, then ten names at most of each list (what failed,
with the path relative to the task folder, and what went), so that the totals survive the
kubelet's 4 KiB cut. A folder it cannot remove is a reported failure (exit 3: the Job fails
at once, and the operator says so without stopping anything); the others are still removed.
A folder that changed while it was removed (a pod still ending wrote or renamed a file in
it) is removed again. Run again, it removes what is left.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_contract import TrainerResult

#: The stage as the result names it (``slm_contract.STAGES``).
CONTRACT_STAGE = "prune"

#: A revision folder's name: ``slm_operator.naming.revision_of`` (the first ten hex digits of
#: a SHA-256), checked against it by tests/unit/test_trainer_prune.py.
_REVISION = re.compile(r"[0-9a-f]{10}")

#: How often a folder is removed again when something wrote into it while it was removed
#: (a pod of a deleted Job that is still ending), and the pause between tries.
REMOVE_TRIES = 3
REMOVE_PAUSE_S = 1.0

Emit = Callable[[dict[str, Any]], None]


def looks_like_revision(name: str) -> bool:
    """Whether ``name`` is a revision as the operator names one."""
    return _REVISION.fullmatch(name) is not None


@dataclass
class Args:
    """Remove a task's revision folders on the storage claim, except the kept ones."""

    task: str = field(metadata={"help": "the AgentTask's name: its folder under --root"})
    keep: str = field(
        metadata={"help": "comma-separated revisions whose folders stay (the served one first)"}
    )
    root: Path = field(
        default=Path("/workspace"), metadata={"help": "where the storage claim is mounted"}
    )

    def __post_init__(self) -> None:
        """Refused (exit 2) before anything is removed: a task name that is not one folder
        would prune elsewhere, and a kept revision misspelled would keep nothing."""
        if not self.task or self.task in (".", "..") or "/" in self.task or "\0" in self.task:
            raise ValueError(f"--task {self.task!r} must be one folder name")
        if not self.kept():
            raise ValueError("--keep must name at least one revision (the served one)")
        wrong = [r for r in self.kept() if not looks_like_revision(r)]
        if wrong:
            raise ValueError(f"--keep names no revision: {', '.join(wrong)}")

    def kept(self) -> list[str]:
        return [r.strip() for r in self.keep.split(",") if r.strip()]


def revision_folders(task_dir: Path) -> list[str]:
    """The revisions with a folder of their own in ``task_dir`` (links left out), sorted."""
    with os.scandir(task_dir) as entries:
        names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    return sorted(name for name in names if looks_like_revision(name))


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``, links not followed, a hard-linked file once."""
    total, seen = 0, set()
    for parent, dirs, files in os.walk(path, followlinks=False):
        for name in [*files, *dirs]:
            try:
                st = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def _rmtree(path: Path) -> None:
    """``shutil.rmtree(path)``, an error naming the entry's path, not its bare name.

    Why: ``rmtree`` works on file descriptors and names in its errors only what it passed
    to the call (``Permission denied: 'checkpoint.pt'``), which does not say which revision
    or folder holds the file that stayed. The error handler knows the entry's path.
    """

    def named(exc: BaseException, entry: str) -> None:
        if isinstance(exc, OSError) and exc.errno is not None:
            # OSError(errno, ...) is the subclass for errno: FileNotFoundError stays one
            raise OSError(exc.errno, exc.strerror, entry) from exc
        raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=lambda _func, entry, exc: named(exc, entry))
    else:
        shutil.rmtree(path, onerror=lambda _func, entry, info: named(info[1], entry))


def _remove(path: Path) -> None:
    """``shutil.rmtree(path)``, tried again when the folder changed while it was removed.

    Why again: a pod of a deleted Job that is still ending may write into the folder (its
    last ``rmdir`` finds it not empty) or rename a file in it after ``rmtree`` listed it (the
    listed name is gone). Only a folder that no longer exists is removed; ``rmtree`` stops at
    the first error, so a vanished entry alone left most of the folder on the claim.
    """
    for attempt in range(REMOVE_TRIES):
        try:
            _rmtree(path)
            return
        except FileNotFoundError:
            if not os.path.lexists(path):
                return
            if attempt + 1 == REMOVE_TRIES:
                raise
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY or attempt + 1 == REMOVE_TRIES:
                raise
        time.sleep(REMOVE_PAUSE_S)


#: How many revisions the result's message names of those removed, and of those that failed:
#: it must fit the kubelet's 4 KiB with the totals, which come first.
NAMED = 10


def _freed(n: int) -> str:
    return f"{n} bytes freed ({n / 2**30:.2f} GiB)"


def _some(items: list[str], sep: str = ", ") -> str:
    """The first :data:`NAMED` of ``items``, and how many more there are."""
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return sep.join(items[:NAMED]) + more


def failure(exc: OSError, task_dir: Path, rev: str) -> str:
    """What could not be removed and why, the path relative to the task folder."""
    where = rev
    if isinstance(exc.filename, str | bytes | os.PathLike):
        try:
            where = str(Path(os.fsdecode(exc.filename)).relative_to(task_dir))
        except ValueError:  # not under the task folder: an error raised elsewhere
            where = f"{rev} ({os.fsdecode(exc.filename)})"
    return f"could not remove {where}: {exc.strerror or exc}"


def summary(
    task: str, task_dir: Path, removed: list[str], failed: list[str], freed: int, kept: str
) -> str:
    """The result's message: the counts, the bytes freed and the kept revisions first, then
    the failures and the removed revisions, :data:`NAMED` of each at most.

    Why in that order: the message is cut to fit the kubelet's 4 KiB, and with hundreds of
    revisions the names listed first took the totals with them.
    """
    if failed:
        head = (
            f"could not remove {len(failed)} of {len(removed) + len(failed)} earlier revision "
            f"folder(s) of {task}: removed {len(removed)}, {_freed(freed)}; kept {kept}; "
            f"{_some(failed, '; ')}"
        )
        return f"{head}; removed {_some(removed)}" if removed else head
    if not removed:
        return f"nothing to remove under {task_dir}; kept {kept}"
    return (
        f"removed {len(removed)} earlier revision folder(s) of {task}: {_freed(freed)}; "
        f"kept {kept}; removed {_some(removed)}"
    )


def run(args: Args, emit: Emit) -> TrainerResult:
    keep = args.kept()
    task_dir = args.root / args.task
    if task_dir.is_symlink():
        return TrainerResult(
            stage=CONTRACT_STAGE,
            ok=False,
            message=f"{task_dir} is a symbolic link; prune follows none, so nothing was removed",
        )
    if not task_dir.is_dir():
        return TrainerResult(
            stage=CONTRACT_STAGE, ok=True, message=f"nothing to remove: no folder {task_dir}"
        )
    found = revision_folders(task_dir)
    doomed = [r for r in found if r not in keep]
    removed: list[str] = []
    failed: list[str] = []
    freed = 0
    for i, rev in enumerate(doomed, 1):
        path = task_dir / rev
        size = folder_bytes(path)
        try:
            _remove(path)
        except OSError as exc:
            # rmtree stops at the first error: what it removed before is freed all the same
            freed += max(0, size - (folder_bytes(path) if os.path.lexists(path) else 0))
            said = failure(exc, task_dir, rev)
            failed.append(said)
            emit({"event": "warning", "stage": "prune", "revision": rev, "message": said})
            continue
        removed.append(rev)
        freed += size
        emit(
            {
                "event": "progress",
                "stage": "prune",
                "revision": rev,
                "bytes": size,
                "removed": i,
                "total": len(doomed),
                "percent": round(100.0 * i / len(doomed), 2),
            }
        )
    kept_here = ", ".join(r for r in keep if r in found) or "none of them has a folder"
    message = summary(args.task, task_dir, removed, failed, freed, kept_here)
    return TrainerResult(stage=CONTRACT_STAGE, ok=not failed, message=message)
