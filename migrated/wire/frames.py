"""Framing: preamble, length-prefixed msgpack bodies, bounded decoding.

Writer: ``encode_parts(event)`` -> list of buffers (the bulk field of a
Pages message is passed through untouched, so a transport can sendmsg()
it without joining).  Reader: ``FrameReader`` holds received bytes, checks
the peer's preamble byte by byte, checks every length prefix and message
type against the caller's limits *before* the body is buffered, and
decodes bodies with msgpack limits chosen per message type.
"""

from __future__ import annotations

import collections
import mmap
import re
import struct
import weakref
from dataclasses import dataclass
from typing import Callable

import msgpack

from migrated.errors import ProtocolError

from . import events as E
from . import limits as L

_LEN = struct.Struct(">I")


# -- per message type decoding limits ----------------------------------------

@dataclass(frozen=True)
class TypeLimits:
    max_frame: int      # body bytes
    max_map_len: int    # entries of any map
    max_array_len: int  # items of any array
    max_str_len: int    # bytes of any str (keys included)
    max_bin_len: int    # bytes of any bin
    max_maps: int       # maps in the whole body (top level included)
    max_arrays: int     # arrays in the whole body


_SMALL_STR = 32  # keys, the type name and tokens' ceiling below
_C = L.MAX_CONTROL_FRAME
TYPE_LIMITS: dict[str, TypeLimits] = {
    "hello": TypeLimits(_C, 5, L.MAX_CAPABILITIES, L.MAX_NODE_BYTES, 0, 1, 2),
    "welcome": TypeLimits(_C, 4, L.MAX_CAPABILITIES, L.MAX_NODE_BYTES, 0, 1, 1),
    # One more map entry than MAX_OPTIONS so that too many options is
    # reported as "too-large" by Start.from_wire, not as a msgpack error.
    "start": TypeLimits(L.MAX_START_FRAME, L.MAX_OPTIONS + 1, 0,
                        L.MAX_OPTION_STR_BYTES, L.MAX_CMDLINE_BYTES, 2, 0),
    "accept": TypeLimits(_C, 3, 0, _SMALL_STR, 0, 1, 0),
    "layout": TypeLimits(L.MAX_LAYOUT_FRAME, 10, 0, _SMALL_STR,
                         max(L.MAX_LAYOUT_PATH_BYTES, 8 * L.MAX_MAPPINGS), 1, 0),
    "pages": TypeLimits(L.MAX_PAGES_FRAME, 5, 0, _SMALL_STR, L.MAX_BATCH_BYTES, 1, 0),
    "zeros": TypeLimits(L.MAX_RUNS_FRAME, 3, 0, _SMALL_STR, 16 * L.MAX_RUNS, 1, 0),
    "dropped": TypeLimits(L.MAX_RUNS_FRAME, 3, 0, _SMALL_STR, 16 * L.MAX_RUNS, 1, 0),
    "round-end": TypeLimits(_C, 8, 0, _SMALL_STR, 0, 1, 0),
    "freeze": TypeLimits(_C, 2, 0, _SMALL_STR, 0, 1, 0),
    "final-end": TypeLimits(_C, 5, 0, _SMALL_STR, 0, 1, 0),
    "commit-request": TypeLimits(_C, 3, 0, _SMALL_STR, L.DIGEST_SIZE, 1, 0),
    "committed": TypeLimits(_C, 3, 0, L.MAX_DIGEST_STR_BYTES, 0, 1, 0),
    "release": TypeLimits(_C, 2, 0, L.MAX_TOKEN_BYTES, 0, 1, 0),
    "released": TypeLimits(_C, 2, 0, L.MAX_TOKEN_BYTES, 0, 1, 0),
    "withdraw": TypeLimits(_C, 2, 0, L.MAX_TOKEN_BYTES, 0, 1, 0),
    "withdrawn": TypeLimits(_C, 3, 0, L.MAX_TOKEN_BYTES, 0, 1, 0),
    "error": TypeLimits(_C, 3, 0, L.MAX_TEXT_BYTES, 0, 1, 0),
    "cancel": TypeLimits(_C, 2, 0, L.MAX_TEXT_BYTES, 0, 1, 0),
    "keepalive": TypeLimits(_C, 2, 0, _SMALL_STR, 0, 1, 0),
    "backlog": TypeLimits(_C, 4, 0, _SMALL_STR, 0, 1, 0),
}
assert set(TYPE_LIMITS) == set(E.BY_NAME)
assert max(t.max_frame for t in TYPE_LIMITS.values()) == L.MAX_FRAME


