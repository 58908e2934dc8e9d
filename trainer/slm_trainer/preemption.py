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
from pathlib import Path
from typing import Any

#: Whether any :class:`SigtermFlag` in this process saw SIGTERM: the CLI then exits with a
#: code the Job retries (a preempted run resumes), not the one for a reported failure.
_sigterm_received = False


def sigterm_received() -> bool:
    return _sigterm_received


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
        global _sigterm_received
        self.received = True
        _sigterm_received = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


def save_atomically(payload: Any, path: Path) -> Path:
    """``torch.save`` to a temporary file, then rename: a reader sees the old file or the new."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path
