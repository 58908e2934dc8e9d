"""What the stages and both training loops (selector and generative) need to survive
preemption.

Why a module of its own: a spot or preemptible GPU node gives a pod SIGTERM and a grace
period. Both loops must then save at the next step boundary and exit cleanly, any other part
of a stage must end promptly (:class:`StageSigterm`), and a save must never leave a torn file
that the restarted pod would trust. Kept free of torch at import time, so ``--help`` stays
light.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Self

#: How a run stopped by SIGTERM ends its result's message, in every stage and both training
#: paths (generative and selector re-export it). True for a preempted pod, whose Job starts
#: another that resumes; false for a Job past activeDeadlineSeconds, which nothing reruns, so
#: the operator cuts these words from such a failure (slm_operator.observe): they must be the
#: same everywhere.
RERUN_TO_RESUME = "rerun to resume"

#: How many SIGTERMs any handler of this module saw in this process. A caller compares it with
#: its own start (the CLI, to exit with the code the Job retries when its run was preempted;
#: cross-fitting, which trains one model per fold), so that a SIGTERM an earlier run in the
#: same process saw does not count for it.
_sigterm_count = 0

#: ``_sigterm_count`` when the current run began: the CLI's stage, or, for a training called
#: directly (tests, cross-fitting's folds), its outermost handler. None between runs.
_run_start: int | None = None


def sigterm_count() -> int:
    return _sigterm_count


def _count_sigterm() -> None:
    global _sigterm_count
    _sigterm_count += 1


class Terminated(BaseException):
    """SIGTERM outside a training loop: the stage ends now (the CLI exits 143).

    A BaseException, as KeyboardInterrupt is, because stage code catches Exception where a
    call may fail for its own reasons: the chat template that refuses a conversation would
    take it for that and go on, and :func:`load_or_set_aside` would set a sound checkpoint
    aside as unreadable because its load was interrupted.
    """


class _SigtermHandler:
    """Installs ``_handle`` for SIGTERM while the ``with`` block runs, and marks a run.

    Installed only in the main thread, where Python allows it. The outermost handler of a
    run records where the run's SIGTERMs start counting (:func:`sigterm_in_this_run`).
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._outermost = False

    def __enter__(self) -> Self:
        global _run_start
        self._outermost = _run_start is None
        if self._outermost:
            _run_start = _sigterm_count
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        _count_sigterm()

    def __exit__(self, *exc: object) -> None:
        global _run_start
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
        if self._outermost:
            _run_start = None


def sigterm_in_this_run() -> bool:
    """Whether a SIGTERM came since the current run began (False outside a run)."""
    return _run_start is not None and _sigterm_count > _run_start


