"""Capture (S1): every answered call, PII-redacted, appended to its task's call log.

Why it is built this way:

- **Redaction runs in worker processes, not threads.** The trainer's Presidio redactor costs
  milliseconds of pure-Python CPU per new record. In a thread it would hold the GIL against
  the event loop and show up as added latency on every call; in a separate process the OS
  schedules it and the loop never waits. The workers run as ``SCHED_BATCH``
  (:func:`batch_scheduling`), so that waking up with a batch never preempts the event loop.
- **The event loop only enqueues.** :meth:`CaptureSink.submit` puts a tuple of already
  existing objects (the raw request and response bytes) on a bounded queue and returns; a
  pump thread batches the queue into the workers' pipes. When the queue is full the record
  is dropped and counted: the agent's call is never slowed down to save its log record.
- **Nothing unredacted is ever written.** A record the redactor fails on is dropped and
  counted; only ``messages``, ``tools`` and the assistant message are taken from the bodies,
  so a key an agent put in some other request field never reaches the log, and headers are
  not captured at all.
- **Shards are complete or invisible.** Each worker appends to ``<task>/<name>.jsonl.part``
  and renames it to ``.jsonl`` when it rotates (by size or age) or shuts down, so the
  trainer, which reads ``*.jsonl``, never sees a half-written shard. With an fsspec URI
  (``s3://...``) shards are spooled locally and uploaded on rotation.
- **A worker that dies loses only what it held, and says so at once, counting each record
  once.** The records shipped to it and not yet acknowledged are settled, per task, as soon as
  its pipe closes, not at shutdown, so written-versus-served checks see the loss while the
  gateway runs: those it wrote as whole lines to its shards, found past where each shard ended
  at its last acknowledgement (:func:`unacknowledged_lines`), count as written, since its
  successor publishes them; the rest (never written, or a line the kill cut short, which is
  never published) as dropped. Each record is thus written or dropped, never both, wherever
  the kill falls. A worker acknowledges the lines of a batch before anything publishes the
  shards holding them (rotation runs after the acknowledgement; a full spool that must be
  emptied mid-batch gets an acknowledgement of the part written first), so unacknowledged
  lines are always still on local disk to be found. It is restarted after a delay that doubles
  while it keeps dying (:func:`restart_backoff`): each start loads the redactor, seconds of
  CPU, which a crash loop must not spend back to back.
- **A shard left open by a dead writer is still published, a live writer's never.** A worker
  killed mid-shard leaves a ``.part`` file the trainer would never read. The next worker in the
  same slot publishes it at start, and worker 0 of every replica sweeps for shards untouched
  longer than any live writer keeps one open (a replica gone for good); a cut-off last line is
  trimmed (:meth:`ShardWriter.recover_orphans`). A writer holds an exclusive ``flock`` on each
  shard from opening it until it is published and its upload tried, and one lock of its own
  while any of its shards wait for a retry (a shard taken over from a dead writer is renamed
  into the taker's sequence first); recovery takes only a shard whose lock it can get and
  whose writer's lock is free: the kernel releases a lock when its holder dies, however it dies,
  whereas "untouched for a while" was also true of a live writer stalled in an upload, whose
  open shard was then published under it and its later lines lost.
- **A failed upload is tried again, and the spool is bounded.** With a URI target, a shard
  whose upload fails stays in the spool and is retried with a back-off; one a stopped writer
  left is uploaded by the next worker in its slot, like an orphaned ``.part``. A long outage
  must not fill the pod's disk (an evicted pod loses everything): past ``max_spool_bytes`` new
  records are dropped and counted (``spool_full``), and the records of shards still not
  uploaded when a worker stops are counted (``upload_pending``): a pod's spool usually goes
  with the pod.
- **Shutdown flushes everything.** :meth:`CaptureSink.close` (called on SIGTERM through the
  ASGI lifespan) drains the queue, lets the workers finish and rename their shards, and only
  then returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import msgspec
import orjson

from slm_contract import CALL_RECORD_SCHEMA, redact_uri
from slm_gateway.decide import slm_can_serve

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".jsonl"
PART_SUFFIX = ".jsonl.part"
#: Under a writer's root: the lock files that say which writers are alive (ShardWriter).
ALIVE_DIR = ".writers"
#: Back-off between tries of failed uploads (an object store outage), doubling up to the max.
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0
#: At most one "records dropped, queue full" warning per this many seconds.
FULL_LOG_INTERVAL_S = 10.0
#: A batch for the workers stops growing past this many bytes of bodies: the pump holds a
#: batch (and its pickled copy) while sending it, and a worker holds it while redacting.
BATCH_MAX_BYTES = 16 * 1024 * 1024

# Why a record was dropped: the ``reason`` label of
# ``slm_gateway_capture_dropped_records_total``, so an alert on drops says where to look.
#: The queue was full: the workers cannot keep up with the calls.
DROP_QUEUE_FULL = "queue_full"
#: The redactor failed on the record; it is never written unredacted.
DROP_REDACTION = "redaction_failed"
#: Redacted, it could not be encoded as a line (nested deeper than orjson writes, a number
#: past 64 bits): a record no reader could parse either, so not a redaction problem.
DROP_ENCODE = "encode_failed"
#: Its shard could not be written (a full or read-only disk).
DROP_WRITE = "write_failed"
#: A capture worker died holding it without having written it whole to a shard (a record it
#: wrote and never acknowledged is found in its shards and counted written instead), or no
#: live worker could take it.
DROP_WORKER = "worker_lost"
#: The gateway stopped before it was written (submitted while closing, or held by a worker
#: that close() killed at its deadline).
DROP_SHUTDOWN = "shutdown"
#: A URI target's local spool was full (an object-store outage went on long enough to fill
#: ``max_spool_bytes``): dropped rather than written to a disk that fills and gets the pod
#: evicted.
DROP_SPOOL_FULL = "spool_full"
#: Written to the spool but still not uploaded when its worker stopped. These records were
#: counted as written too; the next worker started on the same spool uploads them, but a pod's
#: spool (an emptyDir) goes with the pod, so they count as lost until then.
DROP_UPLOAD_PENDING = "upload_pending"
#: Written to a shard that was deleted while open (its task's folder removed under the gateway,
#: e.g. someone resetting the task's data): counted as written when written, then as this when
#: the writer finds the shard gone (ShardWriter.take_removed); the records after go to a new
#: shard.
DROP_SHARD_REMOVED = "shard_removed"


class Captured(NamedTuple):
    """One answered call as the request path hands it over: cheap to build, cheap to pickle.

    ``request`` is the agent's raw request body and ``response`` the raw OpenAI response body
    it received; the worker takes ``messages``, ``tools`` and the assistant message out of
    them. ``key`` is the task's route key, which is also its directory under the capture root.
    ``llm_only``: the request is the LLM's alone (:func:`llm_only_call`), written as the
    record's ``llm_only`` so that curate leaves it out.
    """

    key: str
    task: str
    model: str
    backend: str
    request: bytes
    response: bytes
    latency_ms: float
    prompt_tokens: int
    completion_tokens: int
    timestamp: float
    request_id: str
    fallback_reason: str
    llm_only: bool = False


@dataclass(frozen=True)
class CaptureConfig:
    """Where and how call logs are written.

    ``target`` is a directory, or an fsspec URI (``s3://bucket/prefix``) when fsspec and the
    filesystem's driver are installed; ``spool`` is the local directory used for the URI case
    (one folder per target under it, :func:`spool_dir`).
    """

    target: str
    max_shard_bytes: int = 64 * 1024 * 1024
    max_shard_seconds: float = 300.0
    queue_size: int = 50_000
    #: The bodies' bytes the queue may hold. A record holds the raw request and response (up
    #: to MiBs each), so a record count alone let a slow worker grow the gateway to an OOM
    #: kill, losing all that was queued, uncounted, long before the queue was "full".
    queue_bytes: int = 256 * 1024 * 1024
    batch_size: int = 256
    #: How long the pump lets records gather before shipping a batch. Short on purpose: a
    #: worker redacts a batch in one burst of CPU, and on a small node a 20 ms batch (about
    #: 5 ms of work at 2000 calls/s) competed with the request path and set the gateway's
    #: p99; 2 ms batches spread the same work thinly (bench/gateway_bench.py: added p99 at
    #: one concurrent call +3.1 ms at 20 ms, +0.9 ms at 2 ms, +3.8 ms at 100 ms).
    linger_s: float = 0.002
    workers: int = 1
    spool: str = ""
    start_timeout_s: float = 120.0
    #: First delay before a dead worker is restarted; doubled per crash in a row, up to the max.
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    #: The most bytes of shards a URI target's spool holds (open or waiting for upload), shared
    #: by the workers; past it new records are dropped and counted (``spool_full``).
    max_spool_bytes: int = 1024 * 1024 * 1024
    #: How long one upload may hold up a worker before it writes records again; the upload
    #: goes on in the background, and the shard is tried again later (ShardWriter).
    upload_timeout_s: float = 60.0
    #: The gateway's ``--log-level`` and ``--log-format``: a worker is a process of its own,
    #: and without them its lines went through Python's bare fallback handler (no time, no
    #: level, nothing below WARNING), unlike every other line of the gateway's stream.
    log_level: str = "info"
    log_format: str = "text"


@dataclass
class CaptureStats:
    """Totals since start; ``pending`` is submitted but neither written nor dropped yet.

    ``unsent`` are written records (so not in ``dropped``) in shards their stopped worker could
    not upload; the ``on_dropped`` hook gets them with the reason ``upload_pending``. Records
    whose shard was deleted while open (``shard_removed``) move from ``written`` to
    ``dropped`` when their worker finds the shard gone.
    """

    submitted: int = 0
    written: int = 0
    dropped: int = 0
    unsent: int = 0
    redacted: int = 0
    redactions: Counter[str] = field(default_factory=Counter)

    @property
    def pending(self) -> int:
        return self.submitted - self.written - self.dropped


# ---- the worker process ---------------------------------------------------------------------


def shard_stamp(now: float) -> str:
    """The time part of a shard's name (UTC, whole seconds): names sort by it."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def shard_name(host: str, pid: int, index: int, seq: int, now: float) -> str:
    """Shard names sort by time, and never collide across replicas, restarts and workers."""
    return f"calls-{shard_stamp(now)}-{host}-{pid}-w{index}-{seq:06d}"


def shard_host() -> str:
    """This host's part of shard names; the gateway finds a dead worker's shards by it."""
    return (socket.gethostname() or "gateway").replace("/", "_").replace(".", "_")


class ShardOwner(NamedTuple):
    """Who wrote a shard, from its name: the host part, the writer's pid, its worker slot (its
    index), the shard's number in that writer's sequence (one up per shard it opens), and
    when it was opened (:func:`shard_stamp`)."""

    host: str
    pid: int
    slot: int
    seq: int
    stamp: str = ""


def shard_owner(name: str) -> ShardOwner | None:
    """The writer of a ``.jsonl`` or ``.jsonl.part`` shard named by :func:`shard_name`, or
    None for any other name."""
    if name.endswith(PART_SUFFIX):
        stem = name[: -len(PART_SUFFIX)]
    elif name.endswith(SHARD_SUFFIX):
        stem = name[: -len(SHARD_SUFFIX)]
    else:
        return None
    parts = stem.rsplit("-", 3)
    if len(parts) != 4 or not parts[2].startswith("w"):
        return None
    head, pid, index, seq = parts[0].split("-", 2), parts[1], parts[2][1:], parts[3]
    if len(head) != 3 or not (pid.isdigit() and index.isdigit() and seq.isdigit()):
        return None
    return ShardOwner(head[2], int(pid), int(index), int(seq), head[1])


def spool_records(root: Path, pid: int, since: str = "") -> Counter[str]:
    """Whole records per task key in the shards worker ``pid`` left under ``root`` (a torn
    last line, cut by a kill, is not one), opened at ``since`` (a :func:`shard_stamp`) or
    later: an earlier process with the same pid (a restarted container numbers its
    processes alike) left the older ones, and reported them itself."""
    found: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for path in root.rglob("*"):
            owner = shard_owner(path.name)
            if owner is None or owner.pid != pid or owner.stamp < since or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                lines = path.read_bytes().count(b"\n")
                if lines:
                    found[path.parent.relative_to(root).as_posix()] += lines
    return found


class ShardWriter:
    """Appends JSON lines to one open shard per task and rotates by size and age.

    ``publish`` is called with each finished shard's final local path (the fsspec upload);
    without it the rename from ``.part`` to ``.jsonl`` is the publication. An upload that
    fails leaves the shard in the spool as ``.jsonl``: it is tried again with a back-off
    (:meth:`retry_uploads`), and one that a stopped writer left behind is uploaded like an
    orphaned ``.part`` (:meth:`recover_orphans`). Before, a failed upload at rotation was
    never tried again, and its records, counted as written, never reached the trainer.

    Each shard is held under an exclusive ``flock`` from its opening until it is published
    and its upload tried, so that no other writer, in this process or another one on the
    same files, takes it for an orphan meanwhile (:meth:`recover_orphans`). A shard waiting for
    a retry is not held open: it is this writer's by its name, and the writer holds one lock
    for all of them (:meth:`_hold_alive`), taken before the shard's own lock is let go. An
    open file per waiting shard ran a long outage into the open-files limit: new records
    could not be written, and once the store was back no upload could open its shard.

    ``upload_timeout_s`` (0: no bound) bounds how long one upload holds up the writer: a store
    that accepts connections and never answers held the worker's loop for as long as the
    filesystem's own timeouts and retries took (minutes), while no record was written. The
    upload is not cut short (a thread cannot be), it goes on in the background; the shard
    waits for a retry, and no other upload starts until that one has ended.

    With ``publish``, ``max_spool_bytes`` (0: no bound) bounds the bytes of this writer's
    shards in the spool, open or waiting for upload: :meth:`has_room` says whether a write
    still fits.
    """

    def __init__(
        self,
        root: Path,
        index: int,
        max_bytes: int,
        max_seconds: float,
        publish: Callable[[Path, str], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_spool_bytes: int = 0,
        upload_timeout_s: float = 0.0,
    ) -> None:
        self.root = root
        self.index = index
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.publish = publish
        self.clock = clock
        self.max_spool_bytes = max_spool_bytes
        self.upload_timeout_s = upload_timeout_s
        self.host = shard_host()
        self.pid = os.getpid()
        self._seq = 0
        self._open: dict[str, tuple[Any, Path, float, int]] = {}
        self._open_lines: Counter[str] = Counter()  # records in each open shard
        #: Records per task key lost with an open shard deleted under this writer, not yet
        #: taken by take_removed.
        self._removed: Counter[str] = Counter()
        self._next_sweep = clock() + max_seconds
        #: Published locally, upload failed or not tried yet: (records, bytes) of each.
        self._pending: dict[Path, tuple[int, int]] = {}
        #: The lock that says this writer is alive, held while any shard is pending, so that
        #: no other writer's sweep takes one (it would be uploaded and counted twice).
        self._alive_fd: int | None = None
        #: An upload that outlasted ``upload_timeout_s`` and still runs.
        self._stuck: threading.Thread | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S

    def write(self, key: str, lines: list[bytes], rotate: bool = True) -> None:
        """Append ``lines`` to ``key``'s shard, all or none of them: on an error (a full disk)
        the shard is cut back to what it held, so lines counted as dropped never appear in
        it later (a buffered file wrote them at its next flush).

        A shard deleted while open (its task's folder removed) is given up first, its records
        counted lost (:meth:`take_removed`), and the lines go to a new shard: written to the
        deleted file's open handle, they were counted written and lost, and its rename at
        rotation failed. One ``fstat`` per task and batch finds it.

        A shard that reached ``max_bytes`` is rotated here, or with ``rotate=False`` by the
        next :meth:`rotate_expired` (the worker acknowledges its batch first, so that an upload
        that stalls does not hold back the acknowledgement of lines already written)."""
        found = self._open.get(key)
        if found is not None and _unlinked(found[0]):
            self._give_up(key)
        fh, path, opened, size = self._shard(key)
        data = memoryview(b"".join(lines))
        try:
            done = 0
            while done < len(data):
                done += fh.write(data[done:]) or 0
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fh.fileno(), size)
            raise
        size += len(data)
        self._open[key] = (fh, path, opened, size)
        self._open_lines[key] += len(lines)
        if rotate and size >= self.max_bytes:
            try:
                self._close(key)
            except OSError as exc:  # the lines are written; an unpublished .part is recovered
                log.error("capture: cannot rotate shard %s: %s", path.name, exc)

    def rotate_expired(self) -> None:
        """Rotate the shards that are ``max_seconds`` old or ``max_bytes`` large."""
        now = self.clock()
        for key in [
            k
            for k, v in self._open.items()
            if now - v[2] >= self.max_seconds or v[3] >= self.max_bytes
        ]:
            self._close(key)

    def next_deadline(self) -> float:
        """Seconds until the oldest open shard must rotate (or ``max_seconds`` if none)."""
        if not self._open:
            return self.max_seconds
        oldest = min(v[2] for v in self._open.values())
        return max(0.0, oldest + self.max_seconds - self.clock())

    def close_all(self) -> None:
        """Publish every open shard. One that cannot be published (a read-only disk) is left
        as its ``.part``, which a later recovery publishes (:meth:`recover_orphans`), and is
        logged once for all; it no longer keeps the shards after it from being published
        (they stayed ``.part`` too, unread by the trainer). A shard deleted while open is
        counted lost, not an error (:meth:`_close`)."""
        failed: list[tuple[str, OSError]] = []
        for key in list(self._open):
            try:
                self._close(key)
            except OSError as exc:
                failed.append((key, exc))
        if failed:
            log.error(
                "capture: cannot publish %d shard(s) (of %s): %s; they stay as .jsonl.part and "
                "are published when a worker recovers them",
                len(failed),
                ", ".join(sorted({key for key, _ in failed})),
                failed[0][1],
            )

    def take_removed(self) -> Counter[str]:
        """Records per task key lost since the last call with open shards that were deleted
        (counted written when written); the worker reports them as ``shard_removed``."""
        removed, self._removed = self._removed, Counter()
        return removed

    def _give_up(self, key: str) -> None:
        """Forget ``key``'s open shard, deleted under this writer, counting its records lost."""
        fh, path, _, _ = self._open.pop(key)
        records = self._open_lines.pop(key, 0)
        with contextlib.suppress(OSError):
            fh.close()
        if records > 0:
            self._removed[key] += records
        log.warning(
            "capture: the shard %s of %s was deleted while open (its folder removed?); its %d "
            "record(s) are lost (counted dropped, shard_removed), the next ones go to a new shard",
            path.name,
            key,
            max(0, records),
        )

    def _alive_lock(self, host: str, pid: int, slot: int) -> Path:
        """The lock file of the writer ``pid`` in worker slot ``slot`` on ``host``."""
        return self.root / ALIVE_DIR / f"{host}-{pid}-w{slot}.lock"

    def _hold_alive(self) -> None:
        """Hold this writer's lock (it has shards waiting for upload). Taken before the lock of
        the shard that starts waiting is let go, so a sweep never finds both free."""
        if self._alive_fd is not None:
            return
        path = self._alive_lock(self.host, self.pid, self.index)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.warning("capture: cannot create the lock file %s: %s", path, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:  # another writer in this process and slot (tests only)
            os.close(fd)
            log.warning("capture: cannot lock %s: %s", path, exc)
            return
        self._alive_fd = fd

    def _let_go_if_idle(self) -> None:
        """Release this writer's lock once no shard of it waits for upload."""
        if self._alive_fd is not None and not self._pending:
            os.close(self._alive_fd)
            self._alive_fd = None

    def _owner_alive(self, name: str) -> bool:
        """Whether the writer of shard ``name`` (another one than this) is alive and holds it
        for a retry of its upload: it holds its lock (:meth:`_hold_alive`)."""
        owner = shard_owner(name)
        if owner is None or (owner.host, owner.pid, owner.slot) == (
            self.host,
            self.pid,
            self.index,
        ):
            return False  # ours are all in self._pending: this one a predecessor's
        try:
            fd = os.open(self._alive_lock(owner.host, owner.pid, owner.slot), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _keep(self, path: Path, records: int = -1, size: int = -1) -> None:
        """Register a published shard as waiting for its upload, with its records and bytes
        (counted from the file when not given: a recovered shard)."""
        if records < 0 or size < 0:
            with contextlib.suppress(OSError):
                data = path.read_bytes()
                records, size = data.count(b"\n"), len(data)
        self._hold_alive()
        self._pending[self._adopt(path)] = (max(0, records), max(0, size))

    def _adopt(self, path: Path) -> Path:
        """``path`` renamed into this writer's own sequence, if another (dead) writer named it.

        Why: a shard waiting for upload is protected by its writer's lock, found through the
        writer its name gives; under a dead writer's name every other worker's sweep found that
        lock free and took the shard too, so it was uploaded and counted once per worker.
        Called while the caller still holds the shard's ``flock``, and after this writer's own
        lock is held, so no sweep finds the shard unprotected in between. The cost: a writer
        killed after its upload and before it deleted the local copy has that shard uploaded
        again under the new name, not over the old one (curate drops the exact duplicates).
        """
        owner = shard_owner(path.name)
        if owner is not None and (owner.host, owner.pid, owner.slot) == (
            self.host,
            self.pid,
            self.index,
        ):
            return path
        self._seq += 1
        adopted = path.with_name(
            shard_name(self.host, self.pid, self.index, self._seq, self.clock()) + SHARD_SUFFIX
        )
        try:
            os.replace(path, adopted)
        except OSError as exc:
            log.warning("capture: cannot take over shard %s: %s", path.name, exc)
            return path
        return adopted

    def position(self, key: str) -> tuple[int, int]:
        """(sequence number, size) of ``key``'s open shard: where the lines written to it so
        far end. A worker acknowledges it with each batch, so that the gateway can tell, if the
        worker dies, which lines of its shards it wrote without acknowledging them."""
        _, path, _, size = self._open[key]
        owner = shard_owner(path.name)
        assert owner is not None  # named by shard_name
        return owner.seq, size

    def has_room(self, size: int, rotate: bool = True) -> bool:
        """Whether ``size`` more bytes fit in the spool (always, without a bound or upload).

        When the open shards are what fills it, they are rotated (and uploaded) first, unless
        ``rotate`` is False: a bound below the shard size must not drop records while uploads
        work."""
        if self.publish is None or self.max_spool_bytes <= 0:
            return True
        waiting = sum(b for _, b in self._pending.values())
        if self.spool_bytes + size <= self.max_spool_bytes:
            return True
        if rotate and self._open and waiting + size <= self.max_spool_bytes:
            try:
                self.close_all()
            except OSError as exc:
                log.error("capture: cannot rotate shards: %s", exc)
        return self.spool_bytes + size <= self.max_spool_bytes

    @property
    def spool_bytes(self) -> int:
        """Bytes of this writer's shards in the spool: open, or waiting for their upload."""
        return sum(v[3] for v in self._open.values()) + sum(b for _, b in self._pending.values())

    def unsent(self) -> Counter[str]:
        """Records per task key in shards whose upload failed and is still to be tried."""
        found: Counter[str] = Counter()
        for path, (records, _) in self._pending.items():
            if path.exists():
                found[path.parent.relative_to(self.root).as_posix()] += records
        return found

    def _shard(self, key: str) -> tuple[Any, Path, float, int]:
        found = self._open.get(key)
        if found is not None:
            return found
        directory = self.root / key
        directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        now = self.clock()
        path = directory / (
            shard_name(self.host, self.pid, self.index, self._seq, now) + PART_SUFFIX
        )
        # unbuffered: a batch reaches the file in one write or is cut back (see write)
        fh = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open until rotation
        try:  # held until published and uploaded: no sweep takes a live writer's shard
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise
        found = (fh, path, now, 0)
        self._open[key] = found
        self._open_lines[key] = 0
        return found

    def recover_orphans(self, grace_s: float = 60.0) -> int:
        """Publish the ``.part`` shards that no live writer holds; the number published.

        Why: a worker that is killed (OOM, SIGKILL, a node lost) never renames its open
        shards, and the trainer reads only ``*.jsonl``, so the records in them, already
        counted as written, would never be trained on.

        A shard is taken only when its ``flock`` can be had at once: its writer holds it until
        the shard is published and uploaded, and the kernel releases it when the writer dies.
        Staleness alone was not enough: a live writer stalled longer than ``max_seconds +
        grace_s`` (an upload during an object-store outage) had its open shard published,
        uploaded and deleted under it, and its later lines were lost uncounted. The old rules
        still apply on top of the lock, for writers that hold none (a gateway from before the
        locks, during a rolling update; a file system whose locks are per node): the shard is
        this host's and this worker slot's but from a process no longer alive (a restarted
        worker or gateway), or it has not been written for longer than ``max_seconds +
        grace_s`` (a replica gone for good). A partial last line (the write the crash cut
        short) is cut off, so every published line is a whole record.

        With ``publish`` the shards taken wait for :meth:`retry_uploads` like a failed upload:
        uploaded here, before the worker reported ready, a store that hangs kept the gateway
        from starting at all.
        """
        now = self.clock()
        published = 0
        found = sorted(self.root.rglob("*" + PART_SUFFIX))
        if self.publish is not None:  # finished but never uploaded: a failed upload, then a stop
            found += sorted(self.root.rglob("*" + SHARD_SUFFIX))
        for path in found:
            if any(path == v[1] for v in self._open.values()) or path in self._pending:
                continue
            try:
                stale = now - path.stat().st_mtime > self.max_seconds + grace_s
            except OSError:
                continue  # renamed or removed by its owner meanwhile
            if not (stale or self._is_dead_sibling(path.name)):
                continue
            try:
                if not self._recover(path):
                    continue
            except FileNotFoundError:
                continue  # another writer published it first
            except OSError as exc:
                log.warning("capture: cannot recover shard %s: %s", path.name, exc)
                continue
            published += 1
        if published:
            log.warning("capture: published %d shard(s) left open by a stopped writer", published)
        return published

    def _recover(self, path: Path) -> bool:
        """Publish (a ``.part``) or upload (a ``.jsonl``) one shard if no one holds its lock;
        False if someone does, or if it was renamed before the lock was had (its owner
        published it: the name now leads to another file, or to none)."""
        with open(path, "r+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live writer holds it
            if os.fstat(fh.fileno()).st_ino != os.stat(path).st_ino:
                return False
            if path.name.endswith(PART_SUFFIX):
                self._publish_orphan(fh, path)
                return True
            if self._owner_alive(path.name):
                return False  # its live writer keeps it for a retry
            self._keep(path)
            return True

    def sweep_orphans(self) -> None:
        """:meth:`recover_orphans`, at most once per ``max_seconds``: what a gateway replica
        that is gone for good left behind is published by the replicas that remain."""
        if self.clock() < self._next_sweep:
            return
        self._next_sweep = self.clock() + self.max_seconds
        try:
            self.recover_orphans()
        except OSError as exc:
            log.warning("capture: cannot look for orphaned shards: %s", exc)

    def retry_uploads(self, force: bool = False) -> None:
        """Upload the shards whose upload failed, once their back-off has passed (it doubles
        while uploads keep failing, from :data:`RETRY_MIN_S` to :data:`RETRY_MAX_S`); with
        ``force`` (shutdown) at once."""
        if not self._pending or (self.clock() < self._retry_at and not force):
            return
        try:
            for path in sorted(self._pending):
                records, size = self._pending.pop(path)
                if path.exists() and not self._upload(path, records, size):
                    break
            else:
                self._retry_delay = RETRY_MIN_S
                return
            self._retry_at = self.clock() + self._retry_delay
            self._retry_delay = min(RETRY_MAX_S, 2 * self._retry_delay)
        finally:
            self._let_go_if_idle()

    @property
    def pending_uploads(self) -> int:
        return len(self._pending)

    def _upload(self, path: Path, records: int = -1, size: int = -1) -> bool:
        """Upload one finished shard; on failure keep it for :meth:`retry_uploads`, with its
        records and bytes (counted from the file when not given: a recovered shard)."""
        try:
            self._put(path)
        except Exception as exc:  # an object store outage: keep the shard, try again later
            if isinstance(exc, FileNotFoundError) and not path.exists():
                return True  # another worker's sweep uploaded it first
            if not self._pending:
                self._retry_at = self.clock() + self._retry_delay
            self._keep(path, records, size)
            log.warning(
                "capture: cannot upload shard %s (%s); kept in the spool, %d waiting",
                path.name,
                type(exc).__name__,
                len(self._pending),
            )
            return False
        return True

    def _put(self, path: Path) -> None:
        """Run ``publish`` on one shard, waiting at most ``upload_timeout_s`` for it (see the
        class); TimeoutError if it runs on, or if an earlier one still does."""
        assert self.publish is not None
        publish, relative = self.publish, path.relative_to(self.root).as_posix()
        if self.upload_timeout_s <= 0:
            publish(path, relative)
            return
        if self._stuck is not None and self._stuck.is_alive():
            raise TimeoutError("an earlier upload still runs")
        failed: list[Exception] = []

        def run() -> None:
            try:
                publish(path, relative)
            except Exception as exc:  # re-raised by the waiting thread
                failed.append(exc)

        thread = threading.Thread(target=run, name="slm-capture-upload", daemon=True)
        thread.start()
        thread.join(self.upload_timeout_s)
        if thread.is_alive():
            self._stuck = thread
            raise TimeoutError(f"the upload still runs after {self.upload_timeout_s:g} s")
        if failed:
            raise failed[0]

    def _is_dead_sibling(self, name: str) -> bool:
        """True for a shard of this host and worker slot written by a process now gone."""
        owner = shard_owner(name)
        if owner is None or owner.slot != self.index or owner.host != self.host:
            return False
        pid = owner.pid
        if pid == self.pid:
            return True  # not one of ours: ours are all in self._open
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # exists, owned by someone else
        return False

    def _publish_orphan(self, fh: BinaryIO, path: Path) -> None:
        """Cut a partial last line off a locked orphan and publish it."""
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                size = _last_newline_end(fh, size)
                fh.truncate(size)
                log.warning("capture: cut a partial last record from %s", path.name)
        self._finish(path, size, upload=False)

    def _close(self, key: str) -> None:
        """Publish ``key``'s shard; its lock is released (the file closed) only after the
        upload was tried, so no sweep uploads it at the same time."""
        if _unlinked(self._open[key][0]):
            self._give_up(key)  # nothing left to publish: its rename would fail
            return
        fh, path, _, size = self._open.pop(key)
        records = self._open_lines.pop(key, -1)
        with fh:
            self._finish(path, size, records)

    def _finish(self, path: Path, size: int, records: int = -1, upload: bool = True) -> None:
        """Publish a closed ``.part`` shard as ``.jsonl`` and upload it (or, without ``upload``,
        leave that to :meth:`retry_uploads`); drop it if empty."""
        if size == 0:
            path.unlink(missing_ok=True)
            return
        final = _published(path)
        os.replace(path, final)
        if self.publish is None:
            return
        if upload:
            self._upload(final, records, size)
        else:
            self._keep(final, records, size)


def _unlinked(fh: Any) -> bool:
    """Whether an open shard's file was deleted (no name leads to it any more): whatever is
    written to it is lost, and it cannot be published."""
    try:
        return os.fstat(fh.fileno()).st_nlink == 0
    except (OSError, ValueError):  # closed meanwhile: not a deletion
        return False


def _published(path: Path) -> Path:
    """The name a shard is published under: ``.jsonl`` for its ``.jsonl.part``."""
    if path.name.endswith(PART_SUFFIX):
        return path.with_name(path.name[: -len(PART_SUFFIX)] + SHARD_SUFFIX)
    return path


def _last_newline_end(fh: BinaryIO, end: int) -> int:
    """The offset just past the last newline before ``end`` (0 if none), read backwards."""
    pos = end
    while pos > 0:
        start = max(0, pos - 65536)
        fh.seek(start)
        cut = fh.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def check_uri_target(target: str) -> None:
    """Raise a RuntimeError that names the missing package when a URI target's filesystem is
    not installed.

    Why here, in the gateway process: the workers build the uploader only after loading the
    redactor, and one that dies of ``Install s3fs to access S3`` reads, from the gateway, as a
    worker that "exited before it was ready", blamed on the redactor. The driver module is
    looked up, not imported, so the request path's process never loads botocore.
    """
    if "://" not in target or target.startswith("file://") or "::" in target:
        return
    protocol = target.split("://", 1)[0]
    shown = redact_uri(target)  # a target may carry credentials: user info, a SAS query
    if importlib.util.find_spec("fsspec") is None:
        raise RuntimeError(
            f"capture target {shown} needs fsspec and its {protocol}:// driver "
            "(pip install 'slm-fleet-operator[gateway]')"
        )
    from fsspec.registry import known_implementations, registry

    if protocol in registry:
        return
    known = known_implementations.get(protocol)
    if known is None:
        raise RuntimeError(f"capture target {shown}: fsspec has no filesystem for {protocol}://")
    module = str(known["class"]).split(".", 1)[0]
    if importlib.util.find_spec(module) is None:
        raise RuntimeError(
            f"capture target {shown}: the {protocol}:// filesystem ({module}) is not installed"
            f" ({known.get('err') or 'pip install ' + module})"
        )


#: Object stores, where an object appears whole when its upload completes (and a rename is a
#: copy): shards are put under their final name there.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def _atomic_puts(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in _OBJECT_STORES for p in protocols)


def _fsspec_publisher(target: str) -> Callable[[Path, str], None]:
    """Upload a finished shard to ``target``, connecting on first use.

    Why not at start: some filesystems connect when built (ftp://, sftp://), and a store
    that is down when the gateway starts must not stop capture from starting (the worker
    died and the gateway blamed the redactor); a failed upload stays in the spool and is
    tried again, as any other.
    """
    import fsspec  # optional dependency, only for URI targets

    opened: list[tuple[Any, str]] = []

    def publish(local: Path, relative: str) -> None:
        if not opened:
            opened.append(fsspec.core.url_to_fs(target))
        fs, root = opened[0]
        remote = f"{root.rstrip('/')}/{relative}"
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        if _atomic_puts(fs):
            fs.put_file(str(local), remote)
        else:
            # Written where the trainer does not read (it lists *.jsonl), then renamed: a
            # put to the final name was readable while it ran, and one cut short (a writer
            # killed mid-upload) stayed there, a shard with a torn last line.
            fs.put_file(str(local), remote + ".part")
            fs.mv(remote + ".part", remote)
        local.unlink()

    return publish


def capture_line(item: Captured, redactor: Any) -> tuple[bytes, dict[str, int]]:
    """The redacted call-log line of one captured call, and its redaction counts per kind.

    The line is what ``CallRecord.to_json`` writes for the same call (the contract's field
    order and schema tag; tests hold the two equal), built straight from the decoded bodies:
    a CallRecord, ``dataclasses.asdict``'s deep copy and a redacted copy of every message
    were most of a worker's time per record, for records that mostly have nothing to redact.
    """
    messages, tools = _request_parts(item.request)
    message = orjson.loads(item.response)["choices"][0]["message"]
    if isinstance(message, dict) and message.get("function_call") is not None:
        tools, message = _legacy_as_tools(item.request, tools, message)
    messages, response, counts = redactor.redact_messages(messages, message)
    record = {
        "task": item.task,
        "messages": messages,
        "response": response,
        "backend": item.backend,
        "model": item.model,
        "tools": tools,
        "latency_ms": round(item.latency_ms, 3),
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "timestamp": item.timestamp,
        "request_id": item.request_id,
        "fallback_reason": item.fallback_reason,
        "redactions": dict(sorted(counts.items())),
    }
    if item.llm_only:  # written only when true, as CallRecord.to_json writes it
        record["llm_only"] = True
    record["schema"] = CALL_RECORD_SCHEMA
    return orjson.dumps(record) + b"\n", counts


#: The legacy form's fields. They alone send a call to the LLM, but capture writes such a
#: call as a tools call on purpose (:func:`_legacy_as_tools`), and the SLM is trained on it.
_LEGACY_FIELDS = ("functions", "function_call")


def llm_only_call(body: Mapping[str, Any]) -> bool:
    """Whether the gateway never sends a request like this one to an SLM
    (:func:`slm_gateway.decide.slm_can_serve`), its legacy form aside; a call record's
    ``llm_only``.

    Why the record says so: ``n``, ``logprobs``, ``response_format``, ``tool_choice``,
    ``modalities``, ``audio`` and ``web_search_options`` are not in it, and curate trained on
    such calls: a text answer that ``tool_choice: "none"``
    forced, with tools offered, taught the SLM to answer in text where it would choose a
    tool. A legacy request is judged in its current form, the functions as tools (a strict
    one is the LLM's alone) and ``function_call: "none"``, which forces text the same way,
    as ``tool_choice: "none"``: a call capture writes without its functions (answered in
    text) would otherwise not show them.
    """
    if not any(name in body for name in _LEGACY_FIELDS):
        return not slm_can_serve(body)
    current = {k: v for k, v in body.items() if k not in _LEGACY_FIELDS}
    if not body.get("tools"):
        current["tools"] = _functions_as_tools(body.get("functions"), body.get("tools"))
    if body.get("function_call") == "none":
        current["tool_choice"] = "none"
    return not slm_can_serve(current)


def _legacy_as_tools(request: bytes, tools: Any, message: dict[str, Any]) -> tuple[Any, Any]:
    """A legacy ``functions`` call in the form the trainer reads: the functions as ``tools``
    (when the request has no tools of its own), the answer's ``function_call`` as its one
    tool call.

    Why: recorded as it came, the call had no tools and an answer without a tool call, so
    the trainer learned that the LLM answered it in text: a selector trained on such calls
    learned to hand back the very calls that chose a function.
    """
    if not tools:
        tools = _functions_as_tools(orjson.loads(request).get("functions"), tools)
    call = message["function_call"]
    if isinstance(call, dict) and not message.get("tool_calls"):
        message = {k: v for k, v in message.items() if k != "function_call"}
        fn = {"name": call.get("name"), "arguments": call.get("arguments", "")}
        message["tool_calls"] = [{"id": "call_0", "type": "function", "function": fn}]
    return tools, message


def _functions_as_tools(functions: Any, otherwise: Any) -> Any:
    """A legacy ``functions`` list as ``tools``; ``otherwise`` when it is not a list."""
    if not isinstance(functions, list):
        return otherwise
    return [{"type": "function", "function": f} for f in functions if isinstance(f, dict)]


class _RequestParts(msgspec.Struct):
    """A request body's messages and tools, both undecoded: the messages are decoded by
    orjson, as the gateway decoded them (msgspec keeps an integer wider than 64 bits an int,
    which orjson cannot write; orjson reads it as a float)."""

    messages: msgspec.Raw
    tools: msgspec.Raw = msgspec.Raw(b"null")


_REQUEST_PARTS = msgspec.json.Decoder(_RequestParts)

#: Every digit as ``0``, so that a run of 19 digits is one substring search: the cheap sign of
#: an integer orjson may read as a float (one past 64 bits: 20 digits, or 19 after a minus
#: sign, below -2**63). A run inside a string or a fraction matches too, and only costs that
#: request the decode the gateway itself made. Why not a regex: ``[0-9]{19}`` took 22 us on
#: BFCL's tools (2.5 KB), half of what a worker spends on a record; this takes 2 us.
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_WIDE_INTEGER = b"0" * 19


def _may_hold_wide_integer(raw: bytes) -> bool:
    """Whether JSON text may hold an integer orjson decodes as a float (see above)."""
    return _WIDE_INTEGER in raw.translate(_DIGITS_AS_ZERO)


def _request_parts(request: bytes) -> tuple[list[Any], Any]:
    """(messages, tools) of a request body; the tools as the agent's own JSON when it can go
    into a JSON line as it is.

    Why: the tools are most of an agent's request (BFCL's: 3.1 of 3.8 KB), the same on
    every call, and never redacted (they are the developer's code); decoding them to encode
    them again was a quarter of a worker's time per repeated record (decoding and encoding a
    BFCL request: 10.1 us, against 4.7 us with the tools left raw). Tools written with a
    line break (pretty-printed) are decoded and written compact, so a record stays one line;
    ``null`` is no tools. Tools with an integer wider than 64 bits (a schema's ``maximum`` of
    2**64) are written as orjson decoded them, a float, as the gateway serves them: kept as
    the agent wrote it, the trainer read it as an integer and trained on another prompt than
    the one its SLM is served.
    """
    try:
        parts = _REQUEST_PARTS.decode(request)
    except msgspec.DecodeError:  # not the shape the gateway validated: decode it all
        req = orjson.loads(request)
        return req["messages"], req.get("tools") or []
    messages = orjson.loads(memoryview(parts.messages))
    tools = bytes(parts.tools)
    if (
        tools.startswith(b"[")
        and b"\n" not in tools
        and b"\r" not in tools
        and not _may_hold_wide_integer(tools)
    ):
        # An empty array as [], not a Fragment: a Fragment is true and equals nothing, so
        # a legacy functions call sent with "tools": [] was kept with no tools.
        return messages, orjson.Fragment(tools) if tools.strip(b"[] \t") else []
    return messages, orjson.loads(tools) or []


def batch_scheduling() -> bool:
    """Mark this process as batch work for the Linux scheduler (``SCHED_BATCH``); True if so.

    Why: a worker wakes every few milliseconds with a batch to redact, and after its sleep
    the scheduler favours it over a busy event loop and preempts the loop for the batch's
    millisecond of work, while agents wait. A batch process is never preempted for on
    wake-up, yet keeps its full share of CPU (same nice level), so capture does not fall
    behind under load. On the benchmark's 2-core machine it cut the gateway's CPU per call
    with capture from about 227 to 215 us. Where the policy is not available nothing changes.
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        return False
    return True


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit; (the soft limit
    before, the soft limit now).

    Why: the soft limit is as low as 1024 in many container runtimes. A capture worker holds
    a file per task with an open shard, and past the limit its records are dropped as
    ``write_failed``; the gateway process (:func:`slm_gateway.main.serve`) holds a socket per
    agent call and one per LLM call, and at about 500 concurrent calls agents got connection
    resets and 502s, which opened the LLM's circuit. An unlimited hard limit is taken as the
    kernel's most (``fs.nr_open``), which is what setting it can reach."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        return -1, -1
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def _nr_open() -> int:
    """The most open files the kernel lets a process have (Linux's ``fs.nr_open``)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1024 * 1024  # the kernel's default


def _rotate(writer: ShardWriter) -> None:
    """Rotation and upload retries; a failure there loses nothing (the lines are on disk, and
    an unpublished ``.part`` is recovered as an orphan) and must not stop the worker."""
    try:
        writer.rotate_expired()
        writer.retry_uploads()
    except OSError as exc:
        log.error("capture: cannot rotate shards: %s", exc)


_TARGET_DIR = re.compile(r"[0-9a-f]{16}")


def spool_dir(spool: str, target: str) -> Path:
    """The spool folder of one URI target, under the configured spool.

    Shards left in a spool (a failed upload, then a stop) are uploaded by whichever writer
    starts next in it. Two gateways on one host with the default spool and different targets
    would otherwise upload each other's shards to their own target: one task's calls in
    another bucket, where its trainer never looks."""
    return Path(spool) / hashlib.sha256(target.encode()).hexdigest()[:16]


def stray_spool_shards(spool: str) -> list[Path]:
    """Shards in ``spool`` outside every target's folder: left by a gateway from before
    targets had folders of their own (a failed upload, then a stop). Nothing uploads them,
    since which target they belong to is not known; :meth:`CaptureSink.start` says so."""
    root = Path(spool)
    found: list[Path] = []
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            if child.is_dir() and _TARGET_DIR.fullmatch(child.name):
                continue
            files = child.rglob("*") if child.is_dir() else [child]
            found += [f for f in files if f.name.endswith((SHARD_SUFFIX, PART_SUFFIX))]
    return sorted(found)


def uploads(target: str) -> bool:
    """Whether ``target`` is a URI the workers upload to (their shards wait in a spool), not
    a folder they write in (a path or ``file://``)."""
    return "://" in target and not target.startswith("file://")


def shard_root(cfg: CaptureConfig) -> Path:
    """Where a target's workers write their shards: its folder, or its spool folder."""
    if uploads(cfg.target):
        return spool_dir(cfg.spool, cfg.target)
    return Path(cfg.target.removeprefix("file://"))


@dataclass
class _Ack:
    """What a worker reports on (part of) a batch: its records per task key, written or dropped
    by reason; the redactions in them; and where each written key's shard now ends, its
    sequence number and size (:meth:`ShardWriter.position`), which is what the gateway reads a
    dead worker's shards against (:func:`unacknowledged_lines`); and ``removed``, records of
    earlier batches, acknowledged as written, lost with a shard deleted while open
    (:meth:`ShardWriter.take_removed`): not part of this batch."""

    written: Counter[str] = field(default_factory=Counter)
    dropped: dict[str, Counter[str]] = field(default_factory=dict)
    redacted: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: Counter[str] = field(default_factory=Counter)

    def drop(self, reason: str, key: str, n: int) -> None:
        self.dropped.setdefault(reason, Counter())[key] += n

    def message(self, final: bool) -> tuple[Any, ...]:
        """The pipe message; ``final`` says the batch is done (the gateway stops holding it)."""
        by_reason = {reason: dict(keys) for reason, keys in self.dropped.items() if keys}
        written, redacted, kinds = dict(self.written), dict(self.redacted), dict(self.kinds)
        removed = dict(self.removed)
        return ("ack", written, by_reason, redacted, kinds, self.positions, final, removed)


class _WriteFailures:
    """Says that a task's shard cannot be written (a full or read-only disk) at most once per
    :data:`FULL_LOG_INTERVAL_S` per task, with the records dropped since the last line, and
    once when it is written again.

    Why: one error per failed batch was about 190 lines a second under load, burying every
    other line of the log; the drops are counted (``write_failed``) either way."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._logged_at: dict[str, float] = {}  # tasks failing now: when last said
        self._unsaid: Counter[str] = Counter()  # records dropped since then

    def failed(self, key: str, records: int, exc: OSError) -> None:
        self._unsaid[key] += records
        now = self.clock()
        if now - self._logged_at.get(key, -math.inf) < FULL_LOG_INTERVAL_S:
            return
        log.error(
            "capture: cannot write the shard of %s: %s; %d record(s) dropped (write_failed), "
            "said again at most every %g s while it lasts",
            key,
            exc,
            self._unsaid.pop(key),
            FULL_LOG_INTERVAL_S,
        )
        self._logged_at[key] = now

    def written(self, key: str) -> None:
        if self._logged_at.pop(key, None) is None:
            return
        log.warning(
            "capture: writing the shard of %s again; %d more record(s) were dropped "
            "(write_failed) since the last message",
            key,
            self._unsaid.pop(key, 0),
        )


def _worker_main(inbox: Connection, outbox: Connection, cfg: CaptureConfig, index: int) -> None:
    """Redact and write batches until the parent sends None or goes away."""
    # Here, not at the top: the entry point imports this module.
    from slm_gateway.main import configure_logging

    configure_logging(cfg.log_level, cfg.log_format, worker=f"slm-capture-{index}")
    if cfg.log_level != "debug":
        # Its INFO lines at every worker start ("Loaded recognizer: ...", 16 of them) say
        # nothing an operator acts on; its warnings still come through.
        logging.getLogger("presidio-analyzer").setLevel(logging.WARNING)
    # The parent decides when to stop: a SIGTERM or Ctrl-C sent to the process group must
    # not kill a worker that still holds unflushed records.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    batch_scheduling()
    try:
        from slm_trainer.redact import default_redactor

        redactor = default_redactor()
        redactor.redact_text("warm-up: jane@example.com")
    except Exception as exc:  # the parent says why, instead of guessing from an exit code
        outbox.send(("failed", f"cannot load the redactor: {type(exc).__name__}: {exc}"))
        return
    root = shard_root(cfg)
    publish = _fsspec_publisher(cfg.target) if uploads(cfg.target) else None
    # The spool's bound is shared by the workers; each keeps to its part of it.
    spool_share = cfg.max_spool_bytes // max(1, cfg.workers) if publish is not None else 0
    writer = ShardWriter(
        root,
        index,
        cfg.max_shard_bytes,
        cfg.max_shard_seconds,
        publish,
        max_spool_bytes=max(1, spool_share) if publish is not None else 0,
        upload_timeout_s=cfg.upload_timeout_s,
    )
    raise_open_files_limit()
    # Ready first: the shards found are only registered here, their uploads are tried in the
    # loop below, so a store that hangs cannot keep the gateway from starting.
    outbox.send(("ready", os.getpid()))
    try:
        writer.recover_orphans()
    except OSError as exc:  # an unreadable root must not stop capture
        log.warning("capture: cannot look for orphaned shards: %s", exc)
    sweeps = index == 0  # one worker per replica publishes stale shards of lost replicas
    full_logged_at = -math.inf
    write_failures = _WriteFailures()
    while True:
        try:
            if not inbox.poll(min(1.0, writer.next_deadline())):
                _rotate(writer)
                if sweeps:
                    writer.sweep_orphans()
                continue
            batch = inbox.recv()
        except (EOFError, OSError):
            break
        if batch is None:
            break
        ack = _Ack()
        redacted: Counter[str] = Counter()
        kinds: dict[str, Counter[str]] = {}
        by_key: dict[str, list[bytes]] = {}
        for item in batch:
            try:
                line, counts = capture_line(item, redactor)
            except orjson.JSONEncodeError as exc:  # redacted, but not writable as JSON
                ack.drop(DROP_ENCODE, item.key, 1)
                log.warning("capture: dropped a record of %s: cannot encode it: %s", item.key, exc)
                continue
            except Exception as exc:  # never write what could not be redacted
                ack.drop(DROP_REDACTION, item.key, 1)
                log.warning("capture: dropped a record of %s: %s", item.key, type(exc).__name__)
                continue
            by_key.setdefault(item.key, []).append(line)
            if counts:
                redacted[item.key] += 1
                kinds.setdefault(item.key, Counter()).update(counts)
        for key, lines in by_key.items():
            size = sum(map(len, lines))
            if ack.positions and not writer.has_room(size, rotate=False):
                # Making room publishes (with a URI target: uploads, then deletes) the open
                # shards, this batch's lines in them too: those are acknowledged first, or a
                # worker killed before its acknowledgement left them counted as lost by a
                # gateway that can no longer find them in the spool, though uploaded.
                ack.removed.update(writer.take_removed())
                outbox.send(ack.message(final=False))
                ack = _Ack()
            if not writer.has_room(size):
                ack.drop(DROP_SPOOL_FULL, key, len(lines))
                if time.monotonic() - full_logged_at >= FULL_LOG_INTERVAL_S:
                    full_logged_at = time.monotonic()
                    log.error(
                        "capture: the spool %s holds %d bytes not yet uploaded, its bound; "
                        "records are dropped until uploads succeed again",
                        root,
                        writer.spool_bytes,
                    )
            else:
                try:
                    writer.write(key, lines, rotate=False)
                except OSError as exc:  # e.g. a full disk: this task's lines of the batch
                    write_failures.failed(key, len(lines), exc)
                    ack.drop(DROP_WRITE, key, len(lines))
                else:
                    write_failures.written(key)
                    ack.written[key] += len(lines)
                    ack.positions[key] = writer.position(key)
            if key in kinds:
                ack.redacted[key] += redacted[key]
                ack.kinds.update(kinds[key])
        # Acknowledged before rotating: an upload that stalls (an object-store outage) must
        # not leave written lines unacknowledged for long. (Should the worker die first, the
        # gateway finds them in its shards all the same: unacknowledged_lines.)
        ack.removed.update(writer.take_removed())
        outbox.send(ack.message(final=True))
        _rotate(writer)
    unsent: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    try:
        writer.close_all()
        writer.retry_uploads(force=True)
        removed = writer.take_removed()  # found at rotation since the last batch, or now
        unsent = writer.unsent()
        if unsent:
            log.error(
                "capture: %d shard(s) (%d records) not uploaded before shutdown; they stay in "
                "the spool %s and the next worker there uploads them, if the spool outlives "
                "this pod",
                writer.pending_uploads,
                sum(unsent.values()),
                root,
            )
    finally:
        with contextlib.suppress(OSError):
            outbox.send(("closed", os.getpid(), dict(unsent), dict(removed)))


# ---- the gateway side -----------------------------------------------------------------------


def unacknowledged_lines(
    root: Path,
    host: str,
    pid: int,
    index: int,
    acked: dict[str, tuple[int, int]],
    keys: Iterable[str],
    since: str = "",
) -> dict[str, list[bytes]]:
    """The whole lines that the dead writer ``pid`` (worker slot ``index``, on ``host``) wrote
    to each task key's shards after the end it last acknowledged there (``acked``: the
    sequence number and size of its shard, from :meth:`ShardWriter.position`).

    Why: a worker killed between writing a batch and acknowledging it leaves the lines in a
    ``.part`` shard that its successor publishes (:meth:`ShardWriter.recover_orphans`); counted
    as lost, they were counted twice, kept and dropped. A shard numbered below the
    acknowledged one holds acknowledged lines only (a worker rotates a shard only once its
    lines are acknowledged); the acknowledged shard holds new ones past its acknowledged size,
    and a later one only new ones. A last line without its newline (the kill cut the write
    short) is no record: recovery cuts it off, and it is not returned.

    Only shards opened at ``since`` (the worker's start, a :func:`shard_stamp`) or later are
    its own: a container restarted in the same pod gets the same hostname, the same capture
    volume and, with the gateway as PID 1, the same worker pids, and the shards an earlier
    container wrote were counted written as lost records of this one, lost in silence.
    """
    found: dict[str, list[bytes]] = {}
    for key in keys:
        try:
            entries = list(os.scandir(root / key))
        except (FileNotFoundError, NotADirectoryError):
            continue  # nothing written for this task
        for entry in entries:
            owner = shard_owner(entry.name)
            if owner is None or (owner.host, owner.pid, owner.slot) != (host, pid, index):
                continue
            if owner.stamp < since:
                continue
            seq, size = acked.get(key, (0, 0))
            if owner.seq < seq:
                continue
            data = _read_shard(Path(entry.path), size if owner.seq == seq else 0)
            lines = data.split(b"\n")[:-1]  # the last piece ends without one
            if lines:
                found.setdefault(key, []).extend(lines)
    return found


def _read_shard(path: Path, offset: int) -> bytes:
    """A shard's bytes from ``offset``, under its published name if it was published
    meanwhile (a sweep of stale shards); nothing if it is gone (uploaded by that sweep)."""
    for candidate in dict.fromkeys((path, _published(path))):
        with contextlib.suppress(FileNotFoundError), open(candidate, "rb") as fh:
            fh.seek(offset)
            return fh.read()
    return b""


def _send_quietly(conn: Connection, message: Any) -> None:
    """Send on a pipe whose reader may be gone (killed meanwhile): nothing to report."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(message)


#: How long a failed start waits for the workers it had started to stop before killing them.
START_STOP_TIMEOUT_S = 10.0

#: A worker that ran this long before dying is not crash-looping: its successor starts the
#: back-off over.
HEALTHY_UPTIME_S = 60.0


def restart_backoff(
    previous_crashes: int, uptime_s: float, base_s: float, cap_s: float
) -> tuple[int, float]:
    """(crashes in a row, counting this one; seconds to wait before restarting) for a worker
    that died after ``uptime_s``, whose predecessors had crashed ``previous_crashes`` times in
    a row: ``base_s``, then doubled per crash in a row, at most ``cap_s``."""
    crashes = 1 if uptime_s >= HEALTHY_UPTIME_S else previous_crashes + 1
    return crashes, min(cap_s, base_s * 2 ** min(crashes - 1, 32))


class _Worker:
    """One worker process, its pipes, and the batches it holds unacknowledged.

    ``inflight`` has one Counter of records per task key for each batch sent and not yet
    acknowledged, oldest first: a worker acknowledges every batch, in order. ``lock`` makes
    "still alive, so append" (the pump) and "dead, so take what it held" (its ack thread) one
    step each, so a batch is counted by exactly one of them.
    """

    def __init__(self, ctx: Any, cfg: CaptureConfig, index: int, crashes: int = 0) -> None:
        #: Before it starts: every shard it opens is named at this second or later.
        self.since = shard_stamp(time.time())
        inbox_r, inbox_w = ctx.Pipe(duplex=False)
        outbox_r, outbox_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(inbox_r, outbox_w, cfg, index),
            name=f"slm-capture-{index}",
            daemon=True,
        )
        self.proc.start()
        inbox_r.close()
        outbox_w.close()
        self.send_conn: Connection = inbox_w
        self.recv_conn: Connection = outbox_r
        self.closed = threading.Event()
        self.alive = True
        self.index = index
        self.crashes = crashes
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.inflight: deque[Counter[str]] = deque()
        #: Where each task key's shard ended at the last acknowledgement: (shard sequence
        #: number, size), read against the shards if the worker dies (unacknowledged_lines).
        self.acked: dict[str, tuple[int, int]] = {}
        #: Killed by close() at its deadline: what it held is lost to the shutdown, whereas a
        #: worker that dies on its own while draining (out of memory) is a lost worker.
        self.killed_by_close = False
        #: It stopped cleanly and reported the records its spool shards still hold.
        self.reported_unsent = False

    def take_inflight(self) -> Counter[str]:
        """Mark the worker dead and return what it held unacknowledged, which it never will."""
        lost: Counter[str] = Counter()
        with self.lock:
            self.alive = False
            for keys in self.inflight:
                lost.update(keys)
            self.inflight.clear()
        return +lost  # a batch acknowledged in part holds zeros


class CaptureSink:
    """The request path's handle on capture: :meth:`submit` from the loop, :meth:`close` once.

    The queue is a ``collections.deque``, whose ``append`` is atomic and never wakes another
    thread. The pump thread sleeps until a record arrives in an empty queue (the only append
    that wakes it), lets records gather for ``linger_s``, ships everything waiting as one
    batch, and sleeps again once the queue is empty. A thread woken per record
    (``queue.Queue``) cost more CPU than the rest of the request path in profiles: each wake
    is a futex round trip and a GIL hand-over. Polling every ``linger_s`` instead woke it 500
    times a second with nothing to do: 1.9 % of a core for an idle gateway, against 0.4 %
    without capture (`bench/gateway_idle.py`).

    ``on_written``, ``on_dropped`` (with one of the ``DROP_*`` reasons) and ``on_redacted``
    (per task key) and ``on_redactions`` (entities per kind) feed metrics; they run on helper
    threads.
    """

    def __init__(
        self,
        cfg: CaptureConfig,
        *,
        on_written: Callable[[str, int], None] | None = None,
        on_dropped: Callable[[str, int, str], None] | None = None,
        on_redacted: Callable[[str, int], None] | None = None,
        on_redactions: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.stats = CaptureStats()
        self._queue: deque[Captured] = deque()
        self._on_written = on_written
        self._on_dropped = on_dropped
        self._on_redacted = on_redacted
        self._on_redactions = on_redactions
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pump_thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Set by the append that finds the queue empty, cleared by the pump before it looks.
        self._work = threading.Event()
        self._ctx = mp.get_context("spawn")
        self._started = False
        self._closing = False
        self._full_logged_at = -math.inf  # monotonic time of the last "queue full" warning
        self._full_since_log = 0
        # Bodies' bytes queued = in - out; each written by one thread only (submit's, the
        # pump), so neither needs a lock.
        self._bytes_in = 0
        self._bytes_out = 0
        self._root = shard_root(cfg)
        self._host = shard_host()

    # -- lifecycle --
    def start(self) -> None:
        """Start the workers and wait until each has built its redactor (a few seconds)."""
        if self._started:
            return
        check_uri_target(self.cfg.target)
        if not uploads(self.cfg.target):
            shard_root(self.cfg).mkdir(parents=True, exist_ok=True)
        elif stray := stray_spool_shards(self.cfg.spool):
            log.warning(
                "capture: %d shard(s) in the spool %s are outside every target's folder (left "
                "by an earlier gateway version) and are not uploaded; move each under %s if "
                "they belong to this target, e.g. %s",
                len(stray),
                self.cfg.spool,
                spool_dir(self.cfg.spool, self.cfg.target),
                stray[0],
            )
        try:
            for i in range(max(1, self.cfg.workers)):
                self._workers.append(self._spawn(i))
        except BaseException:
            self._stop_started()
            raise
        self._pump_thread = threading.Thread(
            target=self._pump, name="slm-capture-pump", daemon=True
        )
        self._pump_thread.start()
        self._started = True

    def _stop_started(self) -> None:
        """Stop the workers a failed :meth:`start` had started. Why: they ignore SIGTERM, and
        the interpreter's exit joins them, so the gateway whose start failed never exited."""
        with self._lock:
            self._closing = True  # their ack threads must not restart them
        try:
            self._stop_workers(list(self._workers), time.monotonic() + START_STOP_TIMEOUT_S)
        finally:
            for w in self._workers:
                w.send_conn.close()
            self._workers.clear()
            with self._lock:
                self._closing = False

    def _spawn(self, index: int, crashes: int = 0) -> _Worker:
        worker = _Worker(self._ctx, self.cfg, index, crashes)
        if not worker.recv_conn.poll(self.cfg.start_timeout_s):
            worker.proc.kill()
            worker.proc.join(5)
            _release(worker)
            raise RuntimeError(
                f"capture worker {index} did not report ready within "
                f"{self.cfg.start_timeout_s:g} s (loading the redactor, or its start-up)"
            )
        try:
            msg = worker.recv_conn.recv()
        except EOFError:
            worker.proc.join(5)
            _release(worker)
            raise RuntimeError(
                f"capture worker exited with code {worker.proc.exitcode} before it was ready; "
                "is the trainer's redactor (presidio-analyzer, spacy) installed?"
            ) from None
        if msg[0] == "failed":
            worker.proc.join(5)
            _release(worker)
            raise RuntimeError(f"capture worker could not start: {msg[1]}")
        if msg[0] != "ready":
            worker.proc.kill()
            worker.proc.join(5)
            _release(worker)
            raise RuntimeError(f"capture worker sent {msg!r} instead of ready")
        threading.Thread(
            target=self._acks, args=(worker,), name=f"slm-capture-ack-{index}", daemon=True
        ).start()
        return worker

    def submit(self, item: Captured) -> bool:
        """Queue one record; False (and counted as dropped) when the queue is full (in
        records or in bytes) or closed.

        Called from one thread (the event loop): it only appends, it never blocks.
        """
        self.stats.submitted += 1
        q = self._queue
        size = len(item.request) + len(item.response)
        if (
            not self._closing
            and len(q) < self.cfg.queue_size
            and self._bytes_in - self._bytes_out + size <= self.cfg.queue_bytes
        ):
            self._bytes_in += size
            q.append(item)
            if len(q) == 1:
                self._work.set()  # the pump may be asleep on an empty queue
            return True
        self._count_dropped({item.key: 1}, DROP_SHUTDOWN if self._closing else DROP_QUEUE_FULL)
        self._warn_full()
        return False

    def _warn_full(self) -> None:
        """Say that records are being dropped for want of room, at most every
        :data:`FULL_LOG_INTERVAL_S` (a full queue drops thousands a second: one line each
        would cost the loop more than the calls), with how many since the last line."""
        self._full_since_log += 1
        now = time.monotonic()
        if now - self._full_logged_at < FULL_LOG_INTERVAL_S:
            return
        log.warning(
            "capture: %d record(s) dropped: %s (queue of %d records, %d MiB); the call log "
            "misses them",
            self._full_since_log,
            "shutting down" if self._closing else "the workers cannot keep up",
            self.cfg.queue_size,
            self.cfg.queue_bytes >> 20,
        )
        self._full_logged_at, self._full_since_log = now, 0

    def drop(self, key: str, reason: str) -> None:
        """Count one record the gateway could not hand over (a ``DROP_*`` reason), so that
        every call answered is either written or counted dropped."""
        self._count_dropped({key: 1}, reason)

    def depth(self) -> int:
        return len(self._queue)

    def queued_bytes(self) -> int:
        """Bytes of request and response bodies queued (and in the batch being shipped)."""
        return self._bytes_in - self._bytes_out

    def close(self, timeout: float = 60.0) -> CaptureStats:
        """Flush every queued record to its shard and stop the workers; blocking."""
        with self._lock:
            if not self._started or self._closing:
                return self.stats
            # From here no restarted worker is installed: the list below is the last one.
            self._closing = True
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._work.set()
        if self._pump_thread is not None:
            self._pump_thread.join(max(0.0, deadline - time.monotonic()))
        workers = list(self._workers)
        self._stop_workers(workers, deadline)
        if self._pump_thread is not None:
            # A pump stuck in a send to a killed worker goes on once its pipe broke, and
            # counts each batch it takes as dropped; draining the queue beside it here
            # counted a batch it had taken, not yet counted, twice (as "_shutdown" too).
            self._pump_thread.join(30)
        # A worker killed here (an upload hung past the deadline), or dead without a restart,
        # reported nothing of the shards it leaves in the spool, which goes with the pod:
        # their records were counted written, and are counted upload_pending now.
        if uploads(self.cfg.target):
            for w in workers:
                if not w.reported_unsent:
                    left = spool_records(shard_root(self.cfg), w.proc.pid, w.since)
                    if left:
                        self._count_unsent(left)
        # What a worker still holds, and what never left the queue, is lost: counted by task.
        # Taken from the same places the ack threads take it, so nothing is counted twice.
        lost: Counter[str] = Counter()
        for w in workers:
            lost.update(self._settle(w))
        with contextlib.suppress(IndexError):
            while self._queue:
                lost[self._queue.popleft().key] += 1
        if lost:
            self._count_dropped(lost, DROP_SHUTDOWN)
        rest = self.stats.pending
        if rest > 0:
            lost["_shutdown"] = rest
            self._count_dropped({"_shutdown": rest}, DROP_SHUTDOWN)
        if lost:
            log.error("capture: %d records were not written before shutdown", sum(lost.values()))
        return self.stats

    def _stop_workers(self, workers: list[_Worker], deadline: float) -> None:
        """Tell the workers to stop, wait for them until ``deadline``, then kill the rest."""
        # The stop signal goes from threads of its own: a stalled worker's full pipe blocked
        # close() past its deadline, until the kubelet's SIGKILL lost everything uncounted.
        # A pump still stuck in a send means the deadline has passed: no second writer on its
        # pipe, the workers are killed below.
        if self._pump_thread is None or not self._pump_thread.is_alive():
            for w in workers:
                if w.alive:
                    threading.Thread(
                        target=_send_quietly, args=(w.send_conn, None), daemon=True
                    ).start()
        for w in workers:
            w.closed.wait(max(0.0, deadline - time.monotonic()))
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                log.error("capture worker %s did not stop in time; killing it", w.proc.pid)
                w.killed_by_close = True
                w.proc.kill()
                w.proc.join(5)
                w.closed.wait(5)  # its ack thread counts what it held, by task

    # -- helper threads --
    def _pump(self) -> None:
        """Ship what is queued in batches, ``linger_s`` after the first record of a burst;
        asleep while the queue is empty; after stop, ship the rest."""
        batch_size = self.cfg.batch_size
        q = self._queue
        work = self._work
        rr = 0
        while True:
            # Clear first, then look: an append after the look finds the queue empty and
            # sets the event again, so no record waits for the next one to be shipped.
            work.clear()
            if not q and not self._stop.is_set():
                work.wait()
            stopping = self._stop.wait(self.cfg.linger_s)
            while q:
                batch: list[Captured] = []
                size = 0
                with contextlib.suppress(IndexError):
                    while len(batch) < batch_size and size < BATCH_MAX_BYTES:
                        record = q.popleft()
                        batch.append(record)
                        size += len(record.request) + len(record.response)
                rr = self._send(batch, rr)
                self._bytes_out += size  # counted out once shipped: held until then
            if stopping:
                return

    def _send(self, batch: list[Captured], rr: int) -> int:
        """Ship a batch to the next live worker; counted as dropped when none takes it."""
        keys = Counter(i.key for i in batch)
        reason = DROP_WORKER  # unless close() killed the workers that could have taken it
        for _ in range(len(self._workers)):
            w = self._workers[rr % len(self._workers)]
            rr += 1
            if w.killed_by_close:
                reason = DROP_SHUTDOWN
            with w.lock:
                if not w.alive:
                    continue
                w.inflight.append(keys)
            try:
                w.send_conn.send(batch)
                return rr
            except (OSError, ValueError):
                log.error("capture worker %s is gone", w.proc.pid)
                if w.killed_by_close:
                    reason = DROP_SHUTDOWN
                with w.lock:
                    w.alive = False
                    if not (w.inflight and w.inflight[-1] is keys):
                        return rr  # its ack thread already counted this batch as dropped
                    w.inflight.pop()
        self._count_dropped(keys, reason)
        return rr

    def _acks(self, worker: _Worker) -> None:
        """Count a worker's acknowledgements; when it dies, count what it held and replace it."""
        while True:
            try:
                msg = worker.recv_conn.recv()
            except (EOFError, OSError):
                self._died(worker)
                break
            if msg[0] == "closed":
                worker.reported_unsent = True
                if len(msg) > 2 and msg[2]:
                    self._count_unsent(msg[2])
                if len(msg) > 3 and msg[3]:
                    self._count_removed(msg[3])
                if not self._closing:
                    # Stopped unasked (a shard it could not rotate ends its loop): a dead
                    # worker like any other, or the pump would feed a closed pipe for good.
                    self._died(worker)
                break
            _, written, dropped, redacted, kinds, positions, final, removed = msg
            with worker.lock:
                if worker.inflight:
                    if final:
                        worker.inflight.popleft()
                    else:  # part of the batch: the rest is still held
                        worker.inflight[0].subtract(written)
                        for by_key in dropped.values():
                            worker.inflight[0].subtract(by_key)
                worker.acked.update(positions)
            self._count_written(written, redacted, kinds)
            for reason, by_key in dropped.items():
                self._count_dropped(by_key, reason)
            if removed:
                self._count_removed(removed)
        worker.recv_conn.close()
        worker.closed.set()

    def _count_written(
        self, written: dict[str, int], redacted: dict[str, int], kinds: dict[str, int]
    ) -> None:
        with self._lock:
            self.stats.written += sum(written.values())
            self.stats.redacted += sum(redacted.values())
            self.stats.redactions.update(kinds)
        if self._on_written:
            for key, n in written.items():
                self._on_written(key, n)
        if self._on_redacted:
            for key, n in redacted.items():
                self._on_redacted(key, n)
        if self._on_redactions and kinds:
            self._on_redactions(kinds)

    def _settle(self, worker: _Worker) -> Counter[str]:
        """Take what a stopped worker held unacknowledged; count as written those of its
        records that are whole lines in its shards, and return the rest, lost, per task key.

        Why: a worker killed after writing a batch and before acknowledging it left the lines
        in its shards, and its successor publishes them; counted as lost, they were counted
        twice (``written + dropped`` above what arrived, and a drop alert for calls the
        trainer got). The lines are found past the end the worker last acknowledged in each
        shard (:func:`unacknowledged_lines`), read after it exited and before a successor
        starts (which would publish and, to a URI target, upload the shards). A worker still
        running (it would not exit) cannot be read: what it held counts as lost.
        """
        lost = worker.take_inflight()
        if not lost:
            return lost
        # Exited, by its sentinel: two threads joining one worker (close and its ack thread)
        # would race to reap it, and the loser would see it as still running.
        exited = bool(wait_for_exit([worker.proc.sentinel], 5))
        worker.proc.join(0)
        if not exited:
            return lost
        try:
            found = unacknowledged_lines(
                self._root,
                self._host,
                worker.proc.pid or 0,
                worker.index,
                worker.acked,
                lost,
                worker.since,
            )
        except OSError as exc:
            log.error("capture: cannot read the shards of worker %d: %s", worker.index, exc)
            return lost
        written: Counter[str] = Counter()
        redacted: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        for key, lines in found.items():
            for line in lines[: lost[key]]:
                written[key] += 1
                with contextlib.suppress(ValueError, AttributeError):
                    if counts := orjson.loads(line).get("redactions"):
                        redacted[key] += 1
                        kinds.update(counts)
        if written:
            log.warning(
                "capture worker %d (pid %s) wrote %d records it never acknowledged; counted as "
                "written (its shards are published with them)",
                worker.index,
                worker.proc.pid,
                written.total(),
            )
            self._count_written(written, redacted, kinds)
        return +(lost - written) if written else lost

    def _died(self, worker: _Worker) -> None:
        lost = self._settle(worker)
        worker.proc.join(5)
        log.error(
            "capture worker %d (pid %s) died (exit code %s); %d records it held are dropped",
            worker.index,
            worker.proc.pid,
            worker.proc.exitcode,
            sum(lost.values()),
        )
        if lost:
            reason = DROP_SHUTDOWN if worker.killed_by_close else DROP_WORKER
            self._count_dropped(lost, reason)
        if not self._closing:
            self._restart(worker)

    def _restart(self, dead: _Worker) -> None:
        """Start a successor to a dead worker after a back-off; runs on the dead one's ack
        thread, so neither the pump nor the event loop waits for the redactor to load."""
        crashes, delay = restart_backoff(
            dead.crashes,
            time.monotonic() - dead.started,
            self.cfg.restart_backoff_s,
            self.cfg.restart_backoff_max_s,
        )
        while True:
            if delay > self.cfg.restart_backoff_s:
                log.warning(
                    "capture worker %d crashed %d times in a row; restarting in %.0f s",
                    dead.index,
                    crashes,
                    delay,
                )
            if self._stop.wait(delay):
                return
            try:
                new = self._spawn(dead.index, crashes)
                break
            except Exception as exc:  # never let a failed start end the restarts
                log.error("capture worker %d cannot restart: %s", dead.index, exc)
                crashes, delay = restart_backoff(
                    crashes, 0.0, self.cfg.restart_backoff_s, self.cfg.restart_backoff_max_s
                )
        with self._lock:
            installed = not self._closing
            if installed:
                self._workers[dead.index] = new
        if installed:
            log.warning("capture worker %d restarted (pid %s)", dead.index, new.proc.pid)
        else:  # close() began meanwhile and does not know this one: it holds nothing
            with contextlib.suppress(OSError, ValueError):
                new.send_conn.send(None)
            new.closed.wait(10)
            new.proc.join(5)
        dead.send_conn.close()

    def _count_unsent(self, by_key: dict[str, int]) -> None:
        """Report the records a stopped worker left in shards it could not upload: counted as
        written when they reached the spool, and dropped (``upload_pending``) now, since the
        spool may go with the pod; not in ``stats.dropped``, which ``pending`` subtracts."""
        with self._lock:
            self.stats.unsent += sum(by_key.values())
        if self._on_dropped:
            for key, n in by_key.items():
                self._on_dropped(key, n, DROP_UPLOAD_PENDING)

    def _count_removed(self, by_key: dict[str, int]) -> None:
        """Report records lost with a shard deleted while open (``shard_removed``): counted
        written when they were written, they move to ``dropped`` in the stats, so that the
        last log line's counts are what the shards hold; the written metric, a counter, keeps
        them."""
        n = sum(by_key.values())
        with self._lock:
            self.stats.written -= n
            self.stats.dropped += n
        log.error(
            "capture: %d record(s) were written to shards deleted while open (a task's folder "
            "removed?) and are lost",
            n,
        )
        if self._on_dropped:
            for key, k in by_key.items():
                self._on_dropped(key, k, DROP_SHARD_REMOVED)

    def _count_dropped(self, by_key: dict[str, int] | Counter[str], reason: str) -> None:
        with self._lock:
            self.stats.dropped += sum(by_key.values())
        if self._on_dropped:
            for key, n in by_key.items():
                self._on_dropped(key, n, reason)


def _release(worker: _Worker) -> None:
    """Close the pipes of a worker that never started."""
    worker.send_conn.close()
    worker.recv_conn.close()