# -- writer --------------------------------------------------------------------

def _check_outgoing(event: E.Event) -> dict:
    """The wire map of ``event``, after the reader's own checks ran on it."""
    if not isinstance(event, E.Event) or type(event) not in E.MESSAGE_TYPES:
        raise E.malformed(f"cannot send {type(event).__name__}: not a protocol message")
    try:
        wire = event.to_wire()
    except ProtocolError:
        raise
    except (TypeError, ValueError, OverflowError, AttributeError) as e:
        raise E.malformed(f"cannot encode {event.type_name}: {e}") from None
    type(event).check_wire(dict(wire))
    return wire


def bin_header(n: int) -> bytes:
    """msgpack bin 8/16/32 header for ``n`` bytes (smallest form)."""
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_parts(event: E.Event) -> list:
    """Length prefix + body as a list of buffers; bulk data is not copied."""
    wire = _check_outgoing(event)
    limits = TYPE_LIMITS[event.type_name]
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    bulk_key = event.bulk_field
    bulk = wire.pop(bulk_key) if bulk_key else None
    try:
        packer.pack_map_header(len(wire) + (1 if bulk_key else 0))
        for k, v in wire.items():
            packer.pack(k)
            packer.pack(v)
        if bulk_key:
            packer.pack(bulk_key)
    except (TypeError, ValueError, OverflowError) as e:
        raise E.malformed(f"cannot encode {event.type_name}: {e}") from None
    head = packer.bytes()
    if bulk_key:
        head += bin_header(memoryview(bulk).nbytes)
    body_len = len(head) + (memoryview(bulk).nbytes if bulk_key else 0)
    if body_len > limits.max_frame:
        raise E.too_large(f"{event.type_name} frame would be {body_len} bytes, "
                          f"limit {limits.max_frame}")
    first = _LEN.pack(body_len) + head
    return [first, bulk] if bulk_key else [first]


def encode(event: E.Event) -> bytes:
    return b"".join(encode_parts(event))


# -- decoding ------------------------------------------------------------------

# Bytes of the entry count after a map16 / map32 header byte.
_MAP_WIDTH = {0xDE: 2, 0xDF: 4}

# The most bytes peek_type() reads: a map32 header (5), the key "type" as a
# str32 (5 + 4) and the name as a str32 (5 + MAX_TYPE_NAME_BYTES).  SPEC.md
# 4 states it (51).
MAX_TYPE_PEEK_BYTES = 5 + (5 + 4) + (5 + L.MAX_TYPE_NAME_BYTES)


def peek_type(body) -> str | None:
    """The message type from the first bytes of a body, None if more bytes
    are needed.  The body must be a map whose first key is "type"."""
    n = len(body)
    if n < 1:
        return None
    b0 = body[0]
    if 0x81 <= b0 <= 0x8F:
        pos = 1
    elif b0 in _MAP_WIDTH:
        # map16 / map32: any map form is accepted (SPEC.md 4.1); the entry
        # count is bounded per type when the body is decoded.
        pos = 1 + _MAP_WIDTH[b0]
        if n < pos:
            return None
        if not any(body[1:pos]):
            raise E.malformed("message body is an empty map")
    else:
        raise E.malformed(f"message body must be a msgpack map (first byte {b0:#04x})")
    key, pos = _peek_str(body, pos, 4)
    if key is None:
        return None
    if key != b"type":
        raise E.malformed('the first key of a message must be "type"')
    name, pos = _peek_str(body, pos, L.MAX_TYPE_NAME_BYTES)
    if name is None:
        return None
    try:
        return name.decode("ascii")
    except UnicodeDecodeError:
        raise E.malformed("message type is not ASCII") from None


