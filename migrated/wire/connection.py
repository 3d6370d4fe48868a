"""Sans-IO connections: one object per role, bytes in, events out.

    conn = DestConnection()
    conn.receive_data(sock.recv(65536))          # or get_buffer/buffer_updated
    while (ev := conn.next_event()) is not NEED_DATA:
        ...
    sock.sendmsg(conn.send_parts(Welcome(...)))  # or sendall(conn.send(...))

No sockets, no clock, no threads.  Any malformed, oversized or out-of-state
input raises ProtocolError from next_event() (the connection then enters
ERROR, where it only sends Error or Cancel); sending an event that breaks
the protocol raises LocalProtocolError and changes nothing.
"""

from __future__ import annotations

import numpy as np
import xxhash

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

from . import events as E
from . import limits as L
from .frames import TYPE_LIMITS, FrameReader, encode_parts
from .state import Role, State, legal_types, next_state


class LocalProtocolError(ProtocolError):
    """We (not the peer) tried to break the protocol: a bug in the caller."""


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


def _out_of_state(msg: str) -> ProtocolError:
    return ProtocolError("out-of-state", msg)


def _digest_mismatch(ev: E.Pages) -> ProtocolError:
    return ProtocolError("digest", f"round {ev.round} batch at {int(ev.runs.starts[0]):#x} "
                         f"({ev.runs.total_pages()} pages): data does not match its "
                         "xxh3-128 digest")