class SigtermFlag(_SigtermHandler):
    """Turns SIGTERM into a flag a training loop checks after each step.

    The handler only sets the flag (no I/O in a signal handler); in a thread other than the
    main one the flag never rises. It starts raised when a SIGTERM came earlier in the run:
    one during a loop's setup (loading the model, tokenising, a cross-fitted fold's build),
    taken by the CLI's or an outer loop's handler, would otherwise be forgotten, and the
    loop would train to its end while the grace period runs out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received = False

    def __enter__(self) -> Self:
        super().__enter__()
        self.received = self.received or sigterm_in_this_run()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True
        _count_sigterm()


class StageSigterm(_SigtermHandler):
    """The CLI's SIGTERM handler for a whole stage: outside a training loop, end the stage.

    Why: the operator's Jobs run ``slm-trainer`` as the container's PID 1, and the kernel
    drops a signal to PID 1 that has no handler. Before this one, a SIGTERM while a stage
    loaded its data or model, calibrated, evaluated, saved, curated or exported was lost; the
    pod ran until the kubelet's SIGKILL (exit 137: no result, no checkpoint of the work since
    the last one). Raising :class:`Terminated` ends the stage as the default action ends any
    other process, except that ``finally`` blocks run and the CLI reports the preemption.
    That is safe for what the stages write: checkpoints, curated splits and exported
    repositories are written to a temporary name and renamed, so an interrupted write leaves
    the previous file (or none), never a torn one under the trusted name; the rest of a
    candidate's output is read only once its Job has succeeded, and the Job's next pod
    writes it again.

    Inside a training loop its :class:`SigtermFlag` replaces this handler (and puts it back
    when the loop ends), so the loop saves its checkpoint at the next step instead. The
    handler raises only between :meth:`arm` and :meth:`disarm` (the stage's ``run``), and
    once: the CLI's own result writing, and the cleanup that an earlier SIGTERM started,
    are never interrupted.
    """

    def __init__(self) -> None:
        super().__init__()
        self._start = _sigterm_count
        self._armed = False
        self._asked_again = False
        self._retry: threading.Timer | None = None

    def received(self) -> bool:
        """Whether a SIGTERM came since the stage began."""
        return _sigterm_count > self._start

    def arm(self) -> None:
        """From now on a SIGTERM ends the stage; one that came already ends it at once."""
        if self.received():
            raise Terminated
        self._armed = True

    def disarm(self) -> None:
        """The stage is over: no SIGTERM ends it now, nor a retry still pending from one."""
        self._armed = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self._asked_again:
            _count_sigterm()
        self._asked_again = False
        if not self._armed:
            return
        if _importing(frame):
            # C code that imports a module clears whatever the import raised (torch's own
            # start-up imports numpy so), and the stage went on as if no SIGTERM had come:
            # the same signal is sent again shortly, by then outside the import. A real
            # signal, not _thread.interrupt_main, which only sets Python's flag and so left
            # a sleep or a socket wait after the import to run to its end.
            self._asked_again = True
            self._retry = threading.Timer(_RETRY_SECONDS, _signal_main_thread)
            self._retry.daemon = True
            self._retry.start()
            return
        self._armed = False
        raise Terminated


#: How soon :class:`StageSigterm` handles again a SIGTERM that came during an import.
_RETRY_SECONDS = 0.05


def _signal_main_thread() -> None:
    """SIGTERM to the main thread, where Python runs signal handlers."""
    ident = threading.main_thread().ident
    if ident is not None:
        signal.pthread_kill(ident, signal.SIGTERM)


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import (module code, or the import machinery)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def save_atomically(payload: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a reader sees the old file or the new.

    The file's data is synced before the rename and the directory after it: without that, a
    node that loses power (or is hard-stopped) can come back with the rename on disk but not
    the data, i.e. a truncated checkpoint under the trusted name.

    Saved through a Python file object, not by path: torch's own writer turns a full disk
    into "unexpected pos 175936 vs 175828" and drops the OS's error, while a write of ours
    raises ENOSPC, which torch keeps in the exception's chain. A save that fails removes its
    temporary file (a torn one is of no use, and it held the very space the next save
    lacks); on a full disk it raises ``OSError(ENOSPC)`` saying so (:func:`no_space_message`),
    which the CLI reports as the result's message.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())  # the data on disk before the rename makes it trusted
        os.replace(tmp, path)
    except Exception as exc:
        # Asked while the temporary file still holds what the save got down.
        full = out_of_space(exc) or _free_bytes(path.parent) == 0
        _remove(tmp)
        if full:
            previous = path.stat().st_size if path.is_file() else None
            message = no_space_message(path, _free_bytes(path.parent), previous)
            raise OSError(errno.ENOSPC, message) from exc
        raise
    except BaseException:  # Terminated (SIGTERM outside a loop), KeyboardInterrupt
        _remove(tmp)
        raise
    _fsync_directory(path.parent)
    return path


#: What a filesystem says when a write finds no room: ENOSPC, or EDQUOT where the volume
#: has a quota (a network filesystem's export, a project quota on a local one).
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from or while handling says the disk
    is full (torch wraps the write's ``OSError`` in a ``RuntimeError`` of its own)."""
    return any(isinstance(link, OSError) and link.errno in _NO_SPACE_ERRNOS for link in _chain(exc))


def no_space_message(path: Path, free: int | None, previous: int | None) -> str:
    """What a save that ran out of disk says (the result's message, through the CLI).

    Why it names the size: an atomic save writes the new checkpoint beside the previous one
    and removes the old one only by the rename, so the volume needs room for about one more
    checkpoint than it holds; the previous one's size is the best guess of that.
    """
    room = "free space unknown" if free is None else f"{free} bytes free"
    size = "" if previous is None else f"; the last one saved is {previous} bytes"
    return (
        f"cannot save checkpoint {path}: no space left on {path.parent} ({room}; a save "
        f"needs about the checkpoint's size again while the previous one is kept{size})"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    links: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in links):
        links.append(link)
        link = link.__cause__ or link.__context__
    return links


def _free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use in ``directory``'s filesystem (None where
    the filesystem does not say)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _remove(path: Path) -> None:
    """Remove a temporary file, if it is there and the filesystem lets us."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


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

    A load that fails for want of the storage or the memory, not because of the file
    (:func:`storage_failure`: EIO or ESTALE from a network volume during a failover, no
    memory), raises instead, and the file stays where it is: setting a sound checkpoint
    aside restarted training from step 0, while the crash is retried by the Job and the
    next pod reads the file again.
    """
    import torch

    if not path.is_file():
        return None, None
    try:
        return torch.load(path, map_location="cpu", **load_kwargs), None
    except Exception as exc:
        failure = storage_failure(exc)
        if isinstance(failure, OSError) and failure.errno is not None:
            raise OSError(
                failure.errno,
                f"cannot read checkpoint {path} ({failure.strerror}); it is left in place "
                "for the next pod to read again",
            ) from exc
        if failure is not None:
            raise
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.replace(path, aside)
            where = f"moved to {aside.name}"
        except OSError as move_error:
            where = f"could not be moved aside ({move_error})"
        error = f"{type(exc).__name__}: {exc}"[:300]
        return None, f"unreadable checkpoint {path} ({error}); {where}"


#: How torch's CPU allocator says it got no memory (a plain RuntimeError).
_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def storage_failure(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says reading failed for want of the storage or
    the memory, not because of what the file holds; None for a file that is not a checkpoint.

    An ``OSError`` is the storage's except EINVAL: torch's zip reader, looking for the
    archive's directory, seeks before the start of a file cut short and gets EINVAL, the
    commonest form of a torn checkpoint. An ``OSError`` without an errno is no OS's either.
    """
    for link in _chain(exc):
        if isinstance(link, MemoryError) or _CPU_OUT_OF_MEMORY in str(link):
            return link
        if isinstance(link, OSError) and link.errno not in (None, errno.EINVAL):
            return link
    return None