def _peek_str(body, pos: int, max_len: int):
    n = len(body)
    if pos >= n:
        return None, pos
    b = body[pos]
    if 0xA0 <= b <= 0xBF:
        ln, pos = b & 0x1F, pos + 1
    elif b in (0xD9, 0xDA, 0xDB):
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}[b]
        if pos + 1 + width > n:
            return None, pos
        ln = int.from_bytes(body[pos + 1:pos + 1 + width], "big")
        pos += 1 + width
    else:
        raise E.malformed(f'"type" key and value must be msgpack strings (byte {b:#04x})')
    if ln > max_len:
        raise E.malformed(f"string of {ln} bytes where at most {max_len} fit")
    if pos + ln > n:
        return None, pos
    return bytes(body[pos:pos + ln]), pos + ln


_LIMIT_RE = re.compile(r"exceeds max_(\w+?)_len\((\d+)\)")


def _reject_ext(code, data):
    raise E.malformed(f"msgpack extension type {code} is not allowed")


def decode_body(type_name: str, body) -> E.Event:
    """Decode one complete body (bytes or memoryview) of a known type."""
    limits = TYPE_LIMITS[type_name]
    counts = [0, 0]

    def on_map(pairs):
        counts[0] += 1
        if counts[0] > limits.max_maps:
            raise E.malformed(f"{type_name} message nests more maps than it may")
        d = dict(pairs)
        if len(d) != len(pairs):
            raise E.malformed(f"{type_name} message has a duplicate map key")
        return d

    def on_array(items):
        counts[1] += 1
        if counts[1] > limits.max_arrays:
            raise E.malformed(f"{type_name} message nests more arrays than it may")
        return items

    try:
        obj = msgpack.unpackb(
            body, raw=False, use_list=False, strict_map_key=True,
            object_pairs_hook=on_map, list_hook=on_array, ext_hook=_reject_ext,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len, max_map_len=limits.max_map_len,
            max_ext_len=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack reports everything as ValueError & co.
        msg = str(e)
        m = _LIMIT_RE.search(msg)
        # A size above a non-zero limit is "too-large"; a zero limit (or the
        # map limit) means that kind of value or field is not allowed at all.
        if m and m.group(1) in ("str", "bin", "array") and m.group(2) != "0":
            raise E.too_large(f"{type_name} message: {msg}") from None
        raise E.malformed(f"{type_name} message is not valid msgpack: "
                          f"{type(e).__name__}: {msg[:200]}") from None
    if type(obj) is not dict or obj.get("type") != type_name:
        raise E.malformed(f"{type_name} message body is not the expected map")
    return E.BY_NAME[type_name].from_wire(obj)


# -- the Pages fast path --------------------------------------------------------

_PAGES_KEYS = frozenset({b"type", b"round", b"runs", b"digest", b"data"})
_PAGES_FIELDS = len(_PAGES_KEYS)
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_BIN_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4}


# Returned by _pages_fields for a head that will never do (see there).
_NO_HEAD = object()