class _Connection:
    our_role: Role

    def __init__(self, *, versions=L.SUPPORTED_VERSIONS, page_size: int = PAGE_SIZE,
                 borrow_pages: bool = False, hand_over_pages: bool = False,
                 direct_pages: int = 0):
        """``borrow_pages=True``: the ``data`` of a received Pages event is
        a memoryview of the receive buffer instead of a copy, valid only
        until the next call on this connection (for a receiver that writes
        each batch out before asking for the next event).
        ``hand_over_pages=True``: big batches are moreover handed over, valid
        until given back (``frames.FrameReader``, ``frames.handed_over``),
        for a receiver that writes them out in another thread.
        ``direct_pages=N``: a Pages message with at least N bytes of data
        still in the socket is returned once its head is here, with ``data``
        an ``events.DeferredData``; every check that needs no data (round,
        size, layout, quota) has passed.  The caller moves the data from its
        socket itself, then reports the data's xxh3-128 with
        ``deferred_done(digest)``, which checks it and only then counts the
        batch; nothing else may be asked of the connection before that."""
        if page_size != PAGE_SIZE:
            raise ValueError(f"protocol v1 runs are in host pages ({PAGE_SIZE} bytes)")
        self._versions = tuple(versions)
        self._reader = FrameReader(borrow=borrow_pages, hand_over=hand_over_pages,
                                   direct_min=direct_pages)
        self._held: tuple | None = None    # a deferred Pages: (event, apply, state)
        self._state = State.IDLE
        self._preamble_sent = False
        self._error: ProtocolError | None = None
        self._frame_limits: dict[State, int] = {}
        self.page_size = page_size
        # Negotiated in the handshake.
        self.hello: E.Hello | None = None
        self.welcome: E.Welcome | None = None
        self.start: E.Start | None = None
        self.accept: E.Accept | None = None
        self.version: int | None = None
        # Streaming bookkeeping (identical on both ends).
        self.round = 0
        self.layout: E.Layout | None = None
        self._migratable = PageRuns.empty()  # of the layout, adjacent mappings merged
        self.round_pages = 0     # pages in Pages messages of this round
        self.total_pages = 0     # ... of all rounds
        self.total_bytes = 0     # page data bytes of all rounds (quota)
        self.committed: E.Committed | None = None
        self.released: E.Released | None = None
        self.withdraw: E.Withdraw | None = None

    # -- properties ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def their_role(self) -> Role:
        return self.our_role.peer

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Capabilities in use (those the destination echoed in Welcome)."""
        return self.welcome.capabilities if self.welcome else ()

    @property
    def max_batch_pages(self) -> int | None:
        return self.accept.max_batch_pages if self.accept else None

    @property
    def quota_bytes(self) -> int | None:
        return self.accept.quota_bytes if self.accept else None

    @property
    def frame_bytes(self) -> int:
        """Bytes of the peer's frames decoded so far, length prefixes
        included (not the preamble); ``last_frame_bytes``: of the last."""
        return self._reader.frame_bytes

    @property
    def last_frame_bytes(self) -> int:
        return self._reader.last_frame_bytes

    @property
    def pending_frame_bytes(self) -> int | None:
        """Declared body length of the frame being received (its length
        prefix is here and within limits), None between frames."""
        return self._reader.pending_length

    @property
    def error(self) -> ProtocolError | None:
        """The peer's protocol violation that put us in ERROR, if any."""
        return self._error

    # -- sending ---------------------------------------------------------------

    def send_parts(self, event: E.Event) -> list:
        """Buffers to write, in order (the first send includes our preamble).

        A Pages event's data is one of the buffers, not copied: keep it
        unchanged until they are written."""
        try:
            if not isinstance(event, E.Event):
                raise E.malformed(f"cannot send {type(event).__name__}: not a message")
            parts = encode_parts(event)
            self._process(event, self.our_role)
        except LocalProtocolError:
            raise
        except ProtocolError as e:
            raise LocalProtocolError(e.code, f"we would break the protocol: {e.message}"
                                     ) from None
        if not self._preamble_sent:
            self._preamble_sent = True
            parts[0] = L.PREAMBLE + parts[0]
        return parts

    def send(self, event: E.Event) -> bytes:
        """Bytes to write for ``event`` (joins send_parts: one copy)."""
        parts = self.send_parts(event)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means end of stream.  Checks the preamble
        and the pending frame's length and type at once."""
        if self._state in (State.CLOSED, State.ERROR):
            if not data:
                self._reader.eof = True
            return  # nothing more will be decoded; drop it
        self._guard(self._reader.feed, data)
        self._guard(self._check_pending)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer to recv_into (asyncio BufferedProtocol style);
        report what was written with buffer_updated()."""
        return self._guard(self._reader.get_buffer, sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._state in (State.CLOSED, State.ERROR):
            self._reader.discard()
            return
        self._guard(self._reader.buffer_updated, nbytes)
        self._guard(self._check_pending)

    def next_event(self):
        """The next event, NEED_DATA, or ConnectionClosed at end of stream."""
        if self._error is not None:
            raise self._error
        if self._held is not None:
            raise LocalProtocolError("internal", "next event asked for before the deferred "
                                     "data of the last Pages message was received")
        if self._state is State.CLOSED:
            self._reader.discard()
            return E.ConnectionClosed(clean=True) if self._reader.eof else NEED_DATA
        event = self._guard(self._reader.next_frame, self._frame_limit(), self._admit)
        if event is None:
            if not self._reader.eof:
                return NEED_DATA
            if self._reader.partial:
                self._fail(E.malformed("peer closed the connection in the middle of "
                                       "a frame"))
            clean = self._state is State.DONE
            self._state = State.CLOSED
            return E.ConnectionClosed(clean=clean)
        if type(event) is E.Pages and type(event.data) is E.DeferredData:
            self._guard(self._hold, event)
        else:
            self._guard(self._process, event, self.their_role)
        return event

    def deferred_done(self, digest: bytes) -> None:
        """The deferred data of the last Pages event was received; its
        xxh3-128 is ``digest``.  A mismatch is the peer's protocol error."""
        held, self._held = self._held, None
        if held is None:
            raise LocalProtocolError("internal", "deferred_done() with no deferred Pages")
        event, apply, new = held
        if digest != event.digest:
            self._fail(_digest_mismatch(event))
        self._reader.finish_deferred()
        if apply is not None:
            apply()
        self._state = new

    # -- internals -------------------------------------------------------------

    def _hold(self, ev: E.Pages) -> None:
        """Every check of a Pages message but its digest (_on_pages skips
        it for DeferredData); applied by deferred_done()."""
        apply, new = self._check(ev, self.their_role)
        self._held = (ev, apply, new)

    def _fail(self, exc: ProtocolError):
        self._error = exc
        self._state = State.ERROR
        self._reader.discard()
        raise exc

    def _guard(self, fn, *args):
        if self._error is not None:
            raise self._error
        try:
            return fn(*args)
        except LocalProtocolError:
            raise
        except ProtocolError as e:
            self._fail(e)

    def _check_pending(self) -> None:
        self._reader.check_pending(self._frame_limit(), self._admit)

    def _frame_limit(self) -> int:
        st = self._state
        lim = self._frame_limits.get(st)
        if lim is None:
            types = legal_types(self.their_role, st)
            lim = max((TYPE_LIMITS[t.type_name].max_frame for t in types), default=0)
            self._frame_limits[st] = lim
        return lim

    def _admit(self, type_name: str) -> None:
        if next_state(self.their_role, self._state, E.BY_NAME[type_name]) is None:
            raise _out_of_state(f"{self.their_role.value} may not send {type_name} "
                                f"in state {self._state.value}")

    def _check(self, ev: E.Event, sender: Role):
        """(what applies ``ev``, or None; the state after it), or raise.
        Changes nothing."""
        new = next_state(sender, self._state, type(ev))
        if new is None:
            raise _out_of_state(f"{sender.value} may not send {ev.type_name} in "
                                f"state {self._state.value}")
        check = getattr(self, "_on_" + ev.type_name.replace("-", "_"), None)
        return (check(ev, sender) if check is not None else None), new

    def _process(self, ev: E.Event, sender: Role) -> None:
        """Check ``ev`` in context, then apply it.  Nothing changes on error."""
        apply, new = self._check(ev, sender)
        if apply is not None:
            apply()
        self._state = new

    # Each _on_<type> checks and returns a closure that applies the change.

    def _on_hello(self, ev: E.Hello, sender: Role):
        if sender is self.our_role and not set(ev.versions) <= set(self._versions):
            raise ProtocolError("version", f"hello offers {sorted(ev.versions)} but this "
                                f"connection speaks {sorted(self._versions)}")
        common = set(ev.versions) & set(self._versions)
        if not common:
            raise ProtocolError(
                "version", f"no common protocol version: {sender.value} offers "
                f"{sorted(ev.versions)}, {sender.peer.value} speaks {sorted(self._versions)}")

        def apply():
            self.hello = ev
            self.version = max(common)
        return apply

    def _on_welcome(self, ev: E.Welcome, sender: Role):
        assert self.hello is not None
        if ev.version != self.version:
            raise ProtocolError(
                "version", f"welcome picks version {ev.version}; the highest version "
                f"both sides speak is {self.version}")
        extra = set(ev.capabilities) - set(self.hello.capabilities)
        if extra:
            raise E.malformed(f"welcome names capabilities that hello did not offer: "
                              f"{sorted(extra)[:4]}")

        def apply():
            self.welcome = ev
        return apply

    def _on_start(self, ev: E.Start, sender: Role):
        if ev.page_size != self.page_size:
            raise ProtocolError("unsupported", f"source pages are {ev.page_size} bytes, "
                                f"destination pages {self.page_size}: v1 needs equal sizes")

        def apply():
            self.start = ev
        return apply

    def _on_accept(self, ev: E.Accept, sender: Role):
        if ev.max_batch_pages * self.page_size > L.MAX_BATCH_BYTES:
            raise E.too_large(f"accept.max_batch_pages={ev.max_batch_pages} x "
                              f"{self.page_size}-byte pages exceeds {L.MAX_BATCH_BYTES} bytes")

        def apply():
            self.accept = ev
        return apply

    def _check_round(self, ev, what: str) -> None:
        if self.layout is None:
            raise _out_of_state(f"{what} before any layout")
        if ev.round != self.round:
            raise _out_of_state(f"{what} for round {ev.round} during round {self.round}")

    def _check_within(self, runs: PageRuns, what: str) -> None:
        """Every run lies inside one interval of migratable mappings
        (adjacent ones merged): PageRuns.contains, then, only to name the
        first run that does not, one searchsorted."""
        mig = self._migratable
        if mig.contains(runs):
            return
        i = np.searchsorted(mig.starts, runs.starts, side="right").astype(np.int64) - 1
        ok = i >= 0
        ok[ok] = runs.ends()[ok] <= mig.ends()[i[ok]]
        bad = int(np.flatnonzero(~ok)[0])
        raise ProtocolError(
            "bad-pages", f"{what} run at {int(runs.starts[bad]):#x} "
            f"({int(runs.counts[bad])} pages) lies outside the migratable "
            f"mappings of the round {self.round} layout")

    def _on_layout(self, ev: E.Layout, sender: Role):
        if ev.round != self.round:
            raise _out_of_state(f"layout for round {ev.round} during round {self.round}")
        # Mappings are page aligned, sorted and disjoint (checked when the
        # message was decoded); PageRuns merges the adjacent ones.
        ms = [m for m in ev.mappings if m.kind in E.MIGRATABLE_KINDS]
        starts = np.fromiter((m.start for m in ms), np.uint64, len(ms))
        ends = np.fromiter((m.end for m in ms), np.uint64, len(ms))
        migratable = PageRuns(starts, (ends - starts) >> np.uint64(PAGE_SHIFT))

        def apply():
            self.layout = ev
            self._migratable = migratable
        return apply

    def _on_pages(self, ev: E.Pages, sender: Role):
        self._check_round(ev, "pages")
        n = ev.runs.total_pages()
        if self.accept is not None and n > self.accept.max_batch_pages:
            raise E.too_large(f"pages batch of {n} pages exceeds the accepted "
                              f"{self.accept.max_batch_pages}")
        self._check_within(ev.runs, "pages")
        nbytes = n * self.page_size
        if self.total_bytes + nbytes > self.accept.quota_bytes:
            raise ProtocolError("quota", f"page data would reach "
                                f"{self.total_bytes + nbytes} bytes, over the "
                                f"destination's quota of {self.accept.quota_bytes}")
        if (sender is not self.our_role and type(ev.data) is not E.DeferredData
                and xxhash.xxh3_128_digest(ev.data) != ev.digest):
            raise _digest_mismatch(ev)

        def apply():
            self.round_pages += n
            self.total_pages += n
            self.total_bytes += nbytes
        return apply

    def _on_zeros(self, ev: E.Zeros, sender: Role):
        self._check_round(ev, ev.type_name)
        self._check_within(ev.runs, ev.type_name)

    _on_dropped = _on_zeros

    def _on_round_end(self, ev: E.RoundEnd, sender: Role):
        self._check_round(ev, "round-end")
        if ev.pages != self.round_pages:
            raise ProtocolError("bad-pages", f"round-end says round {ev.round} carried "
                                f"{ev.pages} pages, {self.round_pages} arrived")

        def apply():
            self.round += 1
            self.round_pages = 0
        return apply

    def _on_freeze(self, ev: E.Freeze, sender: Role):
        if ev.round != self.round:
            raise _out_of_state(f"freeze names round {ev.round}, the next round is "
                                f"{self.round}")

        def apply():
            self.round_pages = 0
        return apply

    def _on_final_end(self, ev: E.FinalEnd, sender: Role):
        self._check_round(ev, "final-end")
        if ev.has_figures and "final-figures" not in self.capabilities:
            raise E.malformed("final-end carries dirty_rate/pause_ms without the "
                              "final-figures capability in welcome")
        if ev.total_pages != self.total_pages:
            raise ProtocolError("bad-pages", f"final-end says {ev.total_pages} pages "
                                f"were sent in all, {self.total_pages} arrived")

    def _on_committed(self, ev: E.Committed, sender: Role):
        def apply():
            self.committed = ev
        return apply

    def _on_release(self, ev: E.Release, sender: Role):
        assert self.committed is not None
        if ev.image_id != self.committed.image_id:
            raise _out_of_state(f"release names image {ev.image_id!r}, but the prepared "
                                f"image of this conversation is {self.committed.image_id!r}")

    def _on_released(self, ev: E.Released, sender: Role):
        assert self.committed is not None
        if ev.image_id != self.committed.image_id:
            raise _out_of_state(f"released names image {ev.image_id!r}, but the image "
                                f"released in this conversation is "
                                f"{self.committed.image_id!r}")

        def apply():
            self.released = ev
        return apply

    def _on_withdraw(self, ev: E.Withdraw, sender: Role):
        def apply():
            self.withdraw = ev
        return apply

    def _on_withdrawn(self, ev: E.Withdrawn, sender: Role):
        assert self.withdraw is not None
        if ev.image_id != self.withdraw.image_id:
            raise _out_of_state(f"withdrawn names image {ev.image_id!r}, but this "
                                f"conversation withdraws {self.withdraw.image_id!r}")

    def _on_backlog(self, ev: E.Backlog, sender: Role):
        if "backlog" not in self.capabilities:
            raise _out_of_state("backlog without the backlog capability in welcome")
        if ev.round >= self.round:
            raise _out_of_state(f"backlog after round {ev.round}, but round-end of that "
                                f"round was not sent (next round is {self.round})")

    def _on_error(self, ev: E.Error, sender: Role):
        if sender is self.our_role and ev.code not in E.ERROR_CODES:
            raise E.malformed(f"error code {ev.code!r} is not one of the documented "
                              f"codes {sorted(E.ERROR_CODES)}")


class SourceConnection(_Connection):
    """The sending side: Hello, Start, layouts and pages, Freeze,
    CommitRequest, Release (or, to resolve a migration in doubt, Hello and
    Withdraw)."""
    our_role = Role.SOURCE


class DestConnection(_Connection):
    """The receiving side: Welcome, Accept, Committed, Released (or
    Withdrawn).  Checks every batch
    against the last Layout, the quota and its digest."""
    our_role = Role.DEST
