"""The messages of protocol v1 as small immutable classes.

Each message class knows its wire name, how it turns into the msgpack map
sent on the wire (``to_wire``) and how a decoded map becomes an instance
(``from_wire``).  ``from_wire`` is the single place where field types and
bounds are checked; the sending side runs it too, so we never put on the
wire what we would refuse to read.  Context-dependent checks (state, round,
layout, quota, digest) live in connection.py.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import xxhash

from migrated.errors import ProtocolError
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

from . import limits as L

# -- error codes ---------------------------------------------------------------

# Codes an Error message may carry (SPEC.md section "Error codes").  A peer
# may receive codes it does not know (any token); it must treat them like
# "internal".  We only send these.
ERROR_CODES = frozenset({
    "malformed",     # not msgpack, wrong type, missing/unknown field, bad value
    "too-large",     # a length, count or size above a limit
    "out-of-state",  # message not legal now (state machine, round order)
    "version",       # preamble or no common protocol version
    "unsupported",   # valid request we cannot serve (e.g. page size)
    "auth",          # peer not allowed
    "quota",         # more page data than Accept.quota_bytes
    "disk-full",     # destination ran out of space
    "bad-pages",     # runs outside the layout, counts that do not add up
    "digest",        # batch or image digest mismatch
    "busy",          # destination refuses more migrations now
    "cancelled",     # operator cancelled
    "timeout",       # a peer stayed silent too long
    "internal",      # a bug or unexpected local failure
})

MIGRATABLE_KINDS = frozenset({"anon", "file", "shared-anon", "vdso"})
# Wire codes of MappingInfo.kind (one byte each in Layout.kinds).
KINDS = ("anon", "file", "shared-anon", "shared-file", "vdso", "skip")
_KIND_CODE = {k: i for i, k in enumerate(KINDS)}

# MappingInfo.flags bits.
MAP_FLAG_DELETED = 1   # backing file was deleted ("(deleted)" in maps)
MAP_FLAG_HEAP = 2      # [heap]
MAP_FLAG_STACK = 4     # [stack]
MAP_FLAGS_KNOWN = MAP_FLAG_DELETED | MAP_FLAG_HEAP | MAP_FLAG_STACK

# Layout.perms bits (one byte per mapping).
PERM_R, PERM_W, PERM_X, PERM_SHARED = 1, 2, 4, 8

_TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def malformed(message: str) -> ProtocolError:
    return ProtocolError("malformed", message)


def too_large(message: str) -> ProtocolError:
    return ProtocolError("too-large", message)


# -- field readers (wire value -> python value, checked) ----------------------

class _Fields:
    """Reads and checks the fields of one decoded map, then insists every
    key was used (unknown fields are rejected, see SPEC.md)."""

    __slots__ = ("d", "t", "used")

    def __init__(self, d: dict, type_name: str):
        self.d = d
        self.t = type_name
        self.used = {"type"}

    def _get(self, key: str, optional: bool = False):
        self.used.add(key)
        if key not in self.d:
            if optional:
                return None
            raise malformed(f"{self.t} message lacks required field {key!r}")
        return self.d[key]

    def done(self) -> None:
        extra = [k for k in self.d if k not in self.used]
        if extra:
            raise malformed(f"{self.t} message has unknown field(s) "
                            f"{', '.join(repr(k) for k in extra[:4])}")

    def int(self, key: str, lo: int, hi: int, v=None) -> int:
        if v is None:
            v = self._get(key)
        if type(v) is not int:  # bool is not an int here
            raise malformed(f"{self.t}.{key} must be an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise malformed(f"{self.t}.{key}={v} is outside [{lo}, {hi}]")
        return v

    def optional_number(self, key: str) -> float | None:
        if key not in self.d:
            self.used.add(key)
            return None
        return self.number(key)

    def number(self, key: str) -> float:
        v = self._get(key)
        if type(v) not in (int, float):
            raise malformed(f"{self.t}.{key} must be a number, got {type(v).__name__}")
        f = float(v)
        if not (math.isfinite(f) and 0.0 <= f <= L.MAX_FIGURE):
            raise malformed(f"{self.t}.{key}={v!r} is not a finite number in "
                            f"[0, {L.MAX_FIGURE:.0f}]")
        return f

    def _str(self, key: str, v, max_bytes: int) -> str:
        if type(v) is not str:
            raise malformed(f"{self.t}.{key} must be a string, got {type(v).__name__}")
        if len(v) > max_bytes or len(v.encode("utf-8", "surrogatepass")) > max_bytes:
            raise too_large(f"{self.t}.{key} is longer than {max_bytes} bytes")
        return v

    def token(self, key: str, max_bytes: int = L.MAX_TOKEN_BYTES, v=None) -> str:
        if v is None:
            v = self._get(key)
        s = self._str(key, v, max_bytes)
        if not _TOKEN_RE.match(s):
            raise malformed(f"{self.t}.{key}={s[:80]!r} is not a token "
                            "([A-Za-z0-9][A-Za-z0-9._:-]*)")
        return s

    def name(self, key: str) -> str:
        s = self._str(key, self._get(key), L.MAX_NODE_BYTES)
        if not s or _CONTROL_RE.search(s):
            raise malformed(f"{self.t}.{key} must be non-empty without control characters")
        return s

    def text(self, key: str) -> str:
        return self._str(key, self._get(key), L.MAX_TEXT_BYTES)

    def bin(self, key: str, max_bytes: int, optional: bool = False):
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if type(v) is not bytes:
            raise malformed(f"{self.t}.{key} must be binary, got {type(v).__name__}")
        if len(v) > max_bytes:
            raise too_large(f"{self.t}.{key} is {len(v)} bytes, limit {max_bytes}")
        return v

    def path(self, key: str) -> str:
        b = self.bin(key, L.MAX_PATH_BYTES)
        if b"\0" in b:
            raise malformed(f"{self.t}.{key} contains a NUL byte")
        return b.decode("utf-8", "surrogateescape")

    def array(self, key: str, max_items: int) -> tuple:
        v = self._get(key)
        if type(v) not in (tuple, list):  # list: our own outgoing message
            raise malformed(f"{self.t}.{key} must be an array, got {type(v).__name__}")
        if len(v) > max_items:
            raise too_large(f"{self.t}.{key} has {len(v)} items, limit {max_items}")
        return v

    def tokens(self, key: str, max_items: int) -> tuple[str, ...]:
        items = tuple(self.token(key, v=x) for x in self.array(key, max_items))
        if len(set(items)) != len(items):
            raise malformed(f"{self.t}.{key} lists an entry twice")
        return items

    def column(self, key: str, dtype: str, n: int | None) -> np.ndarray:
        """A bin holding packed little-endian integers of ``dtype``."""
        width = np.dtype(dtype).itemsize
        b = self.bin(key, L.MAX_MAPPINGS * width)
        if len(b) % width:
            raise malformed(f"{self.t}.{key} is {len(b)} bytes, not a multiple of {width}")
        a = np.frombuffer(b, dtype=dtype)
        if n is not None and a.size != n:
            raise malformed(f"{self.t}.{key} has {a.size} entries, starts has {n}")
        return a

    def runs(self, key: str) -> PageRuns:
        return runs_from_wire(self.bin(key, L.MAX_RUNS * 16), f"{self.t}.{key}")


_ONE_RUN = struct.Struct("<QQ")


def runs_from_wire(b: bytes, ctx: str) -> PageRuns:
    """Little-endian (address, count) u64 pairs -> PageRuns, checked.

    Runs must be page aligned, non-empty, inside the user address space,
    sorted and non-overlapping (adjacent runs are allowed and merged).
    """
    if len(b) % 16:
        raise malformed(f"{ctx} is {len(b)} bytes, not a multiple of 16")
    n = len(b) // 16
    if n == 0:
        raise malformed(f"{ctx} is empty: a batch names at least one run")
    if n > L.MAX_RUNS:
        raise too_large(f"{ctx} has {n} runs, limit {L.MAX_RUNS}")
    if n == 1:
        # One run (most page batches): the same checks on two Python ints,
        # a tenth of the numpy calls.  Anything wrong is left to the checks
        # below, which say what.
        start, count = _ONE_RUN.unpack(b)
        if (count and not start & (PAGE_SIZE - 1)
                and start + (count << PAGE_SHIFT) <= L.USER_ADDRESS_LIMIT):
            return PageRuns(np.array([start], np.uint64), np.array([count], np.uint64),
                            normalized=True)
    pairs = np.frombuffer(b, dtype="<u8").reshape(n, 2)
    starts = pairs[:, 0].astype(np.uint64)
    counts = pairs[:, 1].astype(np.uint64)
    limit = np.uint64(L.USER_ADDRESS_LIMIT)
    if (counts == 0).any():
        raise malformed(f"{ctx} has a run of zero pages")
    if (starts & np.uint64(PAGE_SIZE - 1)).any():
        raise malformed(f"{ctx} has a run start that is not page aligned")
    if (starts >= limit).any() or (counts > (limit >> np.uint64(PAGE_SHIFT))).any():
        raise malformed(f"{ctx} has a run beyond the user address space")
    ends = starts + (counts << np.uint64(PAGE_SHIFT))
    if (ends > limit).any():
        raise malformed(f"{ctx} has a run beyond the user address space")
    if n > 1:
        if (ends[:-1] > starts[1:]).any():
            raise malformed(f"{ctx} runs are not sorted or overlap")
        if (ends[:-1] == starts[1:]).any():
            return PageRuns(starts, counts)  # adjacent: let PageRuns merge
    return PageRuns(starts, counts, normalized=True)


def runs_to_wire(runs: PageRuns) -> bytes:
    if not isinstance(runs, PageRuns):
        raise malformed(f"runs must be a PageRuns, got {type(runs).__name__}")
    out = np.empty((len(runs), 2), dtype="<u8")
    out[:, 0] = runs.starts
    out[:, 1] = runs.counts
    return out.tobytes()


def _path_bytes(s: str) -> bytes:
    if type(s) is not str:
        raise malformed(f"path must be a str, got {type(s).__name__}")
    return s.encode("utf-8", "surrogateescape")


def _tup(v) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else v


# -- events --------------------------------------------------------------------

class Event:
    """Base of every message.  ``type_name`` is its "type" on the wire."""

    __slots__ = ()
    type_name: ClassVar[str] = ""
    # Name of a bin field written as a separate buffer (no copy) when sending.
    bulk_field: ClassVar[str | None] = None

    def to_wire(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, d: dict) -> "Event":
        raise NotImplementedError

    @classmethod
    def check_wire(cls, d: dict) -> None:
        """Run every check of from_wire (used on our outgoing messages)."""
        cls.from_wire(d)


def _freeze(obj, name, value):
    object.__setattr__(obj, name, value)


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """source -> dest, first message: who we are, what we speak."""
    versions: tuple[int, ...]
    node: str
    capabilities: tuple[str, ...]
    migration_id: str
    type_name: ClassVar[str] = "hello"

    def __post_init__(self):
        _freeze(self, "versions", _tup(self.versions))
        _freeze(self, "capabilities", _tup(self.capabilities))

    def to_wire(self):
        return {"type": self.type_name, "versions": list(self.versions),
                "node": self.node, "capabilities": list(self.capabilities),
                "migration_id": self.migration_id}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        raw = f.array("versions", L.MAX_VERSIONS)
        versions = tuple(f.int("versions", 1, L.MAX_VERSION_NUMBER, v=x) for x in raw)
        if not versions or len(set(versions)) != len(versions):
            raise malformed("hello.versions must list at least one version, each once")
        ev = cls(versions, f.name("node"), f.tokens("capabilities", L.MAX_CAPABILITIES),
                 f.token("migration_id"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Welcome(Event):
    """dest -> source: the chosen version and the capabilities in use."""
    version: int
    node: str
    capabilities: tuple[str, ...]
    type_name: ClassVar[str] = "welcome"

    def __post_init__(self):
        _freeze(self, "capabilities", _tup(self.capabilities))

    def to_wire(self):
        return {"type": self.type_name, "version": self.version, "node": self.node,
                "capabilities": list(self.capabilities)}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("version", 1, L.MAX_VERSION_NUMBER), f.name("node"),
                 f.tokens("capabilities", L.MAX_CAPABILITIES))
        f.done()
        return ev


_OPTION_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True, slots=True)
class Start(Event):
    """source -> dest: the process about to be migrated."""
    pid: int
    cmdline: tuple[str, ...]
    exe: str
    page_size: int
    tracker: str
    estimated_bytes: int
    options: dict = field(default_factory=dict)
    type_name: ClassVar[str] = "start"

    def __post_init__(self):
        _freeze(self, "cmdline", _tup(self.cmdline))
        if isinstance(self.options, dict):
            _freeze(self, "options", dict(self.options))

    def to_wire(self):
        args = [_path_bytes(a) for a in self.cmdline]
        if any(b"\0" in a for a in args):
            raise malformed("start.cmdline: an argument contains a NUL byte")
        return {"type": self.type_name, "pid": self.pid,
                "cmdline": b"".join(a + b"\0" for a in args),
                "exe": _path_bytes(self.exe), "page_size": self.page_size,
                "tracker": self.tracker, "estimated_bytes": self.estimated_bytes,
                "options": self.options}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        pid = f.int("pid", 1, L.PID_MAX_LIMIT)
        raw = f.bin("cmdline", L.MAX_CMDLINE_BYTES)
        if raw and not raw.endswith(b"\0"):
            raise malformed("start.cmdline must be NUL-terminated arguments")
        cmdline = tuple(a.decode("utf-8", "surrogateescape")
                        for a in raw[:-1].split(b"\0")) if raw else ()
        exe = f.path("exe")
        page_size = f.int("page_size", L.MIN_PAGE_SIZE, L.MAX_PAGE_SIZE)
        if page_size & (page_size - 1):
            raise malformed(f"start.page_size={page_size} is not a power of two")
        tracker = f.token("tracker")
        est = f.int("estimated_bytes", 0, L.U63_MAX)
        opts = f._get("options")
        if type(opts) is not dict:
            raise malformed(f"start.options must be a map, got {type(opts).__name__}")
        if len(opts) > L.MAX_OPTIONS:
            raise too_large(f"start.options has {len(opts)} entries, limit {L.MAX_OPTIONS}")
        for k, v in opts.items():
            f.token("options", v=k)
            if type(v) not in _OPTION_SCALARS:
                raise malformed(f"start.options[{k!r}] must be nil, bool, int, float "
                                f"or str, got {type(v).__name__}")
            if type(v) is str:
                f._str(f"options[{k}]", v, L.MAX_OPTION_STR_BYTES)
            elif type(v) is float and not math.isfinite(v):
                raise malformed(f"start.options[{k!r}] is not finite")
        ev = cls(pid, cmdline, exe, page_size, tracker, est, opts)
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Accept(Event):
    """dest -> source: go ahead, within these bounds."""
    max_batch_pages: int
    quota_bytes: int
    type_name: ClassVar[str] = "accept"

    def to_wire(self):
        return {"type": self.type_name, "max_batch_pages": self.max_batch_pages,
                "quota_bytes": self.quota_bytes}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("max_batch_pages", 1, L.MAX_BATCH_PAGES),
                 f.int("quota_bytes", 0, L.U63_MAX))
        f.done()
        return ev


def perms_to_bits(perms: str) -> int:
    if (type(perms) is not str or len(perms) != 4 or perms[0] not in "r-"
            or perms[1] not in "w-" or perms[2] not in "x-" or perms[3] not in "ps"):
        raise malformed(f"mapping perms {perms!r} is not like 'rwxp'/'r--s'")
    return ((perms[0] == "r") * PERM_R | (perms[1] == "w") * PERM_W
            | (perms[2] == "x") * PERM_X | (perms[3] == "s") * PERM_SHARED)


_PERM_STR = tuple(("r" if b & PERM_R else "-") + ("w" if b & PERM_W else "-")
                  + ("x" if b & PERM_X else "-") + ("s" if b & PERM_SHARED else "p")
                  for b in range(16))


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """One mapping of the source process (not a message by itself)."""
    start: int
    end: int
    perms: str          # "rwxp" style, as in /proc/PID/maps
    offset: int
    path: str           # "" for anonymous, "[heap]", "/usr/lib/..."
    kind: str           # one of KINDS
    flags: int = 0      # MAP_FLAG_* bits

    @property
    def migrates(self) -> bool:
        return self.kind in MIGRATABLE_KINDS


@dataclass(frozen=True, slots=True)
class Layout(Event):
    """source -> dest: the full mapping list for this round (not a diff)."""
    round: int
    mappings: tuple[MappingInfo, ...]
    type_name: ClassVar[str] = "layout"

    def __post_init__(self):
        _freeze(self, "mappings", _tup(self.mappings))

    def to_wire(self):
        ms = self.mappings
        n = len(ms)
        if n > L.MAX_MAPPINGS:
            raise too_large(f"layout has {n} mappings, limit {L.MAX_MAPPINGS}")
        for m in ms:
            if not isinstance(m, MappingInfo):
                raise malformed(f"layout.mappings holds a {type(m).__name__}, "
                                "not a MappingInfo")
        try:
            starts = np.array([m.start for m in ms], dtype="<u8")
            ends = np.array([m.end for m in ms], dtype="<u8")
            offsets = np.array([m.offset for m in ms], dtype="<u8")
            flags = np.array([m.flags for m in ms], dtype="u1")
        except (OverflowError, TypeError, ValueError) as e:
            raise malformed(f"layout mapping field out of range: {e}") from None
        perms = bytes(perms_to_bits(m.perms) for m in ms)
        kinds = bytearray(n)
        for i, m in enumerate(ms):
            if m.kind not in _KIND_CODE:
                raise malformed(f"mapping kind {m.kind!r} is not one of {KINDS}")
            kinds[i] = _KIND_CODE[m.kind]
        paths = [_path_bytes(m.path) for m in ms]
        path_ends = np.cumsum([len(p) for p in paths], dtype=np.uint64) if n else \
            np.empty(0, np.uint64)
        if n and path_ends[-1] > L.MAX_LAYOUT_PATH_BYTES:
            raise too_large(f"layout paths total {int(path_ends[-1])} bytes, "
                            f"limit {L.MAX_LAYOUT_PATH_BYTES}")
        return {"type": self.type_name, "round": self.round,
                "starts": starts.tobytes(), "ends": ends.tobytes(),
                "offsets": offsets.tobytes(), "perms": perms,
                "kinds": bytes(kinds), "flags": flags.tobytes(),
                "path_ends": path_ends.astype("<u4").tobytes(),
                "paths": b"".join(paths)}

    @classmethod
    def check_wire(cls, d):
        cls._columns(d)  # skip building MappingInfo objects

    @classmethod
    def from_wire(cls, d):
        rnd, starts, ends, offsets, perms, kinds, flags, path_ends, paths = cls._columns(d)
        bounds = [0] + path_ends.tolist()
        ms = tuple(
            MappingInfo(s, e, _PERM_STR[p], o,
                        paths[bounds[i]:bounds[i + 1]].decode("utf-8", "surrogateescape"),
                        KINDS[k], fl)
            for i, (s, e, o, p, k, fl) in enumerate(zip(
                starts.tolist(), ends.tolist(), offsets.tolist(), perms.tolist(),
                kinds.tolist(), flags.tolist())))
        return cls(rnd, ms)

    @classmethod
    def _columns(cls, d):
        f = _Fields(d, cls.type_name)
        rnd = f.int("round", 0, L.MAX_ROUND)
        starts = f.column("starts", "<u8", None)
        n = starts.size
        if n > L.MAX_MAPPINGS:
            raise too_large(f"layout has {n} mappings, limit {L.MAX_MAPPINGS}")
        ends = f.column("ends", "<u8", n)
        offsets = f.column("offsets", "<u8", n)
        perms = f.column("perms", "u1", n)
        kinds = f.column("kinds", "u1", n)
        flags = f.column("flags", "u1", n)
        path_ends = f.column("path_ends", "<u4", n).astype(np.int64)
        paths = f.bin("paths", L.MAX_LAYOUT_PATH_BYTES)
        f.done()
        mask = np.uint64(PAGE_SIZE - 1)
        if (starts >= ends).any():
            raise malformed("layout has a mapping with start >= end")
        if ((starts | ends | offsets) & mask).any():
            raise malformed("layout has a mapping start, end or offset that is not "
                            "page aligned")
        if n > 1 and (ends[:-1] > starts[1:]).any():
            raise malformed("layout mappings are not sorted or overlap")
        if (perms > 15).any():
            raise malformed("layout.perms has unknown bits")
        if (kinds >= len(KINDS)).any():
            raise malformed("layout.kinds has an unknown kind code")
        if (flags & ~np.uint8(MAP_FLAGS_KNOWN)).any():
            raise malformed("layout.flags has unknown bits")
        skip = np.uint8(_KIND_CODE["skip"])
        if ((ends > np.uint64(L.USER_ADDRESS_LIMIT)) & (kinds != skip)).any():
            raise malformed("layout has a migratable mapping beyond the user "
                            "address space (only 'skip' mappings may lie there)")
        if n:
            lens = np.diff(path_ends, prepend=0)
            if (lens < 0).any() or path_ends[-1] != len(paths):
                raise malformed("layout.path_ends do not partition layout.paths")
            if (lens > L.MAX_PATH_BYTES).any():
                raise too_large(f"layout has a path longer than {L.MAX_PATH_BYTES} bytes")
        elif paths:
            raise malformed("layout.paths holds bytes but there are no mappings")
        if b"\0" in paths:
            raise malformed("layout.paths contains a NUL byte")
        return rnd, starts, ends, offsets, perms, kinds, flags, path_ends, paths


class DeferredData:
    """The ``data`` of a received Pages message whose bytes are still in the
    socket: a receiver that moves them straight from the socket into its
    own file (``migrated.wire.connection``, ``direct_pages``) gets this
    instead of a buffer.  ``prefix`` holds the first bytes, already read
    with the message's header; ``nbytes`` counts them all.  Whoever
    receives the rest binds a filler (``bind``); the image writer then calls
    ``fill_into(fd, stretches)`` with (file offset, first byte, end byte) of
    each stretch, in data order, and the filler puts the bytes there."""

    __slots__ = ("nbytes", "prefix", "_fill")

    def __init__(self, nbytes: int, prefix: bytes = b""):
        self.nbytes = nbytes
        self.prefix = prefix
        self._fill = None

    def __len__(self) -> int:
        return self.nbytes

    def bind(self, fill) -> None:
        self._fill = fill

    def fill_into(self, fd: int, stretches: list[tuple[int, int, int]]) -> None:
        if self._fill is None:
            raise RuntimeError("deferred page data with nothing bound to receive it")
        fill, self._fill = self._fill, None     # once: the bytes leave the socket
        fill(self, fd, stretches)


@dataclass(frozen=True, slots=True)
class Pages(Event):
    """source -> dest: page contents, ``runs`` in address order, ``data`` the
    pages back to back; ``digest`` = xxh3-128 of ``data`` (16 bytes).  A
    receiver that asked for it may get ``data`` as DeferredData (above)."""
    round: int
    runs: PageRuns
    data: bytes | memoryview
    digest: bytes
    type_name: ClassVar[str] = "pages"
    bulk_field: ClassVar[str | None] = "data"

    @classmethod
    def build(cls, round: int, runs: PageRuns, data) -> "Pages":
        """Pages with its digest computed (the usual way to make one)."""
        return cls(round, runs, data, xxhash.xxh3_128_digest(data))

    def __eq__(self, other):
        return (type(other) is Pages and self.round == other.round
                and self.runs == other.runs and self.digest == other.digest
                and bytes(self.data) == bytes(other.data))

    __hash__ = None  # type: ignore[assignment]

    def to_wire(self):
        return {"type": self.type_name, "round": self.round,
                "runs": runs_to_wire(self.runs), "digest": self.digest,
                "data": self.data}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        rnd = f.int("round", 0, L.MAX_ROUND)
        runs = f.runs("runs")
        digest = f.bin("digest", L.DIGEST_SIZE)
        if len(digest) != L.DIGEST_SIZE:
            raise malformed(f"pages.digest is {len(digest)} bytes, must be {L.DIGEST_SIZE}")
        data = f._get("data")
        if type(data) is bytes:
            data_len = len(data)
        elif type(data) in (memoryview, bytearray):  # our own outgoing batch
            data_len = memoryview(data).nbytes
        elif type(data) is DeferredData:              # still in the socket
            data_len = data.nbytes
        else:
            raise malformed(f"pages.data must be binary, got {type(data).__name__}")
        f.done()
        npages = runs.total_pages()
        if npages > L.MAX_BATCH_PAGES or data_len > L.MAX_BATCH_BYTES:
            raise too_large(f"pages batch holds {npages} pages / {data_len} bytes, "
                            f"limit {L.MAX_BATCH_PAGES} pages / {L.MAX_BATCH_BYTES} bytes")
        if data_len != npages * PAGE_SIZE:
            raise malformed(f"pages.data is {data_len} bytes but runs name {npages} "
                            f"pages of {PAGE_SIZE} bytes")
        return cls(rnd, runs, data, digest)


@dataclass(frozen=True, slots=True)
class Zeros(Event):
    """source -> dest: these pages are present and entirely zero."""
    round: int
    runs: PageRuns
    type_name: ClassVar[str] = "zeros"

    def to_wire(self):
        return {"type": self.type_name, "round": self.round, "runs": runs_to_wire(self.runs)}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("round", 0, L.MAX_ROUND), f.runs("runs"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Dropped(Zeros):
    """source -> dest: these pages are no longer present (discard them)."""
    type_name: ClassVar[str] = "dropped"


@dataclass(frozen=True, slots=True)
class RoundEnd(Event):
    """source -> dest: the end of a live round and its figures."""
    round: int
    pages: int            # pages carried by Pages messages in this round
    bytes: int            # frame bytes the source sent in this round
    duration_ms: float
    dirty_rate: float     # bytes/s dirtied, as the source measured it
    bandwidth: float      # bytes/s achieved in this round
    pause_ms: float       # time the target was paused to collect dirty pages
    type_name: ClassVar[str] = "round-end"

    def to_wire(self):
        return {"type": self.type_name, "round": self.round, "pages": self.pages,
                "bytes": self.bytes, "duration_ms": self.duration_ms,
                "dirty_rate": self.dirty_rate, "bandwidth": self.bandwidth,
                "pause_ms": self.pause_ms}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("round", 0, L.MAX_ROUND), f.int("pages", 0, L.MAX_TOTAL_PAGES),
                 f.int("bytes", 0, L.U63_MAX), f.number("duration_ms"),
                 f.number("dirty_rate"), f.number("bandwidth"), f.number("pause_ms"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Freeze(Event):
    """source -> dest: the target is frozen; ``round`` is the final round."""
    round: int
    type_name: ClassVar[str] = "freeze"

    def to_wire(self):
        return {"type": self.type_name, "round": self.round}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("round", 0, L.MAX_ROUND))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class FinalEnd(Event):
    """source -> dest: the final delta is complete.  With the
    "final-figures" capability it also carries the frozen round's
    ``dirty_rate`` and ``pause_ms`` as the source measured them (the
    figures a live round's RoundEnd carries), so that the destination's
    log line for it is complete."""
    round: int
    total_pages: int      # pages carried by Pages messages in all rounds
    dirty_rate: float | None = None
    pause_ms: float | None = None
    type_name: ClassVar[str] = "final-end"

    @property
    def has_figures(self) -> bool:
        return self.dirty_rate is not None or self.pause_ms is not None

    def to_wire(self):
        d = {"type": self.type_name, "round": self.round, "total_pages": self.total_pages}
        if self.dirty_rate is not None:
            d["dirty_rate"] = self.dirty_rate
        if self.pause_ms is not None:
            d["pause_ms"] = self.pause_ms
        return d

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("round", 0, L.MAX_ROUND), f.int("total_pages", 0, L.MAX_TOTAL_PAGES),
                 f.optional_number("dirty_rate"), f.optional_number("pause_ms"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Backlog(Event):
    """dest -> source, only with the "backlog" capability: how much received
    page data is not yet durable (``unflushed`` bytes) and how long the
    destination expects making it durable to take (``flush_ms``), after the
    round-end of ``round`` (SPEC.md 7, "backlog").  The commit inside the
    freeze must flush it: the source counts it in the expected downtime."""
    round: int
    unflushed: int
    flush_ms: float
    type_name: ClassVar[str] = "backlog"

    def to_wire(self):
        return {"type": self.type_name, "round": self.round, "unflushed": self.unflushed,
                "flush_ms": self.flush_ms}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("round", 0, L.MAX_ROUND), f.int("unflushed", 0, L.U63_MAX),
                 f.number("flush_ms"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class CommitRequest(Event):
    """source -> dest: make the image durable.  ``pages`` = pages the image
    holds (data + zero pages); ``digest`` optional image digest (IMAGE.md)."""
    pages: int
    digest: bytes | None = None
    type_name: ClassVar[str] = "commit-request"

    def to_wire(self):
        d = {"type": self.type_name, "pages": self.pages}
        if self.digest is not None:
            d["digest"] = self.digest
        return d

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        pages = f.int("pages", 0, L.MAX_TOTAL_PAGES)
        digest = f.bin("digest", L.DIGEST_SIZE, optional=True)
        if digest is not None and len(digest) != L.DIGEST_SIZE:
            raise malformed(f"commit-request.digest is {len(digest)} bytes, "
                            f"must be {L.DIGEST_SIZE}")
        f.done()
        return cls(pages, digest)


@dataclass(frozen=True, slots=True)
class Committed(Event):
    """dest -> source: the image is complete, durable and *prepared* (staged,
    not yet visible); it is published only when Release arrives."""
    image_id: str
    digest: str
    type_name: ClassVar[str] = "committed"

    def to_wire(self):
        return {"type": self.type_name, "image_id": self.image_id, "digest": self.digest}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("image_id"), f.token("digest", L.MAX_DIGEST_STR_BYTES))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Release(Event):
    """source -> dest, after Committed: publish the prepared image
    ``image_id`` (the one Committed named).  From here on the source treats
    the outcome as in doubt until Released arrives."""
    image_id: str
    type_name: ClassVar[str] = "release"

    def to_wire(self):
        return {"type": self.type_name, "image_id": self.image_id}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("image_id"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Released(Event):
    """dest -> source: image ``image_id`` is published (visible in the
    destination's store); the source may now apply its --then policy."""
    image_id: str
    type_name: ClassVar[str] = "released"

    def to_wire(self):
        return {"type": self.type_name, "image_id": self.image_id}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("image_id"))
        f.done()
        return ev


WITHDRAW_OUTCOMES = ("removed", "absent")


@dataclass(frozen=True, slots=True)
class Withdraw(Event):
    """source -> dest, right after Welcome and instead of Start: the
    migration named in Hello sent Release but never saw Released, and its
    process runs at the source again.  Remove image ``image_id`` if it was
    published for that migration, and never publish it later (SPEC.md 9.2)."""
    image_id: str
    type_name: ClassVar[str] = "withdraw"

    def to_wire(self):
        return {"type": self.type_name, "image_id": self.image_id}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("image_id"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Withdrawn(Event):
    """dest -> source: the answer to Withdraw.  ``outcome`` is "removed"
    (it was published; it is gone) or "absent" (not published; it never
    will be)."""
    image_id: str
    outcome: str
    type_name: ClassVar[str] = "withdrawn"

    def to_wire(self):
        return {"type": self.type_name, "image_id": self.image_id, "outcome": self.outcome}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("image_id"), f.token("outcome"))
        f.done()
        if ev.outcome not in WITHDRAW_OUTCOMES:
            raise malformed(f"withdrawn.outcome must be one of {', '.join(WITHDRAW_OUTCOMES)}, "
                            f"not {ev.outcome!r}")
        return ev


@dataclass(frozen=True, slots=True)
class Error(Event):
    """either side: the migration failed; the sender closes afterwards."""
    code: str
    message: str
    type_name: ClassVar[str] = "error"

    @property
    def known_code(self) -> str:
        """``code`` if it is one of ERROR_CODES, else "internal": how a
        receiver must treat a code it does not know (SPEC.md 13).  Keep
        ``code`` itself in what you tell a human."""
        return self.code if self.code in ERROR_CODES else "internal"

    def to_wire(self):
        return {"type": self.type_name, "code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.token("code"), f.text("message"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    """either side: stop the migration on purpose; the sender closes."""
    reason: str
    type_name: ClassVar[str] = "cancel"

    def to_wire(self):
        return {"type": self.type_name, "reason": self.reason}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.text("reason"))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class Keepalive(Event):
    """either side: I am still here (see SPEC.md for timers)."""
    seq: int
    type_name: ClassVar[str] = "keepalive"

    def to_wire(self):
        return {"type": self.type_name, "seq": self.seq}

    @classmethod
    def from_wire(cls, d):
        f = _Fields(d, cls.type_name)
        ev = cls(f.int("seq", 0, L.U64_MAX))
        f.done()
        return ev


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """Not a message: the peer closed its side.  ``clean`` is True when the
    conversation had finished (DONE) or was closed on purpose (CLOSED)."""
    clean: bool


MESSAGE_TYPES: tuple[type[Event], ...] = (
    Hello, Welcome, Start, Accept, Layout, Pages, Zeros, Dropped, RoundEnd,
    Freeze, FinalEnd, CommitRequest, Committed, Release, Released, Withdraw, Withdrawn,
    Error, Cancel, Keepalive, Backlog)
BY_NAME: dict[str, type[Event]] = {c.type_name: c for c in MESSAGE_TYPES}