def _pages_fields(body, limits: TypeLimits, borrow: bool, total: int | None = None):
    """The fields of a ``pages`` body in the one shape senders use (a map of
    the five fields, string keys, unsigned round, bin values), parsed
    without msgpack so that ``data`` is not copied: it is a slice of
    ``body`` when ``borrow``, else one copy.  Returns None for anything
    else -- other int forms, duplicate or unknown keys, a limit crossed,
    trailing bytes -- and the caller then decodes the body with msgpack,
    which gives exactly the generic error (or result) for it.  Bounded: at
    most five fields are looked at.

    With ``total`` (the whole body's length), ``body`` is only its first
    bytes and only the head is wanted: ``data`` must then be the last field,
    running to the end of the body, and comes back as DeferredData holding
    the data bytes that ``body`` has.  None: more bytes are needed;
    ``_NO_HEAD``: the body is not in that shape (decode it whole)."""
    head = total is not None
    n = len(body)
    if n < 1:
        return None
    b0 = body[0]
    # In head mode, running out of bytes means "wait"; anything else that
    # is not the usual shape means "never".
    short, odd = (None, _NO_HEAD) if head else (None, None)
    if b0 == 0x80 | _PAGES_FIELDS:
        pos = 1
    elif b0 == 0xDE and n >= 3 and body[1] == 0 and body[2] == _PAGES_FIELDS:
        pos = 3
    elif b0 == 0xDE and n < 3:
        return short
    else:
        return odd
    out: dict = {}
    for _ in range(_PAGES_FIELDS):
        if pos >= n:
            return short
        b = body[pos]
        if not 0xA0 <= b <= 0xBF:           # keys are short fixstr
            return odd
        ln = b & 0x1F
        if pos + 1 + ln >= n:
            return short
        key = bytes(body[pos + 1:pos + 1 + ln])
        pos += 1 + ln
        if key not in _PAGES_KEYS or key in out:
            return odd
        b = body[pos]
        if key == b"type":
            if pos + 6 > n:
                return short
            if b != 0xA5 or bytes(body[pos + 1:pos + 6]) != b"pages":
                return odd
            value, pos = "pages", pos + 6
        elif key == b"round":
            if b <= 0x7F:
                value, pos = b, pos + 1
            elif b in _UINT_WIDTH:
                w = _UINT_WIDTH[b]
                if pos + 1 + w > n:
                    return short
                value = int.from_bytes(body[pos + 1:pos + 1 + w], "big")
                pos += 1 + w
            else:
                return odd
        else:
            w = _BIN_WIDTH.get(b)
            if w is None:
                return odd
            if pos + 1 + w > n:
                return short
            ln = int.from_bytes(body[pos + 1:pos + 1 + w], "big")
            pos += 1 + w
            if ln > limits.max_bin_len:
                return odd
            if head and key == b"data":
                # The last field, to the end of the body: what follows in
                # the socket is page data only.
                if len(out) != _PAGES_FIELDS - 1 or pos + ln != total:
                    return odd
                value = E.DeferredData(ln, bytes(body[pos:n]))
                out[key] = value
                pos = n
                break
            if pos + ln > n:
                return short
            view = body[pos:pos + ln]
            value = view if (borrow and key == b"data") else bytes(view)
            pos += ln
        out[key] = value
    if pos != n:
        return odd
    return {"type": out[b"type"], "round": out[b"round"], "runs": out[b"runs"],
            "digest": out[b"digest"], "data": out[b"data"]}


# -- reader --------------------------------------------------------------------

# Receive buffers a hand-over reader keeps for reuse (given back by their
# owners): reused buffers are warm, a new one costs a page fault per page.
MAX_SPARE_BUFFERS = 8

# A buffer made for a big frame is sized to it, rounded up to this, where
# small ones double (FrameReader._space).  Every page batch (4 MiB of data
# behind a head of at most 16 KiB) then fits in every spare, so spares are
# reused; doubling past the frame made an 8 MiB buffer, and dropped a
# spare, each time a batch's head was a few bytes longer than the one
# before (9 buffers, 52 MiB of new memory per 512 MiB round over TLS,
# against 6 or 7 of 4.25 MiB now).
BIG_BUFFER_GRAIN = 256 * 1024


