"""What both training loops (selector and generative) need to survive preemption.

Why a module of its own: a spot or preemptible GPU node gives a pod SIGTERM and a grace
period. Both loops must then save at the next step boundary and exit cleanly, and a save must
never leave a torn file that the restarted pod would trust. Kept free of torch at import time,
so ``--help`` stays light.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

#: How many SIGTERMs any :class:`SigtermFlag` in this process saw. A caller compares it with
#: its own start (the CLI, to exit with the code the Job retries when its run was preempted;
#: cross-fitting, which trains one model per fold), so that a SIGTERM an earlier run in the
#: same process saw does not count for it.
_sigterm_count = 0


def sigterm_count() -> int:
    return _sigterm_count


class SigtermFlag:
    """Turns SIGTERM into a flag the loop checks after each step.

    The handler only sets the flag (no I/O in a signal handler). It is installed only in the
    main thread, where Python allows it; elsewhere the flag simply never rises.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        global _sigterm_count
        self.received = True
        _sigterm_count += 1

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def save_atomically(payload: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a reader sees the old file or the new.

    The file's data is synced before the rename and the directory after it: without that, a
    node that loses power (or is hard-stopped) can come back with the rename on disk but not
    the data, i.e. a truncated checkpoint under the trusted name.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)  # by path: torch's own fast writer, not a Python file object
    fd = os.open(tmp, os.O_RDONLY)  # fsync flushes the file's data whatever fd it is given
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (skipped where a directory cannot be opened or
    synced: some filesystems refuse it, and the rename has happened anyway)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_or_set_aside(path: Path, **load_kwargs: Any) -> tuple[Any, str | None]:
    """(what ``torch.load`` reads from ``path``, None), or (None, why) when it cannot be read.

    A file that fails to load (torn by a hard stop, written by something else) is renamed to
    ``<name>.corrupt-<unix time>`` next to it, so that the run starts fresh instead of every
    retried pod crashing on the same file, and the file is kept for a look. ``why`` says
    what failed and where the file went; the caller logs it. A missing file is (None, None).
    """
    import torch

    if not path.is_file():
        return None, None
    try:
        return torch.load(path, map_location="cpu", **load_kwargs), None
    except Exception as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
            where = f"moved to {aside.name}"
        except OSError as move_error:
            where = f"could not be moved aside ({move_error})"
        error = f"{type(exc).__name__}: {exc}"[:300]
        return None, f"unreadable checkpoint {path} ({error}); {where}"
