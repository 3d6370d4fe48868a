"""The destination side: drive a DestConnection into an image writer.

:class:`DestMigration` runs in a worker thread over a blocking transport
the daemon accepted (docs/ARCHITECTURE.md, "Engine <-> daemon seam"):

    Hello -> Welcome          (versions and capabilities agreed)
    Start -> Accept           (ImageStore.begin: quota and free space are
                               checked here, before any page is accepted)
    Layout/Pages/Zeros/Dropped -> the ImageWriter, as they arrive (pages go
                               to disk at once; nothing holds the image)
    RoundEnd                  -> progress event; writer.checkpoint() digests
                               the chunks of that round and flushes them in
                               the background while the source still runs
    Freeze, FinalEnd          -> progress events (FinalEnd: the frozen
                               round's "round" event, from our own counts)
    CommitRequest -> writer.prepare() -> Committed(image_id, digest)
                              (sealed and durable, but staged: not visible)
    Release(image_id) -> writer.publish() -> Released(image_id)

The image becomes visible only on Release.  If anything else arrives
instead -- Error, Cancel, end of stream, silence -- or Release comes later
than RELEASE_PUBLISH_SHARE x the source's shortest timeout after Committed
left (the source may have given up and resumed its process by then), the staged
image is removed: a source that failed never leaves a second copy here.
A published image whose Released cannot be sent is withdrawn the same way
(the source cannot have read it, so it keeps its process).

Any failure (protocol violation, quota, disk full, a silent or vanished
peer, a cancel) aborts the writer -- the partial image is removed -- and,
when the link still works, sends Error (or Cancel) to the source before
closing.  Every wait has a timeout: a silent peer costs seconds, not a
stuck worker; a source that sends nothing but keepalives while streaming
is cut after a bound (PROGRESS_IDLE_FACTOR), so it cannot hold a
--max-migrations slot for ever.  ``run()`` never raises for a migration failure.
"""

from __future__ import annotations

import functools
import itertools
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from migrated.engine.transport import (BlockingTransport, CancelLatch, Channel, PeerClosed,
                                       TransportError, TransportTimeout, WaitExpired,
                                       clip_text, say_goodbye)
from migrated.errors import (ImageError, ImageWithdrawn, MigratedError, ProtocolError,
                             QuotaExceeded)
from migrated.image.manifest import MetaTooLarge, check_image_id, clip_cmdline
from migrated.image.pipeline import PipelinedWriter
from migrated.wire import events as ev
from migrated.wire import limits as L
from migrated.wire.connection import NEED_DATA, DestConnection
from migrated.wire.state import State

log = logging.getLogger("migrated.engine.dest")

# Capabilities this destination understands (echoed if the source offers them).
CAPABILITIES = ("zeros", "backlog", "final-figures")

# With "backlog": the flush rate assumed until a background flush measured
# one (bytes/s).  Low on purpose: a source that believes the disk faster
# than it is freezes too early; one that believes it slower only waits for
# the next report, which comes when the flush under way ends.
ASSUMED_FLUSH_RATE = 100 * 1024 * 1024

# How long we try to tell the source why we stop before closing anyway.
GOODBYE_TIMEOUT_S = 2.0
# A cancel the engine could not act on within the grace (stuck receiving a
# large frame): the Cancel goes out from the latch's timer, within this.
CANCEL_GOODBYE_S = 0.5

# While the source is frozen, checkpoint the image every this many bytes of
# page data (besides each RoundEnd): the final delta's chunks are then
# digested and flushed while the rest of it still arrives, and commit --
# the last step of the freeze -- finds almost nothing left to do.
FROZEN_CHECKPOINT_BYTES = 8 * 1024 * 1024

# During live rounds, start writing the received pages back to disk every
# this many bytes (ImageWriter.flush_async): a short migration would
# otherwise leave most of its disk writes to the fsync inside commit.
# Only for a source without the "backlog" capability: one with it learns
# the destination's unflushed bytes after every round (Backlog) and waits
# for the disk before it freezes, so the pages of a round are left to the
# kernel's writeback while they arrive and flushed from its RoundEnd on.
LIVE_FLUSH_BYTES = 32 * 1024 * 1024


# Over a plain socket, a Pages message with at least this many bytes of
# data still to come is moved from the socket straight into the image
# file by splice(2) (DestConnection direct_pages, Channel): one copy into
# the page cache instead of a copy out of the socket and another into the
# file.  Its digest is then taken from the file.  TLS sockets cannot.
DIRECT_RECEIVE_BYTES = 256 * 1024

# The figures of every round would grow with the round count, which only
# the peer decides (u32: MAX_ROUND): the summary keeps the first and the
# last rounds and counts the ones dropped between them.  A real migration
# has tens of rounds (the source's policy stops at max_rounds, 30 by
# default) and keeps them all.
ROUNDS_KEPT_FIRST = 16
ROUNDS_KEPT_LAST = 112
# Likewise the "round" progress events (one log line each): every one for
# the first this many rounds, then at most one per ROUND_EVENT_INTERVAL_S,
# saying how many rounds it stands for.
ROUND_EVENTS_ALWAYS = 64
ROUND_EVENT_INTERVAL_S = 1.0