class ReceiveBuffer(mmap.mmap):
    """A hand-over FrameReader's receive buffer (anonymous memory of its own,
    returned to the system when the last reference goes).  The reader gives
    the whole buffer of a big Pages frame to the event's consumer instead of
    lending it (see FrameReader): ``handed`` is then true, the event's
    ``data`` stays valid, and the consumer calls ``give_back()`` once no view
    of it is used any more, so the reader can receive into it again."""

    def __new__(cls, size: int, spares: collections.deque | None = None):
        # Private: a plain anonymous mapping is shared memory (shmem), whose
        # pages cost more to fault in and count as shared.
        self = super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.handed = False
        # Weak: a buffer still out when its reader is gone must not keep
        # the reader's spares (and their memory) alive, nor make a cycle.
        self._spares = None if spares is None else weakref.ref(spares)
        return self

    def give_back(self) -> None:
        """Return the buffer to its reader (thread-safe); the data in it is
        overwritten from then on.  Idempotent."""
        if not self.handed:
            return
        self.handed = False
        spares = self._spares() if self._spares is not None else None
        if spares is not None and len(spares) < MAX_SPARE_BUFFERS:
            spares.append(self)


def handed_over(data) -> ReceiveBuffer | None:
    """The buffer a Pages event's ``data`` was handed over in (the caller
    owns it until ``give_back()``), or None: bytes, or a loan that ends at
    the reader's next call."""
    try:
        owner = getattr(data, "obj", None)
    except ValueError:          # a released loan
        return None
    if isinstance(owner, ReceiveBuffer) and owner.handed:
        return owner
    return None


