"""The source side of a live migration: pre-copy rounds, freeze, commit.

:class:`SourceMigration` runs in a worker thread over a blocking transport
(docs/ARCHITECTURE.md, "Engine <-> daemon seam")::

    Hello -> Welcome, Start -> Accept            handshake
    round 0: Layout, Pages/Zeros ..., RoundEnd    everything present
    round n: [Layout], Dropped, Pages/Zeros, RoundEnd   what was written
    ... until the ConvergencePolicy says stop (policy.py), then
    SIGSTOP, final collect, Freeze, [Layout], Dropped, Pages/Zeros,
    FinalEnd, CommitRequest -> Committed (prepared at the destination,
    not visible), Release -> Released (published), then apply ``then``.

Reading and sending are pipelined: a reader thread fills one buffer with
process_vm_readv while the engine thread sends the previous one (both
release the GIL).  Zero pages are found with numpy per buffer and sent as
Zeros runs.  Nothing loops in Python once per page.

Until Released arrives, any failure or cancel thaws the target if we froze
it, tells the peer (Error or Cancel) when the link still works, and returns
a summary with status "failed"/"cancelled" and an error for humans.  Before
Release was sent the destination is sure to drop its staged image; after,
the outcome is in doubt (one rename and one message wide) and the error
says so, naming the image and the destination.  ``run()`` never raises for
a migration failure.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import numpy as np

from migrated.engine.policy import STOP_AND_COPY, TIMEOUT_MESSAGE, ConvergencePolicy
from migrated.engine.transport import (BlockingTransport, CancelLatch, Channel, PeerClosed,
                                       TokenBucket, TransportError, TransportTimeout,
                                       WaitExpired, say_goodbye)
from migrated.errors import MigratedError, ProtocolError
from migrated.kernel import pins, procfs
from migrated.kernel.freezer import Freezer
from migrated.kernel.maps import Layout as KLayout
from migrated.kernel.maps import read_layout
from migrated.kernel import pagemap as pm
from migrated.kernel.reader import MemReader
from migrated.kernel.trackers import (PageDigests, content_changed, make_tracker, page_digests,
                                      runs_from_addrs, shared_anon_runs, shared_window_has_data)
from migrated.runs import PAGE_SIZE, PageRuns
from migrated.threads import Thread
from migrated.wire import events as ev
from migrated.wire import limits as L
from migrated.wire.connection import NEED_DATA, SourceConnection

log = logging.getLogger("migrated.engine.source")

THEN_CHOICES = ("stop", "resume", "kill")

# How the source reads the target's memory:
#
# - Over TLS a reader thread reads ahead into two buffers of 16 MiB (32 MiB
#   per outgoing migration, on huge pages where the kernel has them) while
#   the sending thread encrypts -- about 1 ns/B, several times what the read
#   costs, so reading beside it is nearly free: round 0 498 against 466
#   MiB/s read in the sending thread (session 13, median of eight,
#   alternating).  process_vm_readv runs near memcpy speed at this size
#   (KERNEL.md: 4.5 GB/s at 16 MiB, 1.3 at 64 KiB), and everything paid
#   per buffer (a read call, the zero scan, the tracker's bookkeeping, the
#   hand-over between threads) is paid half as often as with 8 MiB.
# - Over plain TCP sending is one copy, and in the live rounds a second
#   busy thread costs more than the overlap gains: it competes for the
#   cores with the target (which runs on meanwhile), the kernel's transmit
#   path and, on a shared machine, the destination.  The sending thread
#   reads 8 MiB at a time itself: round 0 over loopback 1251 against 1034
#   MiB/s with the reader thread (median of eight, alternating, two cores;
#   4 MiB reads: 1100, 16 MiB: 1030).  That holds for a round of many
#   buffers, where throughput decides.  A round smaller than
#   INLINE_MIN_ROUND_BYTES is read ahead: there the overlap shortens the
#   round, and so what the target dirties meanwhile -- pre-copy freeze
#   median 32 against 35 ms (bench_precopy, twelve alternating runs).
#   Once the target is frozen it takes no CPU, and the final delta's
#   latency is the freeze: it is read ahead too (median 32 against 38 ms,
#   eight alternating runs).  Two buffers of 8 MiB, both warm from round 0.
READ_BUFFER_BYTES = 16 * 1024 * 1024
PIPELINE_DEPTH = 2
INLINE_READ_BYTES = 8 * 1024 * 1024
INLINE_MIN_ROUND_BYTES = 64 * 1024 * 1024

# A round's first read is this small and each next one twice the last, up
# to READ_BUFFER_BYTES: sending starts after reading 512 KiB instead of a
# whole buffer, and the destination writes while the rest is read.  This
# matters for the final delta, a few MiB read and sent with the target
# frozen: all of it was read before the first byte left.
FIRST_READ_BYTES = 512 * 1024


# Without PAGEMAP_SCAN, a mapping with no access rights larger than this is
# not checked for data at the freeze (reading its pagemap word by word
# would cost more than the freeze: a reservation of a TiB is 2 GiB of it).
NO_ACCESS_SCAN_MAX_BYTES = 1 << 30

# The freeze must take hold within this (threads in D state may delay it);
# longer means something is wrong with the target: fail and thaw.
FREEZE_TIMEOUT_S = 5.0

# Under --max-bandwidth, page batches carry about this many seconds of the
# cap, so that the timeout, checked between batches, is kept to about this.
BATCH_GRAIN_S = 0.5

# Past a wait's deadline, how long we still read what the peer already
# sent in search of the answer (SourceMigration._wait).
PAST_DEADLINE_DRAIN_S = 1.0

# Messages that need no answer read per check between read buffers
# (SourceMigration._check_abort).
NOTED_PER_CHECK = 256

# Asynchronous I/O (Linux AIO, io_uring) in flight at the freeze is written
# into the target by the device whenever it completes -- after the final
# collect, too (pins.py, "asynchronous I/O").  For a target that has such
# contexts, the pages sent in the final round and in the last SETTLE_ROUNDS
# live rounds (a pin taken then may still be held) are re-read once the
# final delta is out and compared with what was sent; what changed is sent
# again, until a pass finds nothing, at most SETTLE_MAX_PASSES passes (then
# the migration fails: something keeps writing into the frozen target).
# Their digests cost 24 bytes a page, so at most SETTLE_MAX_PAGES pages
# (4 GiB) are re-checked: beyond that (a stop-and-copy of a larger target,
# or a live round that large among the last ones: the rounds after it are
# not digested while it is kept) the check is skipped with a warning.  Round 0 is never digested (its
# pages are all of memory; a pin held since then is older than the last
# rounds).
SETTLE_ROUNDS = 2
SETTLE_MAX_PASSES = 8
SETTLE_MAX_PAGES = 1 << 20
# How fast the settle re-reads and digests pages, for the policy's estimate
# of the freeze (one pass; the final delta's pages and the last live
# rounds'): 1 GiB took 611 ms on the development machine.  Without it a
# target that rewrote 1 GiB once and then idled froze for 630 ms against a
# 300 ms target (the re-check of that round); with it the policy takes the
# rounds that age such a round out of the re-check.
SETTLE_CHECK_BYTES_PER_S = 1.5e9

# How long we try to tell the peer why we stop before closing anyway.
GOODBYE_TIMEOUT_S = 2.0

# Capabilities this engine offers in Hello (the destination picks).
CAPABILITIES = ("zeros", "backlog", "final-figures")

# With "backlog" (the destination reports the page data it has not made
# durable yet, SPEC.md 7), before each collection: first its answer to our
# last RoundEnd (it comes once the destination has read the whole round),
# then, while its flush alone would take more than this share of the
# downtime target, its disk.  Waiting costs no downtime (the process runs
# on), while a flush still under way at the freeze must be finished by the
# commit.  (Session 5 chose 0.05 over 0.5 on bench_precopy figures that
# Nagle's 40 ms stalls turned out to blur; with TCP_NODELAY, session 6
# measured no difference: 256 MiB busy, freeze 51-65 against 52-61 ms and
# 0.1 s longer migrations; 512 MiB idle, 54-62 against 56-60 ms.)
BACKLOG_WAIT_SHARE = 0.05


@dataclass
class SendOptions:
    downtime_ms: int = 300
    max_rounds: int = 30
    max_bandwidth: float | None = None
    tracker: str = "auto"
    then: str = "stop"
    timeout_s: float = 600.0
    plateau_rounds: int = 3
    migration_id: str = ""
    node: str = ""
    # The target's start time when the request was checked (the daemon's
    # owner check): a PID reused since then is refused, not migrated.
    starttime: int | None = None


class MigrationAborted(MigratedError):
    """Internal: stop the migration with this status/code/message."""

    def __init__(self, status: str, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


class PeerError(MigratedError):
    """The destination sent Error or Cancel."""

    def __init__(self, code: str, message: str, cancelled: bool = False):
        super().__init__(message)
        self.code = code
        self.cancelled = cancelled


# -- helpers ---------------------------------------------------------------------

def new_migration_id() -> str:
    return uuid.uuid4().hex[:12]


def mapping_info(m) -> ev.MappingInfo:
    flags = 0
    if m.deleted:
        flags |= ev.MAP_FLAG_DELETED
    if m.path == "[heap]":
        flags |= ev.MAP_FLAG_HEAP
    if m.path == "[stack]" or m.path.startswith("[stack:"):
        flags |= ev.MAP_FLAG_STACK
    return ev.MappingInfo(m.start, m.end, m.perms, m.offset, m.path, m.kind, flags)


def split_zero_pages(runs: PageRuns, data: memoryview) -> tuple[PageRuns, PageRuns, memoryview]:
    """(zero_runs, data_runs, data_bytes) for a buffer holding ``runs``.

    Vectorised: first look at one word per page (a page whose first word is
    non-zero is not a zero page: nearly all of them, in one strided pass),
    then check only the candidates in full."""
    n = runs.total_pages()
    words = np.frombuffer(data, dtype=np.uint64, count=n * (PAGE_SIZE // 8)).reshape(n, PAGE_SIZE // 8)
    cand = np.flatnonzero(words[:, 0] == 0)
    if cand.size == 0:
        return PageRuns.empty(), runs, data
    zero_idx = cand[~words[cand].any(axis=1)]
    if zero_idx.size == 0:
        return PageRuns.empty(), runs, data
    if zero_idx.size == n:
        return runs, PageRuns.empty(), memoryview(b"")
    addrs = runs.page_addresses()
    zero_runs = PageRuns(addrs[zero_idx], np.ones(zero_idx.size, np.uint64))
    keep = np.ones(n, bool)
    keep[zero_idx] = False
    return zero_runs, runs.subtract(zero_runs), memoryview(words[keep]).cast("B")


def ramped_pieces(runs: PageRuns, first: int, most: int) -> Iterator[PageRuns]:
    """Consecutive pieces of ``runs`` in address order: ``first`` pages,
    then each piece twice the last, up to ``most`` pages a piece."""
    size, rest = first, runs
    while rest and size < most:
        head = next(rest.split(size))
        yield head
        rest = rest.subtract(head)
        size *= 2
    yield from rest.split(most)


def slice_runs(runs: PageRuns, max_runs: int) -> Iterator[PageRuns]:
    """Pieces of at most ``max_runs`` runs (for Zeros/Dropped messages)."""
    for i in range(0, len(runs), max_runs):
        yield PageRuns(runs.starts[i:i + max_runs], runs.counts[i:i + max_runs], normalized=True)


@dataclass
class _Prepared:
    """One buffer of pages, read and split, ready to be sent."""
    runs: PageRuns          # pages read (data + zero)
    failed: PageRuns        # pages that could not be read
    zero_runs: PageRuns
    data_runs: PageRuns
    data: memoryview        # bytes of data_runs, back to back


class _Pipeline:
    """Read, split and account chunks of ``runs`` -- with ``read_ahead``
    in a helper thread, ``len(readers)`` buffers ahead of the consumer,
    else in the consumer's own ``__next__`` calls.  A buffer is reused only
    after the consumer handed it back (its next ``__next__`` call).

    ``on_read(runs, data)`` is called by the reading thread with the exact
    bytes about to be sent (the tracker's ``sent``): if sending then fails,
    the whole migration fails, so confirming a moment early is safe."""

    _END = object()

    def __init__(self, readers: list[MemReader], runs: PageRuns, piece_pages: int,
                 on_read: Callable[[PageRuns, memoryview], None], *, read_ahead: bool = True):
        self.readers = readers
        self.on_read = on_read
        self._held = False
        if not read_ahead:
            # Read in the consumer's thread, one buffer at a time: the next
            # read happens in __next__, once the last item was sent.
            self.thread = None
            self._items = self._prepared(runs, piece_pages)
            return
        # SimpleQueues (C): per buffer, a put and a get each way, with no
        # Python-level Condition in between.  ``free`` holds one token per
        # buffer the producer may fill.
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in readers:
            self.free.put(None)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = Thread(
            target=self._produce, args=(runs, piece_pages), name="migrated-reader", daemon=True)
        self.thread.start()

    def _prepared(self, runs: PageRuns, piece_pages: int) -> Iterator[_Prepared]:
        """Read ``runs`` piece by piece (ramped_pieces), each into the next
        reader's buffer, and split and account each piece."""
        first = min(piece_pages, max(1, FIRST_READ_BYTES // PAGE_SIZE))
        for i, piece in enumerate(ramped_pieces(runs, first, piece_pages)):
            reader = self.readers[i % len(self.readers)]
            for chunk in reader.read(piece):   # one chunk: piece fits the buffer
                if chunk.runs:
                    zero_runs, data_runs, data = split_zero_pages(chunk.runs, chunk.data)
                    self.on_read(chunk.runs, chunk.data)
                else:
                    zero_runs, data_runs, data = chunk.runs, chunk.runs, memoryview(b"")
                yield _Prepared(chunk.runs, chunk.failed, zero_runs, data_runs, data)

    def _produce(self, runs: PageRuns, piece_pages: int) -> None:
        try:
            items = self._prepared(runs, piece_pages)
            while True:
                # A token per buffer: the one about to be read into was
                # handed back by the consumer.
                self.free.get()
                if self.stop.is_set():
                    return
                item = next(items, self._END)
                self.q.put(item)
                if item is self._END:
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            self.q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> _Prepared:
        if self.thread is None:
            return next(self._items)
        if self._held:
            self.free.put(None)
            self._held = False
        item = self.q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self._held = True
        return item

    def close(self) -> None:
        if self.thread is None:
            self._items.close()
            return
        self.stop.set()
        for _ in self.readers:
            self.free.put(None)
        self.thread.join()


@dataclass
class _RoundStats:
    round: int
    t0: float
    bytes0: int
    pages: int = 0
    zero_pages: int = 0
    dropped_pages: int = 0
    layout_sent: bool = False


class SourceMigration:
    def __init__(self, pid: int, options: SendOptions, transport: BlockingTransport, *,
                 on_event: Callable[[dict], None] = print,
                 on_freeze: Callable[[int, int], None] | None = None,
                 on_thaw: Callable[[int], None] | None = None,
                 on_release: Callable[[str, int], None] | None = None):
        if options.then not in THEN_CHOICES:
            raise ValueError(f"then must be one of {THEN_CHOICES}, not {options.then!r}")
        self.pid = pid
        self.options = options
        self.transport = transport
        self.on_event = on_event
        self.on_freeze = on_freeze
        self.on_thaw = on_thaw
        self.on_release = on_release
        self.migration_id = options.migration_id or new_migration_id()
        self.node = options.node or socket.gethostname() or "source"
        self.peer = transport.peer
        if options.max_bandwidth and transport.bucket is None:
            # --max-bandwidth given to the engine but not the transport.
            transport.bucket = TokenBucket(options.max_bandwidth)
        self.policy = ConvergencePolicy(
            downtime_ms=options.downtime_ms, max_rounds=options.max_rounds,
            plateau_rounds=options.plateau_rounds, timeout_s=options.timeout_s)
        self.channel = Channel(SourceConnection(), transport, NEED_DATA, _keepalives())
        self._cancel = CancelLatch(transport)
        self.rounds: list[dict] = []
        self.freezer: Freezer | None = None
        self.tracker = None
        self.tracker_name = ""
        self.max_batch = L.MAX_BATCH_PAGES
        self.pages_sent = 0
        self.zero_pages_sent = 0
        self._held = PageRuns.empty()      # pages the image holds so far
        self._carry = PageRuns.empty()     # pages a read failed on: retry
        self._sent_layout: KLayout | None = None
        self._last_layout: KLayout | None = None
        self._backlog_on = False           # the destination reports its backlog
        self._final_figures = False        # FinalEnd carries the frozen round's figures
        self._dest: ev.Backlog | None = None   # its latest report ...
        self._dest_at = 0.0                # ... and when it arrived (monotonic)
        self._on_read: Callable[[PageRuns, Any], None] | None = None   # else tracker.sent
        # Asynchronous I/O (SETTLE_*): why the target can have some (None:
        # it cannot), and per round sent (from round 1): (round, page
        # addresses, their digests as sent), in the order sent.
        self._async_io: str | None = None
        self._io_layout: KLayout | None = None     # the last layout looked at
        self._io_sent: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._io_sent_pages = 0
        self._io_partial: set[int] = set()     # rounds not all digested (SETTLE_MAX_PAGES)
        self._settling = False                 # in _settle: its resends are always digested
        self._round_now = 0
        self.settle_pages = 0
        self._settle_ms = 0.0
        self._collect_ms = 0.0             # the frozen collection (stop-and-copy: the scan)
        # The last live round until the destination's answer to its RoundEnd
        # says it was all read: (its figures, start, bytes); see _drained.
        self._undrained: tuple[dict, float, int] | None = None
        self.dest_wait_ms = 0.0            # waited for the destination's disk
        self.dest_reports = 0              # Backlog messages received
        self._frozen_at: float | None = None
        self._freeze_wait_ms = 0.0
        self.freeze_breakdown: dict | None = None
        self._readers: list[MemReader] = []
        self._keepalive_seq = 0
        # Image id named in a Release we sent and whose Released has not
        # come: a failure now leaves the outcome in doubt.
        self._released_pending: str | None = None

    # -- public ----------------------------------------------------------------------

    def cancel(self, reason: str = "cancelled by operator") -> None:
        """Thread-safe: stop at the next batch; the transport is shut down
        after CANCEL_GRACE_S if the worker is blocked."""
        self._cancel.cancel(reason)

    def run(self) -> dict:
        t0 = time.perf_counter()
        result: dict[str, Any] = {
            "status": "failed", "migration_id": self.migration_id, "pid": self.pid,
            "peer": self.peer, "image_id": None, "digest": None, "tracker": None,
            "rounds": self.rounds, "freeze_ms": None, "total_ms": None, "bytes_sent": 0,
            "downtime_ms": self.options.downtime_ms, "then": self.options.then,
            "stop_reason": None,
        }
        self._emit({"event": "start", "pid": self.pid, "peer": self.peer,
                    "options": asdict(self.options) | {"migration_id": self.migration_id}})
        try:
            image_id, digest, freeze_ms = self._migrate()
            result.update(status="completed", image_id=image_id, digest=digest,
                          freeze_ms=round(freeze_ms, 3), freeze_breakdown=self.freeze_breakdown)
            # Committed: the migration succeeded whatever happens next.
            try:
                self._apply_then()
                if self.options.then == "resume" and self.freezer is not None \
                        and self.freezer.was_stopped:
                    result["then_note"] = (
                        f"PID {self.pid} was stopped before the final freeze, not by us, "
                        "so it stays stopped: send it SIGCONT if it should run")
            except Exception as e:  # noqa: BLE001 -- reported, not a failure
                result["then_error"] = f"applying --then {self.options.then} to PID {self.pid}: {e}"
                log.exception("migration %s: %s", self.migration_id, result["then_error"])
        except BaseException as e:  # noqa: BLE001 -- every failure becomes a summary
            if isinstance(e, TransportError) and not isinstance(e, TransportTimeout):
                # The link broke: the destination may have said why first
                # (a cancel as its daemon shuts down, an error) -- that is
                # the news, not "Broken pipe".
                e = self._peer_said() or e
            status, code, message = self._classify(e)
            thawed = self._thaw_after_failure()
            result.update(status=status, error=self._human(status, code, message, thawed),
                          error_code=code)
            if self._released_pending is not None:
                result["in_doubt_image_id"] = self._released_pending
            say_goodbye(self.channel, status, code, message, e, GOODBYE_TIMEOUT_S)
            if not isinstance(e, (MigratedError, OSError, ProtocolError)):
                log.exception("migration %s of PID %d: unexpected error", self.migration_id, self.pid)
        finally:
            self._cleanup()
        result.update(
            tracker=self.tracker_name or None,
            total_ms=round((time.perf_counter() - t0) * 1000.0, 3),
            bytes_sent=self.transport.bytes_sent,
            stop_reason=self.policy.stop_reason,
            expected_downtime_ms=(None if self.policy.stop_reason == STOP_AND_COPY
                                  else round(self.policy.expected_downtime_ms, 3)),
            pages_sent=self.pages_sent, zero_pages=self.zero_pages_sent,
            dest_wait_ms=round(self.dest_wait_ms, 3), dest_reports=self.dest_reports,
            dest_backlog=None if self._dest is None else {
                "round": self._dest.round, "unflushed": self._dest.unflushed,
                "flush_ms": round(self._dest.flush_ms, 3)})
        self._emit({"event": "end", **{k: v for k, v in result.items() if k != "rounds"}})
        return result

    # -- the migration -----------------------------------------------------------------

    def _migrate(self) -> tuple[str, str, float]:
        opts = self.options
        self.freezer = Freezer(self.pid, on_freeze=self.on_freeze, on_thaw=self.on_thaw,
                               starttime=opts.starttime)
        self.tracker = make_tracker(opts.tracker, self.pid, self.freezer)
        self.tracker_name = self.tracker.name
        # Module doc at READ_BUFFER_BYTES.
        self._read_ahead = self.transport.is_ssl
        size = READ_BUFFER_BYTES if self._read_ahead else INLINE_READ_BYTES
        self._readers = [MemReader(self.pid, buffer_bytes=size) for _ in range(PIPELINE_DEPTH)]

        # Memory nobody can read fails now, before anything is sent (and
        # again at the freeze, in case it was mapped since).
        self._check_no_secret_memory(self._read_layout())
        self._handshake_hello()
        decision = self.policy.begin()
        stop_and_copy = decision.stop
        if stop_and_copy:
            # Start (the destination's quota and space checks) before the
            # freeze, on the size the process has now: not inside it.
            with pm.Pagemap(self.pid) as pmap:
                self._handshake_start(pmap.present_in(self._read_layout()).total_bytes())
            self._watch_async_io(self._read_layout(), fds=True)
            self._freeze()
        layout = self._read_layout()
        t_armed = time.perf_counter()      # the tracker records writes from here on
        if stop_and_copy:
            # Frozen already: nothing will be written, so no tracker is
            # armed (arming uffd-wp write-protects every page: 17-25 ms of
            # the freeze spent on nothing).  The present pages, as every
            # tracker counts them (pagemap: present or swapped).
            with pm.Pagemap(self.pid) as pmap:
                present = pmap.present_in(layout)
            self._on_read = _nothing_to_track
        else:
            armed = self.tracker.start(layout)
            present, start_pause_ms = armed.dirty, armed.pause_ms
            self._watch_async_io(layout, fds=True)
            self._handshake_start(present.total_bytes())
        self.channel.start_keepalive(L.KEEPALIVE_INTERVAL_S)
        if stop_and_copy:
            # Its collection: from the freeze to here (layout, scan).
            self._collect_ms = (time.perf_counter() - self._frozen_at) * 1000.0 \
                - self._freeze_wait_ms

        rnd = 0
        t_last_collect = time.perf_counter()
        wait_ms = 0.0              # for the destination's disk, before a collection
        if stop_and_copy:
            pending = present
            pending_dropped = PageRuns.empty()
        else:
            # Round 0's pause: arming soft-dirty stops the target to read
            # and clear the bits, like every collect after it.
            self._send_round(rnd, layout, present, PageRuns.empty(), pause_ms=start_pause_ms,
                             dirty_rate=0.0, t_collect=t_last_collect)
            # The first collection reports every write since the tracker
            # started, round 0's included: its rate is over that time.
            t_last_collect = t_armed
            while True:
                rnd += 1
                wait_ms = self._wait_for_destination(rnd - 1) if self._backlog_on else 0.0
                t_collect = time.perf_counter()
                layout = self._read_layout()
                got = self.tracker.collect(layout)
                now = time.perf_counter()
                collect_ms = (now - t_collect) * 1000.0
                self._watch_async_io(layout)
                dirty = got.dirty
                dirty_rate = dirty.total_bytes() / max(now - t_last_collect, 1e-6)
                t_last_collect = now
                pending_pages = dirty.union(self._carry).total_pages()
                d = self.policy.after_collect(pending_pages, fixed_ms=collect_ms,
                                              dest_ms=self._dest_flush_ms(),
                                              settle_ms=self._settle_estimate_ms(pending_pages))
                if d.fail:
                    raise MigrationAborted("failed", "timeout", self._timeout_message(d))
                if d.stop:
                    pending, pending_dropped = dirty, got.dropped
                    break
                self._send_round(rnd, layout, dirty, got.dropped, pause_ms=got.pause_ms,
                                 dirty_rate=dirty_rate, t_collect=t_collect,
                                 expected_ms=d.expected_downtime_ms, wait_ms=wait_ms)
            self._freeze()

        # -- frozen: the final delta --------------------------------------------------
        # From here on no thread of the target may run (_check_still_frozen).
        self.freezer.mark_quiescent()
        t_final = time.perf_counter()
        layout = self._read_layout()
        self._check_no_secret_memory(layout)
        self._check_no_hidden_data(layout)
        self._watch_async_io(layout)        # (its fds at the start only: not in the freeze)
        final_rate = 0.0
        if stop_and_copy:
            final_dirty, final_dropped, pause = PageRuns.empty(), PageRuns.empty(), 0.0
        else:
            got = self.tracker.collect(layout)
            final_dirty, final_dropped, pause = got.dirty, got.dropped, got.pause_ms
            # The tracker reports again what the last collection found and
            # pre-copy did not send (``pending``): those writes were counted
            # in that collection's rate.  The rate since is of what is new
            # (a pending page written again in these few ms is not counted).
            fresh = final_dirty.subtract(pending)
            final_rate = fresh.total_bytes() / max(t_final - t_last_collect, 1e-6)
        t_sent_final = time.perf_counter()
        dirty = pending.subtract(final_dropped).union(final_dirty)
        dropped = pending_dropped.union(final_dropped).subtract(dirty)
        self._emit({"event": "freeze", "round": rnd, "stop_reason": self.policy.stop_reason,
                    # (stop-and-copy estimates nothing: it never measured the link)
                    "expected_downtime_ms": (None if stop_and_copy else
                                             round(self.policy.expected_downtime_ms, 3)),
                    "dest_flush_ms": round(self._dest_flush_ms(), 3),
                    "pending_pages": dirty.total_pages(),
                    "freeze_wait_ms": round(self._freeze_wait_ms, 3)})
        self.channel.send_event(ev.Freeze(rnd))
        self._send_round(rnd, layout, dirty, dropped, pause_ms=pause,
                         dirty_rate=final_rate, t_collect=t_final, final=True,
                         expected_ms=None if stop_and_copy else self.policy.expected_downtime_ms,
                         wait_ms=wait_ms)
        self._check_still_frozen("while its final delta was read")
        self.channel.send_event(
            ev.FinalEnd(rnd, self.pages_sent, round(final_rate, 1), round(pause, 3))
            if self._final_figures else ev.FinalEnd(rnd, self.pages_sent))
        self.channel.send_event(ev.CommitRequest(self._held.total_pages()))
        t_commit = time.perf_counter()
        reply = self._wait(L.COMMIT_TIMEOUT_S, "the commit acknowledgement", ev.Committed)
        t_prepared = time.perf_counter()
        # Three-way commit: the image is durable but staged at the
        # destination; ask it to publish and wait for the confirmation.
        # Until Released the target stays frozen (freeze_ms counts it).
        self._check_abort(False)
        self._check_still_frozen("while the destination committed its image")
        if self.on_release is not None:
            # Durably noted first (the daemon's in-doubt record): if we fail
            # or die after this, the image gets withdrawn (SPEC.md 9.2).
            self.on_release(reply.image_id, self.freezer.starttime)
        self._released_pending = reply.image_id
        self.channel.send_event(ev.Release(reply.image_id))
        self._wait(L.COMMIT_TIMEOUT_S, f"Released for image {reply.image_id}", ev.Released)
        self._released_pending = None
        t_done = time.perf_counter()
        freeze_ms = (t_done - self._frozen_at) * 1000.0
        # Where the freeze went (stop, final collection, final delta, commit).
        self.freeze_breakdown = {
            "stop_ms": round(self._freeze_wait_ms, 3),
            "collect_ms": round((t_sent_final - t_final) * 1000.0 + self._collect_ms, 3),
            "delta_ms": round((t_commit - t_sent_final - self._settle_ms / 1000.0) * 1000.0, 3),
            # re-checking recent pages for asynchronous I/O (SETTLE_*)
            "settle_ms": round(self._settle_ms, 3),
            "commit_ms": round((t_prepared - t_commit) * 1000.0, 3),
            "release_ms": round((t_done - t_prepared) * 1000.0, 3)}
        self.channel.stop_keepalive()
        self._emit({"event": "commit", "image_id": reply.image_id, "digest": reply.digest,
                    "freeze_ms": round(freeze_ms, 3), "then": self.options.then,
                    **self.freeze_breakdown, "settle_pages": self.settle_pages})
        return reply.image_id, reply.digest, freeze_ms

    def _read_layout(self) -> KLayout:
        """The target's layout now; the last one read if its maps are
        unchanged (most rounds: no parsing then)."""
        self._last_layout = read_layout(self.pid, self._last_layout)
        return self._last_layout

    # -- handshake -----------------------------------------------------------------------

    def _handshake_hello(self) -> None:
        self.channel.send_event(ev.Hello(L.SUPPORTED_VERSIONS, self.node, CAPABILITIES,
                                         self.migration_id))
        try:
            welcome = self._wait(L.HANDSHAKE_TIMEOUT_S, "the handshake (Welcome)", ev.Welcome)
        except TransportError as e:
            if self.transport.is_ssl or isinstance(e, TransportTimeout):
                raise
            # A destination with TLS drops our plaintext preamble at once.
            raise type(e)(e.peer, f"{e} (before the handshake: if the destination runs "
                                  "with TLS, this daemon must not run with --insecure -- "
                                  "run both daemons with TLS, or both with --insecure)") from e
        self.peer_node = welcome.node
        self._backlog_on = "backlog" in welcome.capabilities
        self._final_figures = "final-figures" in welcome.capabilities

    def _handshake_start(self, estimated: int) -> None:
        try:
            cmdline = procfs.read_cmdline(self.pid)
            exe = procfs.read_exe(self.pid)
        except MigratedError:
            raise
        cmdline = _fit_cmdline(cmdline, L.MAX_CMDLINE_BYTES)
        o = self.options
        options = {"downtime_ms": int(o.downtime_ms), "max_rounds": int(o.max_rounds),
                   "then": o.then, "timeout_s": float(o.timeout_s),
                   "source_node": self.node}
        self.channel.send_event(ev.Start(self.pid, tuple(cmdline), exe, PAGE_SIZE,
                                         self.tracker_name, int(estimated), options))
        accept = self._wait(L.HANDSHAKE_TIMEOUT_S, "the destination's Accept", ev.Accept)
        self.max_batch = min(accept.max_batch_pages, L.MAX_BATCH_PAGES,
                             L.MAX_BATCH_BYTES // PAGE_SIZE)
        bucket = self.transport.bucket
        if bucket is not None:
            # A batch is the grain at which --timeout is seen (_stream_pages):
            # under a cap, about BATCH_GRAIN_S of it.  At 128K a 4 MiB batch
            # took 32 s, and --timeout 5 gave up after 12 s.
            self.max_batch = max(1, min(self.max_batch,
                                        int(bucket.rate * BATCH_GRAIN_S) // PAGE_SIZE))

    # -- rounds --------------------------------------------------------------------------

    def _send_round(self, rnd: int, layout: KLayout, dirty: PageRuns, dropped: PageRuns, *,
                    pause_ms: float, dirty_rate: float, t_collect: float,
                    final: bool = False, expected_ms: float | None = None,
                    wait_ms: float = 0.0) -> None:
        # The round's figures are timed from here: the cap holds from here.
        self.transport.restart_pacing()
        self._round_now = rnd
        st = _RoundStats(rnd, time.perf_counter(), self.transport.bytes_sent)
        ch = self.channel
        if layout != self._sent_layout:
            ch.send_event(ev.Layout(rnd, tuple(mapping_info(m) for m in layout)))
            self._sent_layout = layout
            st.layout_sent = True
        area = layout.runs()
        # Pages a read failed on last round are re-read if still mapped.
        todo = dirty.union(self._carry).intersect(area)
        self._carry = PageRuns.empty()
        dropped = dropped.intersect(area).subtract(todo)
        # Held pages outside the new layout are gone with their mappings.
        self._held = self._held.intersect(area)
        if dropped:
            for piece in slice_runs(dropped, L.MAX_RUNS):
                ch.send_event(ev.Dropped(rnd, piece))
            st.dropped_pages = dropped.total_pages()
            self._held = self._held.subtract(dropped)
        failed = self._stream_pages(rnd, todo, st, live=not final)
        if failed:
            if final:
                raise self._unreadable_while_frozen(failed)
            self._carry = failed
        if final and self._async_io:
            self._settle(rnd, todo, area, st)
        elif self._async_io and rnd:
            self._forget_old_rounds(rnd)
        now = time.perf_counter()
        send_s = now - st.t0
        nbytes = self.transport.bytes_sent - st.bytes0
        bandwidth = nbytes / max(send_s, 1e-6)
        if not final:
            self.policy.round_sent(nbytes, send_s, round_seconds=now - t_collect,
                                   pages=st.pages + st.zero_pages)
            ch.send_event(ev.RoundEnd(rnd, st.pages, nbytes, send_s * 1000.0,
                                      float(dirty_rate), float(bandwidth), float(pause_ms)))
        fig = {"round": rnd, "pages": st.pages + st.zero_pages, "bytes": nbytes,
               "duration_ms": round(send_s * 1000.0, 3), "dirty_rate": round(dirty_rate, 1),
               "bandwidth": round(bandwidth, 1), "pause_ms": round(float(pause_ms), 3),
               "data_pages": st.pages, "zero_pages": st.zero_pages,
               "dropped_pages": st.dropped_pages, "layout": st.layout_sent,
               "final": final,
               # the estimate from the collection that produced this round
               "expected_downtime_ms": None if expected_ms is None else round(expected_ms, 3),
               # waited for the destination's disk before that collection
               "dest_wait_ms": round(wait_ms, 3)}
        self.rounds.append(fig)
        if not final and self._backlog_on:
            # Its figures are complete once the link delivered it (_drained).
            self._undrained = (fig, st.t0, nbytes)
        else:
            self._emit({"event": "round", **fig})

    # -- asynchronous I/O (SETTLE_*) ---------------------------------------------------

    def _watch_async_io(self, layout: KLayout, fds: bool = False) -> None:
        """Note whether the target can have asynchronous I/O in flight:
        its mappings each round; its fds (a ring with no mapping:
        IORING_SETUP_NO_MMAP) where ``fds`` -- at the start: one readlink
        per fd is not spent inside the freeze."""
        if self._async_io or (layout is self._io_layout and not fds):
            return              # (an unchanged layout is the same object: _read_layout)
        self._io_layout = layout
        self._async_io = pins.async_io_in(layout)
        if not self._async_io and fds and pins.has_io_uring_fd(self.pid):
            self._async_io = "an io_uring"
        if self._async_io:
            log.info("migration %s: PID %d has %s: the pages of the last rounds are "
                     "re-checked after the final delta", self.migration_id, self.pid,
                     self._async_io)

    def _settle_estimate_ms(self, pending_pages: int) -> float:
        """What the settle's first pass would add to the freeze if it began
        now: the last live rounds' pages (kept in ``_io_sent``) and the
        final delta's, at SETTLE_CHECK_BYTES_PER_S; 0 without asynchronous
        I/O or past the budget (then the settle is skipped)."""
        if not self._async_io or self._io_sent_pages > SETTLE_MAX_PAGES:
            return 0.0
        return (self._io_sent_pages + pending_pages) * PAGE_SIZE / SETTLE_CHECK_BYTES_PER_S * 1000.0

    def _sent_hook(self, runs: PageRuns, data) -> None:
        """Every buffer read to be sent: the tracker's ``sent``, and the
        page digests the settle compares with (from round 1, or the frozen
        round of a stop-and-copy)."""
        (self._on_read or self.tracker.sent)(runs, data)
        if not (self._async_io and runs and (self._round_now or self._frozen_at is not None)):
            return
        if self._io_sent_pages > SETTLE_MAX_PAGES and not self._settling:
            # A round re-checked without these pages would pass them over
            # silently: the settle is skipped, saying so, while it counts.
            self._io_partial.add(self._round_now)
        else:
            self._io_sent.append((self._round_now, runs.page_addresses(),
                                  page_digests(memoryview(data)[:runs.total_pages() * PAGE_SIZE])))
            self._io_sent_pages += runs.total_pages()

    def _forget_old_rounds(self, rnd: int) -> None:
        """Keep the digests of the last SETTLE_ROUNDS live rounds only."""
        self._io_sent = [x for x in self._io_sent if x[0] > rnd - SETTLE_ROUNDS]
        self._io_sent_pages = sum(a.size for _, a, _ in self._io_sent)
        self._io_partial = {r for r in self._io_partial if r > rnd - SETTLE_ROUNDS}

    def _settle(self, rnd: int, final: PageRuns, area: PageRuns, st: "_RoundStats") -> None:
        """Re-read the pages of the last live rounds and the final one, now
        that the final delta is out, and send again what changed since it
        was sent: asynchronous I/O landing while the target is frozen."""
        t0 = time.perf_counter()
        # (only pages the image holds: not those dropped since they were sent)
        recent = PageRuns.concat([runs_from_addrs(a) for _, a, _ in self._io_sent]
                                 + [final]).intersect(area).intersect(self._held)
        if recent.total_pages() > SETTLE_MAX_PAGES or self._io_partial:
            log.warning("migration %s: PID %d has %s; the pages sent in its last rounds "
                        "(%d, and those of rounds %s past the budget) are more than the %d "
                        "re-checked after the freeze: I/O completing after the final collect "
                        "may be missing from the image", self.migration_id, self.pid,
                        self._async_io, recent.total_pages(), sorted(self._io_partial) or "none",
                        SETTLE_MAX_PAGES)
            return
        for _ in range(SETTLE_MAX_PASSES):
            changed, _ = content_changed(self._readers[0], self._sent_digests(), recent)
            if not changed:
                break
            # (_stream_pages adds its stats' pages to pages_sent: fresh ones)
            again = _RoundStats(rnd, time.perf_counter(), self.transport.bytes_sent)
            # Its resends are digested whatever the budget (else the next
            # pass compares with an older send: "changed" for good), then
            # the records are folded to one per page: at most ``recent``.
            self._settling = True
            try:
                failed = self._stream_pages(rnd, changed, again, live=False)
            finally:
                self._settling = False
            addrs, digs = self._sent_arrays()
            self._io_sent = [(rnd, addrs, digs)]
            self._io_sent_pages = addrs.size
            st.pages += again.pages
            st.zero_pages += again.zero_pages
            if failed:
                raise self._unreadable_while_frozen(failed)
            self.settle_pages += changed.total_pages()
        else:
            # Shared memory another process keeps writing has no moment the
            # image could match: what was sent last stands, as without the
            # re-check.  Private memory changing while frozen is I/O.
            if not changed.subtract(self._shared_runs()):
                log.warning("migration %s: %d page(s) of shared memory of PID %d kept "
                            "changing while it was frozen (another process writes them); "
                            "the image holds them as last sent", self.migration_id,
                            changed.total_pages(), self.pid)
                self._settle_ms = (time.perf_counter() - t0) * 1000.0
                return
            raise MigrationAborted(
                "failed", "internal",
                f"the memory of PID {self.pid} kept changing while it was frozen "
                f"({changed.total_pages()} page(s) in the last of {SETTLE_MAX_PASSES} "
                f"checks): {self._async_io} is still writing into it -- retry when its "
                "I/O is idle")
        self._settle_ms = (time.perf_counter() - t0) * 1000.0

    def _unreadable_while_frozen(self, failed: PageRuns) -> MigrationAborted:
        a, n = failed.pairs()[0]
        return MigrationAborted(
            "failed", "internal",
            f"{failed.total_pages()} page(s) of PID {self.pid} could not be read "
            f"while it was frozen (first at {a:#x}, {n} pages): a mapping is not "
            "readable with process_vm_readv; the image would not be exact")

    def _shared_runs(self) -> PageRuns:
        return shared_anon_runs(self._last_layout) if self._last_layout else PageRuns.empty()

    def _sent_digests(self) -> PageDigests:
        """The digests of the pages as last sent (later sends win)."""
        out = PageDigests()
        if self._io_sent:
            out.update(*self._sent_arrays())
        return out

    def _sent_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(page addresses, their digests as last sent), one per page."""
        addrs = np.concatenate([a for _, a, _ in self._io_sent])
        digs = np.concatenate([d for _, _, d in self._io_sent])
        # np.unique keeps the first of equal keys: reverse, so the last sent wins.
        uniq, first = np.unique(addrs[::-1], return_index=True)
        return uniq, digs[::-1][first]

    def _drained(self, answered: bool) -> None:
        """The destination's answer to the last RoundEnd came (``answered``)
        or was not waited for: finish that round's figures and report it.

        Sending returns once the bytes are in the kernel's buffers -- on a
        slow link most of a small round still waits there (and in a shaped
        link's queue) when the last send returns.  Timed to its answer, the
        round is timed to what the link delivered: the bandwidth the policy
        estimates the final delta with, and the one operators read (timed
        to the last send, rounds over a 1 MiB/s link showed 300-600 MiB/s
        and the freeze missed a 300 ms target by 3x)."""
        if self._undrained is None:
            return
        fig, t0, nbytes = self._undrained
        self._undrained = None
        if answered:
            took = max(time.perf_counter() - t0, 1e-6)
            fig["send_ms"] = fig["duration_ms"]
            fig["duration_ms"] = round(took * 1000.0, 3)
            fig["bandwidth"] = round(nbytes / took, 1)
            self.policy.round_drained(took)
        self._emit({"event": "round", **fig})

    def _stream_pages(self, rnd: int, runs: PageRuns, st: _RoundStats, live: bool) -> PageRuns:
        """Read and send ``runs``; returns the pages that could not be read."""
        if not runs:
            return PageRuns.empty()
        ch = self.channel
        failed: list[PageRuns] = []
        sent: list[PageRuns] = []
        # Module doc at READ_BUFFER_BYTES.
        inline = (not self._read_ahead and live
                  and runs.total_pages() * PAGE_SIZE >= INLINE_MIN_ROUND_BYTES)
        pipe = _Pipeline(self._readers, runs, self._readers[0].buffer_pages,
                         self._sent_hook, read_ahead=not inline)
        try:
            for item in pipe:
                self._check_abort(live)
                if item.failed:
                    failed.append(item.failed)
                if item.zero_runs:
                    for piece in slice_runs(item.zero_runs, L.MAX_RUNS):
                        ch.send_event(ev.Zeros(rnd, piece))
                    st.zero_pages += item.zero_runs.total_pages()
                off = 0
                data = item.data
                for k, piece in enumerate(item.data_runs.split(self.max_batch)):
                    if k:
                        # A buffer holds several batches, and one batch
                        # takes seconds on a slow or capped link: a cancel
                        # or the timeout is seen batch by batch.
                        self._check_stop(live)
                    nb = piece.total_pages() * PAGE_SIZE
                    ch.send_event(ev.Pages.build(rnd, piece, data[off:off + nb]))
                    off += nb
                st.pages += item.data_runs.total_pages()
                if item.runs:
                    sent.append(item.runs)
        finally:
            pipe.close()
            if sent:
                self._held = self._held.union(PageRuns.concat(sent))
        self.pages_sent += st.pages
        self.zero_pages_sent += st.zero_pages
        return PageRuns.concat(failed) if failed else PageRuns.empty()

    def _check_abort(self, live: bool) -> None:
        """Between read buffers: a cancel, the timeout, or a message from
        the destination (an error ends the migration)."""
        self._check_stop(live)
        got = self.channel.poll_event()
        # At most NOTED_PER_CHECK messages that need no answer (keepalives,
        # backlog reports) per check: the rest wait for the next buffer.
        # Unbounded, a peer flooding keepalives held us here -- sending
        # nothing, past the timeout, or with the target frozen.
        for _ in range(NOTED_PER_CHECK):
            if got is self.channel.need_data or not self._noted(got):
                break
            got = self.channel.poll_event()
        if got is not self.channel.need_data and not self._noted(got):
            self._unexpected(got, "while sending pages")

    def _check_stop(self, live: bool) -> None:
        """A cancel or the timeout (no I/O: cheap enough for every batch)."""
        if self._cancel.reason is not None:
            raise MigrationAborted("cancelled", "cancelled", self._cancel.reason)
        if live and self.policy.expired():
            raise MigrationAborted("failed", "timeout",
                                   f"{TIMEOUT_MESSAGE} ({self.options.timeout_s:g} s): "
                                   "the timeout ran out during a live round")

    # -- the destination's backlog ("backlog" capability) ----------------------------

    def _noted(self, got) -> bool:
        """Keepalives and backlog reports: noted, nothing to answer."""
        if isinstance(got, ev.Backlog):
            self._dest, self._dest_at = got, time.monotonic()
            self.dest_reports += 1
            return True
        return isinstance(got, ev.Keepalive)

    def _dest_flush_ms(self) -> float:
        """The destination's latest estimate of its flush time, less the
        time since it came (0 without reports)."""
        b = self._dest
        if b is None:
            return 0.0
        return max(0.0, b.flush_ms - (time.monotonic() - self._dest_at) * 1000.0)

    def _wait_for_destination(self, last_round: int) -> float:
        """Before a collection: take the destination's answer to our last
        RoundEnd -- on a slow link that means until the link drained the
        round; at most the peer's idle timeout -- then, while its flush
        alone would take more than BACKLOG_WAIT_SHARE of the downtime
        target, wait for its disk.  The process runs on meanwhile; what it
        dirties goes in the next round.  Never past the timeout budget.
        Returns the milliseconds spent waiting."""
        t0 = time.monotonic()
        reply_by = t0 + min(self.transport.timeout,
                            self.policy.timeout_s - self.policy.elapsed())
        share = self.options.downtime_ms * BACKLOG_WAIT_SHARE
        t_answer = None
        try:
            while True:
                if self._cancel.reason is not None:
                    raise MigrationAborted("cancelled", "cancelled", self._cancel.reason)
                now = time.monotonic()
                if self._dest is None or self._dest.round < last_round:
                    left = reply_by - now            # its answer is not here yet
                else:
                    if t_answer is None:
                        t_answer = now               # the round is on the far side
                        self._drained(True)
                    flush_s = self._dest_flush_ms() / 1000.0
                    budget_s = self.policy.timeout_s - self.policy.elapsed()
                    if flush_s * 1000.0 <= share or flush_s >= budget_s:
                        break                        # small enough, or cannot be waited out
                    left = flush_s
                if left <= 0:
                    break
                got = self.channel.poll_event()
                if got is self.channel.need_data:
                    # Wait for bytes without blocking in a read (the socket's own
                    # timeout is far longer than this wait).
                    self.transport.wait_readable(min(left, 1.0))
                    got = self.channel.poll_event()
                    if got is self.channel.need_data:
                        continue
                if not self._noted(got):
                    self._unexpected(got, "while waiting for the destination's disk")
        finally:
            self._drained(False)                 # (no answer in time: figures as sent)
        # The wait for the destination's disk: from its answer on (before
        # it, the round was still on its way -- part of the round's time).
        waited = (time.monotonic() - (t0 if t_answer is None else t_answer)) * 1000.0
        self.dest_wait_ms += waited
        return waited

    # -- freezing ---------------------------------------------------------------------

    def _freeze(self) -> None:
        assert self.freezer is not None
        self._check_abort(False)
        # Just before the freeze, outside its time: nothing else shares the
        # address space that SIGSTOP would not stop.
        self.freezer.check_alone()
        self._frozen_at = time.perf_counter()
        self._freeze_wait_ms = self.freezer.freeze(FREEZE_TIMEOUT_S)

    def _check_no_secret_memory(self, layout: KLayout) -> None:
        """Fail if the target maps memfd_secret(2) memory: no one outside
        the process can read it, and taken for a shared file (recorded, not
        copied) the image had nothing of it while the migration
        "completed"."""
        secret = [m for m in layout if m.secret]
        if secret:
            m = secret[0]
            raise MigrationAborted(
                "failed", "internal",
                f"PID {self.pid} maps {len(secret)} region(s) of memfd_secret memory (first "
                f"{m.start:#x}-{m.end:#x}, {m.npages} pages): the kernel lets no other "
                "process read it, so it cannot be migrated; release it (munmap) in the "
                "process, or do not migrate this process")

    def _check_no_hidden_data(self, layout: KLayout) -> None:
        """Fail (frozen, before anything is sent) if a private mapping
        without access rights holds data: such mappings are not migrated
        (guard pages, reservations -- nothing to read there), but one that
        a GC, JIT or sanitizer protected with its data in it would be
        zeros in the image, which would still have been "completed"."""
        hidden = [m for m in layout if m.perms[:3] == "---" and m.perms[3] == "p"
                  and not m.migrates]
        # The same for shared memory (memfd, MAP_SHARED anonymous, SysV):
        # its data is in the object, mapped here or not.
        for m in layout:
            if m.perms[:3] == "---" and m.shared_memory and \
                    shared_window_has_data(self.pid, m):
                raise MigrationAborted(
                    "failed", "internal",
                    f"PID {self.pid} holds data in shared memory mapped with no access "
                    f"rights ({m.start:#x}-{m.end:#x} {m.perms} {m.path or '[anon]'}): it is "
                    "not migrated, so the image would not be exact; migrate it when that "
                    "memory is accessible again")
        if not hidden:
            return
        with pm.Pagemap(self.pid) as pmap:
            for m in hidden:
                if pmap.has_scan:
                    got = pmap.present_runs_scan((m.start, m.end))   # file pages left out
                elif m.size <= NO_ACCESS_SCAN_MAX_BYTES:
                    got = pmap.present_runs((m.start, m.end))
                else:
                    continue    # no PAGEMAP_SCAN: a huge reservation is not read page by page
                if got:
                    raise MigrationAborted(
                        "failed", "internal",
                        f"PID {self.pid} holds {got.total_pages()} page(s) of data in a "
                        f"mapping with no access rights ({m.start:#x}-{m.end:#x} {m.perms} "
                        f"{m.path or '[anon]'}): they cannot be read, so the image would "
                        "not be exact; migrate it when that memory is accessible again")

    def _check_still_frozen(self, when: str) -> None:
        """Fail if the target runs again behind our back (a SIGCONT from a
        shell's job control, a supervisor, an operator): its memory may
        have changed after the final collection, so the image would not be
        exact, and once published two copies would run."""
        if not self.freezer.still_frozen():
            raise MigrationAborted(
                "failed", "internal",
                f"PID {self.pid} was resumed by another process (SIGCONT) {when}: the "
                "image would not match its memory, so nothing is published; find what "
                "sends it SIGCONT (job control, a supervisor) and retry")

    def _apply_then(self) -> None:
        fz = self.freezer
        assert fz is not None
        then = self.options.then
        if then == "resume":
            fz.thaw()
        elif then == "kill":
            try:
                signal.pidfd_send_signal(fz.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            fz.thaw()   # clears our freeze state and the journal entry
        else:
            _keep_stopped(fz)

    def _thaw_after_failure(self) -> bool:
        fz = self.freezer
        if fz is None:
            return False
        try:
            return bool(fz.thaw())
        except Exception:  # noqa: BLE001 -- reported in the summary text
            log.exception("thawing PID %d failed", self.pid)
            return False

    # -- waiting for the peer ----------------------------------------------------------

    def _wait(self, timeout: float, what: str, want: type):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                # Past the deadline (we may have been stopped): take what is
                # already here before giving up -- an answer that arrived
                # while we could not read it still counts.  For a grace of
                # PAST_DEADLINE_DRAIN_S at most: a peer that floods
                # keepalives would otherwise never let the socket run dry,
                # and keep a frozen target frozen for as long as it likes.
                got = self.channel.poll_event()
                if isinstance(got, want):
                    return got
                if got is not self.channel.need_data and not self._noted(got):
                    self._unexpected(got, f"while waiting for {what}")
                if got is self.channel.need_data \
                        or time.monotonic() > deadline + PAST_DEADLINE_DRAIN_S:
                    raise TransportTimeout(self.peer, f"{self.peer} did not send {what} "
                                                      f"within {timeout:g} s")
                continue
            if self._cancel.reason is not None:
                raise MigrationAborted("cancelled", "cancelled", self._cancel.reason)
            try:
                got = self.channel.next_event(left)
            except WaitExpired:
                continue        # past the deadline: the branch above says what was missed
            if isinstance(got, want):
                return got
            if self._noted(got):
                continue
            self._unexpected(got, f"while waiting for {what}")

    def _unexpected(self, got, when: str) -> None:
        if self._noted(got):
            return
        if isinstance(got, ev.Error):
            # A code we do not know counts as internal (SPEC.md 13); the
            # peer's own code stays in the message.
            raise PeerError(got.known_code, f"the destination {self.peer} reported an error "
                                            f"({got.code}): {got.message}")
        if isinstance(got, ev.Cancel):
            raise PeerError("cancelled", f"the destination {self.peer} cancelled the "
                                         f"migration: {got.reason}", cancelled=True)
        if isinstance(got, ev.ConnectionClosed):
            raise PeerClosed(self.peer, f"{self.peer} closed the connection {when}")
        raise ProtocolError("out-of-state", f"unexpected {type(got).__name__} from "
                                            f"{self.peer} {when}")

    # -- failure handling ---------------------------------------------------------------

    def _peer_said(self) -> PeerError | None:
        """An Error or Cancel from the destination already in our socket
        (read without waiting), as the PeerError it means; else None."""
        try:
            for _ in range(NOTED_PER_CHECK):
                got = self.channel.poll_event()
                if got is self.channel.need_data:
                    return None
                if isinstance(got, (ev.Error, ev.Cancel)):
                    try:
                        self._unexpected(got, "")
                    except PeerError as said:
                        return said
                if not self._noted(got):
                    return None
        except Exception:  # noqa: BLE001 -- nothing readable: the failure stands
            return None
        return None

    def _classify(self, e: BaseException) -> tuple[str, str, str]:
        if self._cancel.reason is not None and not isinstance(e, PeerError):
            return "cancelled", "cancelled", self._cancel.reason
        if isinstance(e, MigrationAborted):
            return e.status, e.code, str(e)
        if isinstance(e, PeerError):
            return ("cancelled" if e.cancelled else "failed"), e.code, str(e)
        if isinstance(e, TransportTimeout):
            return "failed", "timeout", str(e)
        if isinstance(e, TransportError):
            return "failed", "internal", str(e)
        if isinstance(e, ProtocolError):
            return "failed", e.code, f"protocol error talking to {self.peer}: {e}"
        if isinstance(e, MigratedError):
            return "failed", "internal", str(e)
        if isinstance(e, OSError):
            return "failed", "internal", f"{e.strerror or e} ({type(e).__name__})"
        return "failed", "internal", f"internal error: {type(e).__name__}: {e}"

    def _human(self, status: str, code: str, message: str, thawed: bool) -> str:
        verb = "was cancelled" if status == "cancelled" else "failed"
        fz = self.freezer
        if thawed:
            where = "the process was thawed and keeps running here"
        elif fz is not None and fz.exited():
            where = "the process has exited"
        elif fz is not None and fz.was_stopped and self._frozen_at is not None:
            where = "the process was already stopped before the migration and stays stopped"
        else:
            where = "the process keeps running here"
        text = (f"migration {self.migration_id} of PID {self.pid} to {self.peer} {verb}: "
                f"{message}; {where}")
        if self._released_pending is not None:
            text += (f"; the outcome is in doubt: Release was sent but not confirmed, "
                     f"so the destination {self.peer} may have published image "
                     f"{self._released_pending}: check `migratectl images list` there "
                     "before retrying")
        hint = _HINTS.get(code)
        if status != "cancelled" and hint:
            text += f"; {hint}"
        return text

    def _cleanup(self) -> None:
        self._cancel.disarm()
        self.transport.close()          # first: wakes a keepalive blocked in send
        self.channel.stop_keepalive()
        close = getattr(self.tracker, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001
                log.exception("closing the tracker of PID %d", self.pid)
        fz = self.freezer
        if fz is not None:
            # A stopped-on-success target stays stopped (_keep_stopped made
            # the freezer forget it); otherwise close() thaws what we froze.
            try:
                fz.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the freezer of PID %d", self.pid)

    def _timeout_message(self, d) -> str:
        bw = self.policy.bandwidth
        flush_ms = self._dest_flush_ms()
        if flush_ms >= d.expected_downtime_ms / 2:
            return (f"{TIMEOUT_MESSAGE} ({self.options.timeout_s:g} s): the destination "
                    f"{self.peer} expects {flush_ms:.0f} ms to make the pages it received "
                    "durable, and the commit inside the freeze would wait for it; that "
                    "does not fit in what is left; the process was never frozen. Check the "
                    "destination's disk (its state directory), or raise --timeout")
        return (f"{TIMEOUT_MESSAGE} ({self.options.timeout_s:g} s): the final delta would "
                f"take about {d.expected_downtime_ms:.0f} ms at {bw / 2**20:.1f} MiB/s and "
                "does not fit in what is left; the process was never frozen. Raise "
                "--timeout or --downtime-ms, give the link more bandwidth, or migrate "
                "when the process writes less")

    def _emit(self, event: dict) -> None:
        event.setdefault("migration_id", self.migration_id)
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 -- a broken observer must not break the migration
            log.exception("on_event callback failed")


# What an operator can do, by error code (appended to failure messages).
_HINTS = {
    "timeout": ("check the link to the destination and that its migrated is healthy; "
                "raise --timeout for big or busy processes"),
    "quota": "free space on the destination (`migratectl images rm ID`) or raise its quota",
    "disk-full": "free space in the destination's state directory",
    "version": "run the same migrated version on both nodes",
    "auth": "check the certificates and --allow-peer on both nodes",
    "busy": "the destination runs its maximum of migrations; retry later",
    "digest": "data was corrupted in transit; retry and check the network",
}


def _nothing_to_track(runs: PageRuns, data: Any) -> None:
    """Stop-and-copy's reads: the target is frozen throughout."""


def _keep_stopped(fz: Freezer) -> None:
    """Success with then=stop: the target stays stopped (like QEMU's paused
    source), so the freezer must not thaw it on close, and the journal must
    forget it (a restarted daemon must not resume a migrated process)."""
    detach = getattr(fz, "detach", None)
    if detach is not None:
        detach()
        return
    fz._frozen_by_us = False   # noqa: SLF001 -- until Freezer grows detach()
    fz._frozen = False         # noqa: SLF001
    if fz.on_thaw is not None:
        fz.on_thaw(fz.pid)


def _fit_cmdline(args: list[str], limit: int) -> list[str]:
    out, used = [], 0
    for a in args:
        n = len(a.encode("utf-8", "surrogateescape")) + 1
        if used + n > limit:
            break
        out.append(a)
        used += n
    return out




def _keepalives() -> Callable[[], ev.Keepalive]:
    seq = itertools.count()
    return lambda: ev.Keepalive(next(seq))