# The progress rule (SPEC.md 14): while streaming, a source that sends
# nothing but keepalives for this many idle timeouts -- at least
# MIN_PROGRESS_TIMEOUT_S, plus the time our own disk still needs for what
# it holds (a source with "backlog" waits for that) -- is cut with
# error(timeout), and its --max-migrations slot freed.  Keepalives alone
# keep a link open, not a migration: without this rule a source could hold
# a slot for ever.  Safe for a real source, which sends only keepalives
# while (source.py) it waits for our answer to a round-end (at most one
# idle timeout), waits for our disk (bounded by our flush estimate, added
# here; every flush that ends restarts the clock with the report it
# sends), stops its target (FREEZE_TIMEOUT_S, 5 s) or collects the dirty
# set (digest tracker: the whole address space hashed, ~1.4 GB/s, so some
# 200 s for the largest image we take, 256 GiB; soft-dirty and uffd-wp a
# few seconds).
PROGRESS_IDLE_FACTOR = 10
MIN_PROGRESS_TIMEOUT_S = 300.0

# The image manifest keeps the destination's timings (meta["timings"],
# IMAGE.md) with the figures of at most this many rounds -- the first and
# the last ones, as RoundFigures does, but fewer: at most ~230 bytes of
# JSON each, so the whole dict stays under MAX_TIMINGS_BYTES.  The
# default policy (30 rounds at most, plus the final one) keeps them all.
TIMINGS_ROUNDS_FIRST = 8
TIMINGS_ROUNDS_LAST = 24
MAX_TIMINGS_BYTES = 8 * 1024
# The figures of a round kept in the manifest.
TIMINGS_ROUND_KEYS = ("round", "pages", "bytes", "duration_ms", "dirty_rate", "bandwidth",
                      "pause_ms", "final")

_FLAG_NAMES = ((ev.MAP_FLAG_DELETED, "deleted"), (ev.MAP_FLAG_HEAP, "heap"),
               (ev.MAP_FLAG_STACK, "stack"))


@dataclass
class DestLimits:
    """Bounds the destination imposes on one incoming migration."""
    # Pages per Pages message we accept (the protocol's maximum by default).
    max_batch_pages: int = L.MAX_BATCH_PAGES
    # Page data this migration may send (Accept.quota_bytes); None = what the
    # image store has room for, capped at the protocol's u63.
    quota_bytes: int | None = None
    # (Read when the limits are made: the daemon may have set them at start.)
    handshake_timeout_s: float = field(default_factory=lambda: L.HANDSHAKE_TIMEOUT_S)
    # Silence tolerated between messages while streaming (the source sends
    # keepalives every KEEPALIVE_INTERVAL_S while it is busy elsewhere).
    idle_timeout_s: float = field(default_factory=lambda: L.IDLE_TIMEOUT_S)
    # While streaming, keepalives alone for this long end the migration
    # (PROGRESS_IDLE_FACTOR); None: derived from idle_timeout_s.
    progress_timeout_s: float | None = None

    def progress_s(self) -> float:
        if self.progress_timeout_s is not None:
            return self.progress_timeout_s
        return max(PROGRESS_IDLE_FACTOR * self.idle_timeout_s, MIN_PROGRESS_TIMEOUT_S)


class RoundFigures:
    """The figures of a migration's rounds, bounded (ROUNDS_KEPT_FIRST and
    ROUNDS_KEPT_LAST): ``kept()`` in round order, ``dropped`` between."""

    def __init__(self, first: int = ROUNDS_KEPT_FIRST, last: int = ROUNDS_KEPT_LAST):
        self._first_max = first
        self._first: list[dict] = []
        self._last: deque = deque(maxlen=last)
        self.count = 0          # rounds seen
        self.dropped = 0        # rounds seen but not kept

    def add(self, fig: dict) -> None:
        self.count += 1
        if len(self._first) < self._first_max:
            self._first.append(fig)
            return
        if len(self._last) == self._last.maxlen:
            self.dropped += 1           # the oldest of the last ones leaves
        self._last.append(fig)

    def kept(self) -> list[dict]:
        return self._first + list(self._last)