class FrameReader:
    """Buffers received bytes and yields decoded messages one at a time.

    Bytes arrive by ``feed(data)`` (one copy into our buffer) or by
    ``get_buffer(n)`` + ``buffer_updated(n)`` (recv_into straight into it).
    While a large frame is being received, ``get_buffer`` offers no more
    than the rest of that frame, so it is assembled in place and never
    moved.  The bulk data of a Pages message is copied exactly once more,
    out of the buffer into the event's ``bytes`` -- or, with
    ``borrow=True``, not at all: the event's ``data`` is then a memoryview
    of the receive buffer, valid only until the next call on this reader
    (it is released then, so a late use fails loudly instead of reading
    other bytes).

    ``hand_over=True`` (implies ``borrow``): a Pages frame of at least
    ``FRAME_CAP_MIN`` bytes that ends the received bytes -- every big batch,
    since get_buffer() stops at its end -- is not lent but handed over: the
    reader takes a spare buffer for what comes next, and the event's
    ``data`` stays valid until the consumer gives the buffer back
    (``handed_over(data).give_back()``).  A writer thread can then write
    the batch out while the next one is received, without a copy.  Smaller
    batches are lent as with ``borrow``.  Memory stays bounded by what the
    consumer holds: at most ``MAX_SPARE_BUFFERS`` are kept for reuse.

    ``direct_min=N`` (N > 0): a Pages frame with at least N bytes of data
    still to come is returned as soon as its head is here, with ``data`` a
    ``DeferredData`` (the data bytes already buffered, and the count): the
    caller moves the rest from its socket to where it belongs (a file), and
    calls ``finish_deferred()`` before anything else.  So that little of
    the data lands in this buffer first, no read goes more than
    ``DIRECT_HEAD_READ`` bytes past the end of the frame being received
    (nor past the head of a Pages frame that may be deferred).  Only frames whose data is the last field qualify (as every
    sender writes them); others are received whole, as usual.
    """

    _INITIAL = 64 * 1024

    # get_buffer() stops at the end of the frame being received when that
    # frame is at least this big: a page batch lands in place and the next
    # frame starts at the beginning of the buffer (nothing is ever moved),
    # while small frames are still read many per call.
    FRAME_CAP_MIN = 64 * 1024

    # With direct_min: the most read between frames, and while the head of
    # a big Pages frame is incomplete.  A head is at most its runs (16 bytes
    # per page of a batch: 16 KiB) and a few dozen bytes.
    DIRECT_HEAD_READ = 64 * 1024

    def __init__(self, borrow: bool = False, hand_over: bool = False,
                 direct_min: int = 0) -> None:
        self.borrow = borrow or hand_over
        self.hand_over = hand_over
        self.direct_min = direct_min
        self._head_wanted = False   # a big Pages frame whose head may be taken
        self._deferred = False      # its data is being moved by the caller
        self._spares: collections.deque = collections.deque()
        self._lent: memoryview | None = None   # borrowed view handed out
        self._buf = self._new_buffer(self._INITIAL)
        self._start = 0          # first unconsumed byte
        self._end = 0            # one past the last received byte
        self._preamble_left = L.PREAMBLE_SIZE
        self._type: str | None = None   # type of the frame being received
        self._body_len = -1
        self.eof = False
        # Bytes of the frames returned so far (length prefixes included;
        # a deferred Pages frame counts whole), and of the last one.
        self.frame_bytes = 0
        self.last_frame_bytes = 0

    # -- input -----------------------------------------------------------------

    def _new_buffer(self, size: int):
        if not self.hand_over:
            return bytearray(size)
        while True:
            try:
                spare = self._spares.pop()
            except IndexError:
                return ReceiveBuffer(size, self._spares)
            if len(spare) >= size:
                return spare
            # too small for this frame: let it go, a fitting one is made

    def _reclaim(self) -> None:
        """End the loan of the last borrowed Pages data (see class doc)."""
        lent, self._lent = self._lent, None
        if lent is not None:
            try:
                lent.release()
            except BufferError:
                pass   # someone still exports it: it stays readable, unpromised

    def _space(self, n: int) -> None:
        live = self._end - self._start
        if live + n > L.RECEIVE_BUFFER_LIMIT:
            raise E.too_large(f"{live + n} unconsumed received bytes, limit "
                              f"{L.RECEIVE_BUFFER_LIMIT} (call next_event() "
                              "until NEED_DATA between receive_data() calls)")
        cap = len(self._buf)
        if self._end + n <= cap:
            return
        if live + n <= cap and self._start:
            # Same-size slice assignment never resizes, so it is allowed even
            # while a caller still holds a memoryview from get_buffer().
            self._buf[:live] = self._buf[self._start:self._end]
        else:
            need = live + n
            if need < self.FRAME_CAP_MIN:
                size = max(2 * cap, need)
            else:
                # Doubling still, so a frame fed in small pieces is not
                # copied over once per piece -- but never past the frame
                # being received (it starts at _start) once its length is
                # known, so a batch gets a buffer of its own size.  Growth
                # stays driven by bytes received, not by lengths declared.
                grow = 2 * cap
                if self._body_len >= 0:
                    grow = min(grow, L.LENGTH_PREFIX_SIZE + self._body_len)
                need = max(need, grow)
                size = -(-need // BIG_BUFFER_GRAIN) * BIG_BUFFER_GRAIN
            new = self._new_buffer(size)
            new[:live] = self._buf[self._start:self._end]
            self._buf = new
        self._start, self._end = 0, live

    def feed(self, data) -> None:
        if self.eof:
            raise RuntimeError("receive_data() after end of stream")
        self._reclaim()
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        n = src.nbytes
        if n == 0:
            self.eof = True
            return
        self._space(n)
        with memoryview(self._buf) as dst:  # 3x faster than bytearray slicing
            dst[self._end:self._end + n] = src
        self._end += n
        self._check_preamble()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self.eof:
            raise RuntimeError("get_buffer() after end of stream")
        if self._deferred:
            raise RuntimeError("get_buffer() before finish_deferred()")
        self._reclaim()
        n = sizehint if sizehint > 0 else self._INITIAL
        rest = 0        # bytes of the frame being received still to come
        if self._body_len >= 0 and not self._head_wanted:
            rest = self._start + L.LENGTH_PREFIX_SIZE + self._body_len - self._end
        if self.direct_min:
            # Never far past a frame: the next one may be a big Pages frame
            # whose data should stay in the socket.
            n = min(n, max(rest, self.DIRECT_HEAD_READ))
        elif self._body_len >= self.FRAME_CAP_MIN and rest > 0:
            n = min(n, rest)
        elif self.hand_over:
            # Between frames, or in a small one: at most FRAME_CAP_MIN past
            # its end.  A big batch behind it then starts in this buffer and
            # ends at its end (the cap above), so it can be handed over;
            # one read of a whole batch and the start of the next (a
            # receiver behind its sender finds both in the socket) would
            # leave it to be copied.
            n = min(n, rest + self.FRAME_CAP_MIN)
        n = max(1, min(n, L.RECEIVE_BUFFER_LIMIT - (self._end - self._start)))
        self._space(n)
        return memoryview(self._buf)[self._end:self._end + n]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        if self._end + nbytes > len(self._buf):
            raise RuntimeError("buffer_updated() beyond the buffer handed out")
        self._end += nbytes
        self._check_preamble()

    def discard(self) -> None:
        """Forget everything buffered (the connection is closed)."""
        self._reclaim()
        self._start = self._end = 0
        self._type, self._body_len = None, -1
        self._head_wanted = self._deferred = False

    def finish_deferred(self) -> None:
        """The data of the Pages frame returned with DeferredData was moved
        by the caller: go on with the next frame."""
        if not self._deferred:
            raise RuntimeError("finish_deferred() with no deferred page data")
        # Nothing past the frame's head and first data bytes was buffered.
        self._start = self._end = 0
        self._type, self._body_len = None, -1
        self._head_wanted = self._deferred = False

    def _check_preamble(self) -> None:
        if not self._preamble_left:
            return
        done = L.PREAMBLE_SIZE - self._preamble_left
        avail = min(self._end - self._start, self._preamble_left)
        got = bytes(self._buf[self._start:self._start + avail])
        want = L.PREAMBLE[done:done + avail]
        if got != want:
            magic_len = len(L.PREAMBLE_MAGIC)
            if done + avail > magic_len and got[:magic_len - done] == want[:magic_len - done]:
                raise ProtocolError(
                    "version", f"peer speaks framing version "
                    f"{got[magic_len - done]} of {L.PREAMBLE_MAGIC.decode()}, "
                    f"we speak {L.FRAMING_VERSION}")
            if done == 0 and got[:2] == b"\x16\x03":
                # A TLS record header (handshake, version 3.x): a peer
                # whose daemon uses TLS talking to one run with --insecure.
                raise E.malformed("peer started a TLS handshake, but this end speaks "
                                  "plaintext (--insecure): run both daemons with TLS, "
                                  "or both with --insecure")
            raise E.malformed(f"peer did not start with the {L.PREAMBLE!r} preamble "
                              f"(got {got!r}): not a migrated peer")
        self._start += avail
        self._preamble_left -= avail

    # -- frames ----------------------------------------------------------------

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete preamble or frame are buffered."""
        return (self._end > self._start
                or 0 < self._preamble_left < L.PREAMBLE_SIZE)

    @property
    def pending_length(self) -> int | None:
        """Body length of the frame being received once its length prefix
        is here and checked, None between frames (the I/O layer gives a
        frame time by its size: transport.Channel)."""
        return self._body_len if self._body_len >= 0 else None

    @property
    def received_anything(self) -> bool:
        return self._preamble_left < L.PREAMBLE_SIZE

    def check_pending(self, max_frame: int, admit: Callable[[str], None]) -> None:
        """Check the length and type of the frame being received as far as
        bytes allow, without decoding it."""
        self.next_frame(max_frame, admit, decode=False)

    def next_frame(self, max_frame: int, admit: Callable[[str], None],
                   decode: bool = True) -> E.Event | None:
        """Decode the next complete frame, or None if it is not all here.

        ``max_frame`` bounds the length prefix; ``admit(type_name)`` raises
        if that type is not legal now.  Both run as soon as their bytes are
        here, so an oversized or unwanted frame is refused before its body.
        """
        if self._deferred:
            raise RuntimeError("next frame asked for before finish_deferred()")
        if decode:
            self._reclaim()
        if self._preamble_left:
            return None
        avail = self._end - self._start
        if self._body_len < 0:
            if avail < L.LENGTH_PREFIX_SIZE:
                return None
            (n,) = _LEN.unpack_from(self._buf, self._start)
            if n > max_frame:
                raise E.too_large(f"peer declared a {n}-byte frame, limit {max_frame} "
                                  "in this state")
            if n == 0:
                raise E.malformed("peer sent an empty frame")
            self._body_len = n
        n = self._body_len
        body_at = self._start + L.LENGTH_PREFIX_SIZE
        have = min(avail - L.LENGTH_PREFIX_SIZE, n)
        if self._type is None:
            with memoryview(self._buf) as mv:
                t = peek_type(mv[body_at:body_at + have])
            if t is None:
                if have == n:
                    raise E.malformed("frame ends inside its message type")
                return None
            limits = TYPE_LIMITS.get(t)
            if limits is None:
                raise E.malformed(f"unknown message type {t[:40]!r}")
            if n > limits.max_frame:
                raise E.too_large(f"peer declared a {n}-byte {t} frame, limit "
                                  f"{limits.max_frame}")
            admit(t)
            self._type = t
            self._head_wanted = (t == "pages" and 0 < self.direct_min <= n)
        if have < n and self._head_wanted:
            return self._pages_head(body_at, have, n) if decode else None
        if have < n or not decode:
            return None
        if self._type == "pages":
            event = self._decode_pages(body_at, n)
        else:
            with memoryview(self._buf) as mv:
                body = mv[body_at:body_at + n]
                try:
                    event = decode_body(self._type, body)
                finally:
                    body.release()
        self._start = body_at + n
        if self._start == self._end:
            self._start = self._end = 0
        self._type, self._body_len = None, -1
        self._head_wanted = False
        self._count_frame(n)
        return event

    def _count_frame(self, body_len: int) -> None:
        self.last_frame_bytes = L.LENGTH_PREFIX_SIZE + body_len
        self.frame_bytes += self.last_frame_bytes

    def _pages_head(self, body_at: int, have: int, n: int) -> E.Event | None:
        """The head of a big Pages frame, its data deferred, once the head
        is here (see class doc); None while it is not, or never will be."""
        with memoryview(self._buf) as mv:
            body = mv[body_at:body_at + have]
            try:
                fields = _pages_fields(body, TYPE_LIMITS["pages"], False, total=n)
            finally:
                body.release()
        if fields is _NO_HEAD:
            self._head_wanted = False        # received whole, as usual
            return None
        if fields is None:
            return None
        if fields["data"].nbytes - len(fields["data"].prefix) < self.direct_min:
            self._head_wanted = False        # little left: not worth it
            return None
        event = E.Pages.from_wire(fields)
        self._deferred = True
        self._count_frame(n)                 # the whole frame: its data is on its way
        return event

    def _decode_pages(self, body_at: int, n: int) -> E.Event:
        limits = TYPE_LIMITS["pages"]
        mv = memoryview(self._buf)
        body = mv[body_at:body_at + n]
        try:
            fields = _pages_fields(body, limits, self.borrow)
            if fields is None:
                return decode_body("pages", body)
            event = E.Pages.from_wire(fields)
        finally:
            # Borrowed data keeps its own slice; ours are released now.
            body.release()
            mv.release()
        if self.hand_over and n >= self.FRAME_CAP_MIN and self._end == body_at + n:
            # Nothing after the frame is buffered: give the whole buffer away
            # and go on in a spare (next_frame() resets the offsets).
            old = self._buf
            old.handed = True
            self._buf = self._new_buffer(len(old))
        elif self.borrow:
            self._lent = fields["data"]
        return event
