"""Stop signals as KeyboardInterrupt, for the programs that start servers: the test session,
the demo and ``slm-fleet-cluster up``.

Why: Python's default for SIGTERM and SIGHUP ends the process at once, without ``finally``
blocks or fixture teardown, and every server these programs start runs in a session of its
own, so etcd, the apiserver, Prometheus and tritonserver were left running. SIGTERM comes
from a CI timeout or ``kill``; SIGHUP from a closed terminal or a dropped SSH connection.
"""

from __future__ import annotations

import signal
from types import FrameType

#: The signals that ask a run to end, besides Ctrl-C (SIGINT, already a KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Once: a CI timeout signals the whole process group, so make passes a second SIGTERM on
    # while the first is handled, and a second KeyboardInterrupt in the middle of the cleanup
    # cut it short (pytest deleted its temporary folder, the cluster's pid file, before the
    # fixtures' teardown could read it, leaving etcd, the apiserver and the rest running).
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_stop_signals() -> None:
    """Turn the first SIGTERM or SIGHUP into a KeyboardInterrupt; ignore later ones.

    A signal the program was started with ignored stays ignored: ``nohup make test &`` or
    ``nohup make demo &`` asks for the run to outlive its terminal, and a handler installed
    over the inherited SIG_IGN stopped it at the hangup.

    Call from the main thread (only it may set signal handlers)."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, _interrupt)