class _Abort(MigratedError):
    def __init__(self, status: str, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code


def mapping_record(m: ev.MappingInfo) -> dict:
    """A wire MappingInfo as the image store's mapping record."""
    return {"start": m.start, "end": m.end, "perms": m.perms, "offset": m.offset,
            "kind": m.kind, "path": m.path,
            "flags": [name for bit, name in _FLAG_NAMES if m.flags & bit],
            "deleted": bool(m.flags & ev.MAP_FLAG_DELETED)}


class DestMigration:
    def __init__(self, transport: BlockingTransport, store, *, node: str = "",
                 on_event: Callable[[dict], None] = print,
                 limits: DestLimits | None = None, peer_name: str = "",
                 direct_receive: bool = True, write_inline: bool | None = None):
        self.transport = transport
        self.store = store
        # The TLS identity of the source (certificate name; "" without TLS):
        # recorded with the image, and only that identity may withdraw it.
        self.peer_name = peer_name
        self.node = node or socket.gethostname() or "destination"
        self.on_event = on_event
        self.limits = limits or DestLimits()
        self.peer = transport.peer
        seq = itertools.count()
        # Page batches are not copied out of the receive buffer: big ones
        # go from the socket into the image file (see DIRECT_RECEIVE_BYTES)
        # or, where the socket cannot splice, are handed over to the image
        # writer's thread (given back once written); small ones are lent
        # until the next event.
        direct = DIRECT_RECEIVE_BYTES if direct_receive and transport.can_splice else 0
        # Pages are written in a second thread (PipelinedWriter) while the
        # next batch is received -- unless they come over TLS from a source
        # on this machine (loopback: the demo, a move between containers of
        # one node).  Its reading, encrypting and sending then take the same
        # cores, and a fourth busy thread only adds contention; written
        # where they were decrypted, the bytes are also still in this core's
        # cache.  Round 0 over loopback TLS: 508 against 439 MiB/s (median
        # of eight, alternating, two cores).  Over plain TCP big batches go
        # from the socket into the file by splice in this thread anyway, and
        # the writer thread keeps the small work (zero pages, small batches,
        # checkpoints) off the receiving thread, as measured for the freeze.
        # (Reading and writing in one thread keeps the SSL object busier,
        # but never shared: the transport lets one thread at a time in.)
        if write_inline is None:
            write_inline = transport.same_host and not transport.can_splice
        self.write_inline = write_inline
        self.channel = Channel(DestConnection(borrow_pages=True,
                                              hand_over_pages=not self.write_inline,
                                              direct_pages=direct),
                               transport, NEED_DATA,
                               lambda: ev.Keepalive(next(seq)))
        # Page data spliced from the socket must arrive within the idle
        # timeout of its frame's head, as any frame read whole must.
        self.channel.frame_timeout = self.limits.idle_timeout_s
        self.migration_id = ""
        self.writer = None
        self.rounds = RoundFigures()
        self._round_event_at = 0.0
        self._rounds_unreported = 0     # rounds since the last "round" event
        # (The goodbye holds the channel, not this engine: a timer still
        # saying it as run() returns must not keep the engine alive.)
        self._cancel = CancelLatch(transport, goodbye=functools.partial(
            _say_cancel, self.channel))
        self._freeze_at: float | None = None
        self._commit_ms = 0.0
        self._committed_at = 0.0
        self._backlog = False        # "backlog" agreed: report, no live flush
        # Pages of the current round as they arrive (data, zero): the round
        # figures count what came here, not what the source says it sent.
        self._round_data = 0
        self._round_zero = 0
        self._freeze_bytes = 0        # the connection's frame_bytes after Freeze
        self._accepted_at: float | None = None
        self._commit_request_at: float | None = None
        # When the source last sent more than a keepalive, or our disk last
        # told it something (the progress rule, _progress_deadline).
        self._progress_at = time.monotonic()

    def cancel(self, reason: str = "cancelled by operator") -> None:
        self._cancel.cancel(reason)

    # -- run ------------------------------------------------------------------------

    def run(self) -> dict:
        t0 = time.perf_counter()
        result: dict[str, Any] = {"status": "failed", "image_id": None, "digest": None,
                                  "migration_id": None, "peer": self.peer,
                                  "source_node": None, "pid": None, "rounds": [],
                                  "write_inline": self.write_inline}
        try:
            image_id, digest = self._receive(result)
            result.update(status="completed", image_id=image_id, digest=digest)
        except BaseException as e:  # noqa: BLE001 -- every failure becomes a summary
            status, code, message = self._classify(e)
            self._abort_writer()
            result.update(status=status, error_code=code,
                          error=f"incoming migration {self.migration_id or '(no id yet)'} "
                                f"from {self.peer} {'was cancelled' if status == 'cancelled' else 'failed'}: "
                                f"{message}; " + self._image_fate())
            say_goodbye(self.channel, status, code, message, e, GOODBYE_TIMEOUT_S)
            if not isinstance(e, (MigratedError, OSError)):
                log.exception("incoming migration from %s: unexpected error", self.peer)
        finally:
            self._cancel.disarm()
            self.transport.close()          # first: wakes a keepalive blocked in send
            self.channel.stop_keepalive()
            self._drop_flush_listener()
        result.update(migration_id=self.migration_id or None,
                      rounds=self.rounds.kept(), rounds_dropped=self.rounds.dropped,
                      total_ms=round((time.perf_counter() - t0) * 1000.0, 3),
                      bytes_received=self.transport.bytes_received)
        self._emit({"event": "end", **{k: v for k, v in result.items() if k != "rounds"}})
        return result

    def _receive(self, result: dict) -> tuple[str, str]:
        lim = self.limits
        ch = self.channel
        handshake_end = time.monotonic() + lim.handshake_timeout_s
        hello = self._wait(lim.handshake_timeout_s, "Hello", ev.Hello, deadline=handshake_end)
        self.migration_id = hello.migration_id
        caps = tuple(c for c in hello.capabilities if c in CAPABILITIES)
        ch.send_event(ev.Welcome(max(set(hello.versions) & set(L.SUPPORTED_VERSIONS)),
                                 self.node, caps))
        self._backlog = "backlog" in caps
        start = self._wait(lim.handshake_timeout_s, "Start", None, deadline=handshake_end)
        result.update(source_node=hello.node, migration_id=hello.migration_id)
        if isinstance(start, ev.Withdraw):
            return self._withdraw(hello, start, result)
        if not isinstance(start, ev.Start):
            self._unexpected(start)
        result.update(pid=start.pid)
        # The command line is informational and may take six JSON characters
        # per byte: cut to what the image metadata keeps, and say so.
        cmdline, clipped = clip_cmdline(start.cmdline)
        meta = {"pid": start.pid, "cmdline": cmdline, "exe": start.exe,
                "source_node": hello.node, "migration_id": hello.migration_id,
                "source_peer": self.peer_name,
                "tracker": start.tracker, "options": dict(start.options)}
        if clipped:
            meta["cmdline_truncated"] = True
        try:
            image = self.store.begin(meta, start.estimated_bytes)
            self.writer = image if self.write_inline else PipelinedWriter(image)
        except QuotaExceeded as e:
            raise _Abort("failed", "disk-full" if _is_disk_full(e) else "quota", str(e)) from e
        except MetaTooLarge as e:
            raise _Abort("failed", "too-large",
                         f"the start of PID {start.pid} does not fit this destination's "
                         f"image metadata: {e} (exe and options too long?)") from e
        quota = lim.quota_bytes
        if quota is None:
            quota = getattr(self.store, "quota_bytes", None)
        quota = L.U63_MAX if quota is None else min(int(quota), L.U63_MAX)
        ch.send_event(ev.Accept(min(lim.max_batch_pages, L.MAX_BATCH_PAGES,
                                    L.MAX_BATCH_BYTES // start.page_size), quota))
        self._accepted_at = time.perf_counter()
        self._progress_at = time.monotonic()
        self._emit({"event": "start", "peer": self.peer, "source_node": hello.node,
                    "pid": start.pid, "tracker": start.tracker,
                    "estimated_bytes": start.estimated_bytes, "image_id": self.writer.image_id})
        w = self.writer
        # Checkpoint at each RoundEnd: the commit, which the source waits
        # for with its process frozen, then only digests and flushes what
        # the last rounds changed (ImageWriter.checkpoint).
        checkpoint = getattr(w, "checkpoint", None)
        flush_async = None if self._backlog else getattr(w, "flush_async", None)
        if self._backlog and checkpoint is not None:
            w.set_flush_listener(self._report_flushed)
        frozen = False
        unflushed = 0              # page bytes since the last checkpoint or flush
        while True:
            got = self._wait(lim.idle_timeout_s, "message", None,
                             progress_by=self._progress_deadline)
            self._progress_at = time.monotonic()
            if isinstance(got, ev.Pages):
                unflushed += len(got.data)
                self._round_data += got.runs.total_pages()
                w.write_pages(got.runs, got.data)
                if frozen and checkpoint is not None:
                    if unflushed >= FROZEN_CHECKPOINT_BYTES:
                        unflushed = 0
                        checkpoint(settled_only=True)
                elif unflushed >= LIVE_FLUSH_BYTES and flush_async is not None:
                    unflushed = 0
                    flush_async()
            elif isinstance(got, ev.Dropped):      # (a subclass of Zeros: test first)
                w.drop(got.runs)
            elif isinstance(got, ev.Zeros):
                self._round_zero += got.runs.total_pages()
                w.write_zeros(got.runs)
            elif isinstance(got, ev.Layout):
                w.set_layout(mapping_record(m) for m in got.mappings)
            elif isinstance(got, ev.RoundEnd):
                if got.round >= L.MAX_ROUND:
                    # No message could name the next round: the migration
                    # could never freeze, so it ends here, clearly.
                    raise ProtocolError(
                        "out-of-state", f"round-end of round {got.round}, the last round a "
                        f"migration may have (MAX_ROUND, SPEC.md 8): the source must "
                        "freeze in it")
                # pages: data and zero pages that came in this round, as the
                # source counts them in its own line (got.pages, data only,
                # was checked by the connection); the rest are its figures.
                fig = {"round": got.round, "pages": self._round_data + self._round_zero,
                       "bytes": got.bytes, "duration_ms": round(got.duration_ms, 3),
                       "dirty_rate": round(got.dirty_rate, 1),
                       "bandwidth": round(got.bandwidth, 1), "pause_ms": round(got.pause_ms, 3),
                       "data_pages": self._round_data, "zero_pages": self._round_zero,
                       "final": False}
                self._round_data = self._round_zero = 0
                self.rounds.add(fig)
                if checkpoint is not None:
                    checkpoint()
                    unflushed = 0
                if self._backlog:
                    ch.send_event(self._backlog_report())
                self._emit_round(fig)
            elif isinstance(got, ev.Freeze):
                self._freeze_at = time.perf_counter()
                self._freeze_bytes = ch.conn.frame_bytes
                frozen, unflushed = True, 0
                # (the connection starts the frozen round's count afresh too)
                self._round_data = self._round_zero = 0
                self._emit({"event": "freeze", "round": got.round})
            elif isinstance(got, ev.FinalEnd):
                self._final_round(got)
            elif isinstance(got, ev.CommitRequest):
                self._commit_request_at = time.perf_counter()
                return self._commit(got)
            else:
                self._unexpected(got)

    def _final_round(self, got: ev.FinalEnd) -> None:
        """The frozen round's line, from our own counts (no round-end
        carries the source's figures for it): pages and bytes received
        since Freeze (the frames between Freeze and FinalEnd, as the
        source counts what it sent), and the time since; the source's
        dirty rate and pause come in FinalEnd ("final-figures"
        capability; from a source without it they stay None and are left
        out of the log line)."""
        t = time.perf_counter()
        since = 0.0 if self._freeze_at is None else t - self._freeze_at
        conn = self.channel.conn
        nbytes = max(0, conn.frame_bytes - conn.last_frame_bytes - self._freeze_bytes)
        fig = {"round": got.round, "pages": self._round_data + self._round_zero,
               "bytes": nbytes, "duration_ms": round(since * 1000.0, 3),
               "dirty_rate": got.dirty_rate, "bandwidth": round(nbytes / max(since, 1e-6), 1),
               "pause_ms": got.pause_ms, "data_pages": self._round_data,
               "zero_pages": self._round_zero, "final": True}
        self._round_data = self._round_zero = 0
        self.rounds.add(fig)
        # Never throttled: one per migration.
        self._emit({"event": "round", **fig})

    def _progress_deadline(self) -> float:
        """When keepalives alone stop counting (module doc at
        PROGRESS_IDLE_FACTOR): the last progress, plus the bound, plus what
        our disk still needs for the page data it holds when the source
        waits for it ("backlog")."""
        extra = 0.0
        if self._backlog and self.writer is not None:
            extra = self._unflushed()[1]
        return self._progress_at + self.limits.progress_s() + extra

    def _timings(self) -> dict:
        """The destination's timings for the image manifest (meta["timings"],
        IMAGE.md): the figures of the rounds (at most TIMINGS_ROUNDS_FIRST
        + TIMINGS_ROUNDS_LAST of them: a few KiB of JSON) and of the freeze
        as seen here.  The time prepare() itself takes cannot be in what
        it seals: it is the manifest's store_timings_ms, and the "commit"
        event's commit_ms."""
        kept = self.rounds.kept()
        if len(kept) > TIMINGS_ROUNDS_FIRST + TIMINGS_ROUNDS_LAST:
            kept = kept[:TIMINGS_ROUNDS_FIRST] + kept[-TIMINGS_ROUNDS_LAST:]
        t_req = self._commit_request_at or time.perf_counter()

        def ms(t0: float | None) -> float | None:
            return None if t0 is None else round((t_req - t0) * 1000.0, 3)
        return {"rounds": [{k: r[k] for k in TIMINGS_ROUND_KEYS if r.get(k) is not None}
                           for r in kept],
                "rounds_total": self.rounds.count,
                "rounds_left_out": self.rounds.count - len(kept),
                # Accept sent -> CommitRequest received: the whole transfer.
                "receive_ms": ms(self._accepted_at),
                # Freeze received -> CommitRequest received: the frozen
                # part before the commit (the source adds the commit).
                "frozen_receive_ms": ms(self._freeze_at),
                "bytes_received": self.transport.bytes_received}

    def _emit_round(self, fig: dict) -> None:
        """The "round" event, throttled past ROUND_EVENTS_ALWAYS rounds (the
        peer decides how many rounds come, and each event is a log line)."""
        now = time.monotonic()
        if self.rounds.count > ROUND_EVENTS_ALWAYS and \
                now - self._round_event_at < ROUND_EVENT_INTERVAL_S:
            self._rounds_unreported += 1
            return
        extra = {"rounds_unreported": self._rounds_unreported} if self._rounds_unreported else {}
        self._round_event_at, self._rounds_unreported = now, 0
        self._emit({"event": "round", **fig, **extra})

    def _backlog_report(self) -> ev.Backlog:
        """Page bytes received (the connection counts them, queued writes
        included) not yet known durable, and how long flushing them should
        take at the rate background flushes achieved here; after the
        RoundEnd of the connection's last ended round."""
        unflushed, flush_s = self._unflushed()
        return ev.Backlog(self.channel.conn.round - 1, min(unflushed, L.U63_MAX),
                          min(flush_s * 1000.0, L.MAX_FIGURE))

    def _unflushed(self) -> tuple[int, float]:
        """Page bytes received but not known durable, and the seconds
        flushing them should take here."""
        w = self.writer
        unflushed = max(0, self.channel.conn.total_bytes - int(getattr(w, "flushed_bytes", 0)))
        rate = float(getattr(w, "flush_rate", 0.0)) or ASSUMED_FLUSH_RATE
        return unflushed, unflushed / rate

    def _report_flushed(self) -> None:
        """After a background flush (in the flusher's thread): tell a source
        that may be waiting for the disk.  Only while streaming; a report
        that cannot go out is dropped (the link's failure shows elsewhere)."""
        conn = self.channel.conn
        if conn.round == 0 or conn.state is not State.STREAMING:
            return
        try:
            self.channel.send_event(self._backlog_report())
        except (MigratedError, OSError):
            return
        # A source waiting for our disk hears from it now: the wait it
        # spent with keepalives was ours (the progress rule).
        self._progress_at = time.monotonic()

    def _withdraw(self, hello: ev.Hello, req: ev.Withdraw, result: dict) -> tuple[str, None]:
        """The other conversation (SPEC.md 9.2): a source that sent Release
        but never saw Released, and runs its process again, asks us to take
        back whatever we published for that migration -- and to publish
        nothing for it later."""
        try:
            check_image_id(req.image_id)
        except ImageError as e:
            raise _Abort("failed", "malformed", f"withdraw: {e}") from e
        try:
            outcome = self.store.withdraw_migration(hello.migration_id, req.image_id,
                                                    source_node=hello.node,
                                                    source_peer=self.peer_name)
        except ImageError as e:
            raise _Abort("failed", "auth", str(e)) from e
        self.channel.send_event(ev.Withdrawn(req.image_id, outcome))
        result["withdrawn"] = outcome
        self._emit({"event": "withdraw", "image_id": req.image_id, "outcome": outcome,
                    "source_node": hello.node})
        return req.image_id, None

    def _commit(self, req: ev.CommitRequest) -> tuple[str, str]:
        image_id, digest = self._prepare(req)
        self._release(image_id)
        return image_id, digest

    def _prepare(self, req: ev.CommitRequest) -> tuple[str, str]:
        w = self.writer
        totals = w.totals()
        held = totals["data_pages"] + totals["zero_pages"]
        if req.pages != held:
            raise _Abort("failed", "bad-pages",
                         f"the source says the image holds {req.pages} pages, "
                         f"{held} arrived")
        # fsync of a large image can take longer than the source's idle
        # timeout: keep the link alive meanwhile.
        self.channel.start_keepalive(L.KEEPALIVE_INTERVAL_S)
        t0 = time.perf_counter()
        try:
            image_id, digest = w.prepare({"migration_id": self.migration_id,
                                          "timings": self._timings()})
        finally:
            self.channel.stop_keepalive()
        self._commit_ms = (time.perf_counter() - t0) * 1000.0
        # The publish window starts before Committed leaves: a stall right
        # after the send cannot make it look shorter than it was.
        self._committed_at = time.monotonic()
        self.channel.send_event(ev.Committed(image_id, digest))
        return image_id, digest

    def _release(self, image_id: str) -> None:
        """Wait for Release; publish only if it came in time and nothing
        says the source gave up already; answer Released."""
        w = self.writer
        t_sent = self._committed_at
        # The source gives up on Released after the shortest of its waits
        # (commit timeout, idle timeout, its socket timeout -- configured
        # like ours): publish only well inside that.
        window = L.RELEASE_PUBLISH_SHARE * min(L.COMMIT_TIMEOUT_S, L.IDLE_TIMEOUT_S,
                                               float(getattr(self.transport, "timeout",
                                                             L.IDLE_TIMEOUT_S)))
        # (the connection checks Release.image_id against Committed)
        self._wait(window, "Release for prepared image " + image_id, ev.Release,
                   deadline=t_sent + window)
        late = time.monotonic() - t_sent
        if late > window:
            # We were stalled (stopped, swapped out...) with Release in our
            # socket: the source may be past its own timeout.
            raise _Abort("failed", "timeout",
                         f"Release for image {image_id} was read {late:.1f} s after "
                         f"Committed was sent, past the {window:g} s publish window: "
                         "the source may have given up")
        # Bytes already here after Release (the source's Error, Cancel or
        # end of stream after its timeout) mean it gave up: never publish.
        after = self.channel.poll_event()
        if after is not self.channel.need_data and not isinstance(after, ev.Keepalive):
            self._unexpected(after)
        t0 = time.perf_counter()
        try:
            w.publish()
        except ImageWithdrawn as e:
            raise _Abort("failed", "cancelled", f"{e} (it resolved the migration as failed "
                                                "over another connection)") from e
        late = time.monotonic() - t_sent
        if late > window:
            # Stalled inside the publish: by the time Released could leave,
            # the source may be past its timeout.  Take the image back.
            w.withdraw()
            raise _Abort("failed", "timeout",
                         f"publishing image {image_id} ended {late:.1f} s after Committed "
                         f"was sent, past the {window:g} s publish window: the source may "
                         "have given up")
        try:
            self.channel.send_event(ev.Released(image_id))
        except TransportError as e:
            # A send that fails leaves at most part of the frame on the
            # wire: the source cannot have read Released, so it gives up
            # and thaws its process (SPEC.md 9.1).  The image must not stay
            # as a second copy; its Withdraw, if one comes, finds it gone.
            w.withdraw()
            raise _Abort("failed", "internal",
                         f"Released for image {image_id} could not be sent ({e}): the "
                         "source cannot have read it and keeps its process") from e
        publish_ms = (time.perf_counter() - t0) * 1000.0
        self._await_verdict(image_id, t_sent + window / L.RELEASE_PUBLISH_SHARE + window)
        frozen_ms = None if self._freeze_at is None else \
            round((time.perf_counter() - self._freeze_at) * 1000.0, 3)
        totals = w.totals()
        self._emit({"event": "commit", "image_id": image_id,
                    "digest": getattr(self.channel.conn.committed, "digest", None),
                    "commit_ms": round(self._commit_ms, 3),
                    "publish_ms": round(publish_ms, 3),
                    "since_freeze_ms": frozen_ms,
                    "store": dict(getattr(w, "commit_stats", {}) or {}),
                    "page_bytes": totals.get("bytes_received"),
                    "direct_bytes": self.channel.direct_bytes,
                    "write_cpu_ms": round(totals.get("write_cpu_s", 0.0) * 1000.0, 3)})

    def _await_verdict(self, image_id: str, deadline: float) -> None:
        """After Released: the source either got it in time and closes
        (end of stream), or had already given up and resumed its process,
        and then its Error or Cancel is next on the stream (SPEC.md 9.1).
        Both sides follow the source's one decision: on Error or Cancel the
        published image is withdrawn.  A link that dies or stays silent
        says nothing; the image stays (presumed released: a source that
        saw Released may already have ended its process)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("incoming migration %s from %s: no word from the source after "
                            "Released for image %s; keeping it", self.migration_id,
                            self.peer, image_id)
                return
            try:
                got = self.channel.next_event(left)
            except TransportError:       # end of stream, reset, silence
                return
            except ProtocolError:
                return                   # garbage after Released decides nothing
            if isinstance(got, (ev.Error, ev.Cancel)):
                self.writer.withdraw()
                what = (f"error ({got.code}): {got.message}" if isinstance(got, ev.Error)
                        else f"cancel: {got.reason}")
                raise _Abort("failed", got.known_code if isinstance(got, ev.Error) else "cancelled",
                             f"the source gave up before Released for image {image_id} "
                             f"reached it and resumed its process ({what})")
            if not isinstance(got, ev.Keepalive):
                return                   # end of stream (or a stray message): kept

    # -- waiting ----------------------------------------------------------------------

    def _wait(self, timeout: float, what: str, want: type | None, *,
              deadline: float | None = None,
              progress_by: Callable[[], float] | None = None):
        """Next event of type ``want``.  Keepalives extend an idle wait, but
        never a fixed ``deadline`` (the handshake must finish in time, or a
        peer could hold a session open with keepalives alone), nor past
        ``progress_by()`` (the progress rule while streaming).  A frame
        under way when an idle wait ends gets the time its size needs
        (Channel.next_event's frame_allowance); a fixed deadline is kept."""
        fixed = deadline is not None
        if deadline is None:
            deadline = time.monotonic() + timeout
        while True:
            if self._cancel.reason is not None:
                raise _Abort("cancelled", "cancelled", self._cancel.reason)
            left = deadline - time.monotonic()
            if left <= 0:
                self._check_writer()
                raise TransportTimeout(self.peer, f"{self.peer} sent no {what} within "
                                                  f"{timeout:g} s")
            try:
                got = self.channel.next_event(left, frame_allowance=not fixed)
            except WaitExpired:
                continue                    # the check above says what did not come
            except TransportTimeout:
                self._check_writer()        # the cause, if the writer failed meanwhile
                raise
            self._check_writer()
            if isinstance(got, ev.Keepalive):
                if progress_by is not None:
                    self._check_progress(progress_by())
                if not fixed:
                    deadline = time.monotonic() + timeout
                continue
            if want is None or isinstance(got, want):
                return got
            self._unexpected(got)

    def _check_progress(self, by: float) -> None:
        now = time.monotonic()
        if now < by:
            return
        conn = self.channel.conn
        raise _Abort("failed", "timeout",
                     f"{self.peer} sent only keepalives for {now - self._progress_at:.0f} s "
                     f"in state {conn.state.value} (round {conn.round}): no page data, "
                     f"layout or round end within the progress bound of "
                     f"{self.limits.progress_s():g} s (SPEC.md 14); the source is stuck, "
                     "and its migration slot is freed")

    def _check_writer(self) -> None:
        """Raise the error the writer's thread hit, if any.  Checked on every
        message, keepalives included: otherwise a source that follows the
        failed batch with keepalives alone would hold the session (and its
        --max-migrations slot) and never learn why it failed."""
        raise_pending = getattr(self.writer, "raise_pending", None)
        if raise_pending is not None:
            raise_pending()

    def _unexpected(self, got) -> None:
        if isinstance(got, ev.Error):
            # A code we do not know counts as "internal" (SPEC.md 13); the
            # message keeps the source's own.
            raise _Abort("failed", got.known_code, f"the source reported an error "
                                                   f"({got.code}): {got.message}")
        if isinstance(got, ev.Cancel):
            raise _Abort("cancelled", "cancelled", f"the source cancelled: {got.reason}")
        if isinstance(got, ev.ConnectionClosed):
            when = ("before releasing the prepared image"
                    if self.writer is not None and getattr(self.writer, "state", "") == "prepared"
                    else "before the commit request")
            raise PeerClosed(self.peer, f"{self.peer} closed the connection {when}")
        raise ProtocolError("out-of-state", f"unexpected {type(got).__name__} from {self.peer}")

    # -- failure --------------------------------------------------------------------------

    def _classify(self, e: BaseException) -> tuple[str, str, str]:
        if isinstance(e, _Abort):
            return e.status, e.code, str(e)
        if self._cancel.reason is not None:
            return "cancelled", "cancelled", self._cancel.reason
        if isinstance(e, QuotaExceeded):
            return "failed", "disk-full" if _is_disk_full(e) else "quota", str(e)
        if isinstance(e, MetaTooLarge):
            return "failed", "too-large", str(e)
        if isinstance(e, ImageError):
            code = "bad-pages" if type(e).__name__ == "LayoutViolation" else "internal"
            return "failed", code, str(e)
        if isinstance(e, ProtocolError):
            return "failed", e.code, f"protocol error from {self.peer}: {e.message}"
        if isinstance(e, TransportTimeout):
            return "failed", "timeout", str(e)
        if isinstance(e, TransportError):
            return "failed", "internal", str(e)
        if isinstance(e, MigratedError):
            return "failed", "internal", str(e)
        if isinstance(e, OSError):
            return "failed", "internal", f"{e.strerror or e}"
        return "failed", "internal", f"internal error: {type(e).__name__}: {e}"

    def _image_fate(self) -> str:
        w = self.writer
        if w is not None and getattr(w, "withdrawn", False):
            return (f"image {w.image_id}, published for it, was withdrawn: the source "
                    "keeps the process")
        return "the partial image was removed (never visible)"

    def _drop_flush_listener(self) -> None:
        """The writer's flush state holds ``_report_flushed``, a method of
        this object, which holds the writer: a reference cycle.  Left in
        place, this migration's memory (its receive buffers, the writer's
        maps: megabytes) waits for the cyclic garbage collector, which in a
        daemon may run only many migrations later.  Broken here, it is
        freed as soon as the last reference goes."""
        set_listener = getattr(self.writer, "set_flush_listener", None)
        if set_listener is not None:
            try:
                set_listener(None)
            except Exception:  # noqa: BLE001 -- then break the cycle on our side
                log.exception("dropping the flush listener")
                self.writer = None

    def _abort_writer(self) -> None:
        if self.writer is not None:
            try:
                self.writer.abort()
            except Exception:  # noqa: BLE001
                log.exception("removing partial image %s", getattr(self.writer, "image_id", "?"))

    def _emit(self, event: dict) -> None:
        event.setdefault("migration_id", self.migration_id or None)
        event.setdefault("role", "dest")
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001
            log.exception("on_event callback failed")


def _say_cancel(channel: Channel, reason: str) -> bool:
    """CancelLatch's last words for a destination engine (see there)."""
    return channel.try_send_event(ev.Cancel(clip_text(reason)), CANCEL_GOODBYE_S)


def _is_disk_full(e: BaseException) -> bool:
    return type(e).__name__ == "DiskFull"
