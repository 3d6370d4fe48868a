"""The image manifest: ids, mapping records, page runs, digests, validation.

Pure functions and constants: no file I/O happens here (store.py owns the
files).  The format is documented in protocol/IMAGE.md; keep both in step.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from json.encoder import c_make_encoder as _c_make_encoder  # None without _json
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Iterable

import numpy as np
import xxhash

from migrated.errors import ImageError
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns

FORMAT = "migrated-image"
FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
PAGES_NAME = "pages.img"

# Page data is grouped in chunks of 512 pages (2 MiB with 4 KiB pages): the
# unit of the slot table, of presence bitmaps and of digests.  Large enough
# that per-chunk Python work is negligible next to the bytes it covers,
# small enough that a sparse address space wastes little.
CHUNK_PAGES = 512
CHUNK_SHIFT = PAGE_SHIFT + 9
CHUNK_BYTES = CHUNK_PAGES * PAGE_SIZE

# Highest user-space address we accept: 2**57 covers x86_64 5-level paging
# and arm64 52-bit VAs; anything above is a hostile or broken peer.
USER_ADDR_LIMIT = 1 << 57

# 4x the kernel's default vm.max_map_count (65530): enough for real
# processes, yet bounds the manifest a peer can make us build.
MAX_MAPPINGS = 262_144

# A mapping's path is recorded, never opened; PATH_MAX bounds it.
MAX_PATH_CHARS = 4096
MAX_FLAGS = 64           # VmFlags has ~30 two-letter names today
MAX_FLAG_CHARS = 16

# The source's description of the process (pid, cmdline, exe, timings...)
# is metadata only, but every Start the wire protocol accepts must fit.
# In JSON a string can take six characters per byte ("\u0001", or
# "\udcff" for a byte that is not UTF-8): exe (4096 bytes) and the options
# (32 x 255 bytes) alone may then take some 76 KiB, and the command line
# (128 KiB on the wire) is cut to MAX_META_CMDLINE_CHARS (clip_cmdline).
MAX_META_BYTES = 256 * 1024
# JSON characters of the command line kept in the metadata.  The command
# line is informational (SPEC.md 5, start): a longer one is cut, at an
# argument boundary where one is left, and the metadata says so
# ("cmdline_truncated": true).
MAX_META_CMDLINE_CHARS = 128 * 1024

KINDS = frozenset({"anon", "file", "shared-anon", "shared-file", "vdso", "skip"})
MIGRATABLE_KINDS = frozenset({"anon", "file", "shared-anon", "vdso"})

_PERMS_RE = re.compile(r"[r-][w-][x-][ps]")
_DEV_RE = re.compile(r"[0-9a-fA-F]{1,8}:[0-9a-fA-F]{1,8}")

# Image ids are made by the destination: UTC time to the millisecond (so
# ids sort by creation) plus 40 random bits.  This regex is checked before
# an id is ever joined to a path.
IMAGE_ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}\.[0-9]{3}-[0-9a-f]{10}")


def new_image_id(now_ns: int | None = None) -> str:
    ns = time.time_ns() if now_ns is None else now_ns
    secs, rem = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(secs))
    return f"{stamp}.{rem // 1_000_000:03d}-{secrets.token_hex(5)}"


def check_image_id(image_id: Any) -> str:
    if not isinstance(image_id, str) or not IMAGE_ID_RE.fullmatch(image_id):
        raise ImageError(f"invalid image id {image_id!r}: expected the form "
                         "YYYYMMDD-HHMMSS.mmm-xxxxxxxxxx as printed by "
                         "`migratectl images list`")
    return image_id


# -- mappings --------------------------------------------------------------

def _field(m: Any, name: str, default: Any = None) -> Any:
    if isinstance(m, dict):
        return m.get(name, default)
    return getattr(m, name, default)


def _int_field(m: Any, name: str, default: int | None = None) -> int:
    v = _field(m, name, default)
    if isinstance(v, str):
        try:
            v = int(v, 0)
        except ValueError:
            v = None
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise ImageError(f"mapping field {name!r} must be an integer, got {v!r}")
    return int(v)


def normalize_mapping(m: Any) -> dict:
    """Validate one mapping (dict or kernel Mapping) into a plain record."""
    start = _int_field(m, "start")
    end = _int_field(m, "end")
    if start % PAGE_SIZE or end % PAGE_SIZE or not 0 <= start < end <= 1 << 64:
        raise ImageError(f"mapping {start:#x}-{end:#x} is not a page-aligned "
                         "non-empty range")
    perms = _field(m, "perms", "")
    if not isinstance(perms, str) or not _PERMS_RE.fullmatch(perms):
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad permissions {perms!r}")
    kind = _field(m, "kind", "")
    if kind not in KINDS:
        raise ImageError(f"mapping {start:#x}-{end:#x}: unknown kind {kind!r} "
                         f"(known: {', '.join(sorted(KINDS))})")
    # Only recorded mappings ([vsyscall] sits in the kernel half) may lie
    # above user space; anything whose pages we store may not.
    if kind in MIGRATABLE_KINDS and end > USER_ADDR_LIMIT:
        raise ImageError(f"mapping {start:#x}-{end:#x} ({kind}) lies above user "
                         f"space ({USER_ADDR_LIMIT:#x})")
    offset = _int_field(m, "offset", 0)
    if not 0 <= offset < 1 << 64:
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad file offset {offset}")
    path = _field(m, "path", "") or ""
    if not isinstance(path, str) or len(path) > MAX_PATH_CHARS or "\0" in path:
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad path (a string of at "
                         f"most {MAX_PATH_CHARS} characters without NUL)")
    flags = _field(m, "flags", ()) or ()
    if isinstance(flags, str):
        flags = flags.split()
    flags = list(flags)
    if len(flags) > MAX_FLAGS or not all(
            isinstance(f, str) and 0 < len(f) <= MAX_FLAG_CHARS for f in flags):
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad flags {flags!r:.200}")
    dev = _field(m, "dev", "00:00") or "00:00"
    if not isinstance(dev, str) or not _DEV_RE.fullmatch(dev):
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad device {dev!r:.40}")
    inode = _int_field(m, "inode", 0)
    if not 0 <= inode < 1 << 64:
        raise ImageError(f"mapping {start:#x}-{end:#x}: bad inode {inode}")
    return {
        "start": start, "end": end, "perms": perms, "offset": offset,
        "kind": kind, "path": path, "flags": flags, "dev": dev, "inode": inode,
        "deleted": bool(_field(m, "deleted", path.endswith(" (deleted)"))),
    }


def normalize_layout(mappings: Iterable[Any]) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(mappings):
        if i >= MAX_MAPPINGS:
            raise ImageError(f"layout has more than {MAX_MAPPINGS} mappings; "
                             "refusing it (raise MAX_MAPPINGS if this is real)")
        out.append(normalize_mapping(m))
    out.sort(key=lambda r: r["start"])
    for a, b in zip(out, out[1:]):
        if b["start"] < a["end"]:
            raise ImageError(f"mappings overlap: {a['start']:#x}-{a['end']:#x} "
                             f"and {b['start']:#x}-{b['end']:#x}")
    return out


def migratable_runs(layout: list[dict]) -> PageRuns:
    keep = [(m["start"], (m["end"] - m["start"]) >> PAGE_SHIFT)
            for m in layout if m["kind"] in MIGRATABLE_KINDS]
    return PageRuns.from_pairs(keep) if keep else PageRuns.empty()


class MetaTooLarge(ImageError):
    """The metadata does not fit MAX_META_BYTES (a peer's Start answers
    this with "too-large", not as an internal error)."""


def clip_cmdline(args: Iterable[str], limit: int = MAX_META_CMDLINE_CHARS
                 ) -> tuple[list[str], bool]:
    """``args`` cut so that their JSON list takes at most ``limit``
    characters (as check_meta measures it); and whether anything was cut.
    Whole arguments are dropped from the end; only a first argument that
    alone is too long is cut inside."""
    out: list[str] = []
    used = 2                                    # "[" and "]"
    for arg in args:
        sep = 2 if out else 0                   # ", "
        size = len(json.dumps(arg))
        if used + sep + size <= limit:
            out.append(arg)
            used += sep + size
            continue
        if not out:
            # Longest prefix whose JSON fits (escapes make the size of a
            # prefix uneven, so search; a few encodes of <= 128 Ki chars).
            room = limit - used
            lo, hi = 0, len(arg)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(json.dumps(arg[:mid])) <= room:
                    lo = mid
                else:
                    hi = mid - 1
            if lo:
                out.append(arg[:lo])
        return out, True
    return out, False


# Keys of the metadata with a defined meaning, and the JSON type each must
# have (IMAGE.md, "meta"); ``cmdline`` is a list of strings.  Enforced when
# an image begins and commits, and when a manifest is read back.
META_TYPES: dict[str, type] = {
    "pid": int, "exe": str, "source_node": str, "migration_id": str,
    "source_peer": str, "arch": str, "tracker": str, "cmdline_truncated": bool,
    "timings": dict, "options": dict,
}

# The destination's figures of the migration (``meta["timings"]``: each
# round's figures and the freeze's), merged at commit.  The engine bounds
# what it passes itself (a few dozen rounds, a few KiB of JSON; even its
# 128-round summary takes ~20 KiB); this bounds what the manifest takes
# whatever it passes.  Larger timings are cut (clip_timings), never
# refused: the figures are informational and must not fail a commit.
MAX_META_TIMINGS_BYTES = 64 * 1024


def _json_size(value: Any) -> int:
    return len(json.dumps(value, sort_keys=True, allow_nan=False))


def clip_timings(timings: dict, limit: int | None = None) -> tuple[dict, bool]:
    """``timings`` cut to at most ``limit`` bytes of JSON (default
    MAX_META_TIMINGS_BYTES), and whether anything was cut.  List values (the
    rounds) keep their first items, as many as fit; if that is not enough,
    only the number-valued entries stay.  A cut dict says
    ``"truncated": true``."""
    limit = MAX_META_TIMINGS_BYTES if limit is None else limit
    if _json_size(timings) <= limit:
        return timings, False
    lists = {k: v for k, v in timings.items() if isinstance(v, list)}

    def cut(keep: int) -> dict:
        out = {k: (v[:keep] if k in lists else v) for k, v in timings.items()}
        out["truncated"] = True
        return out

    lo, hi = -1, max((len(v) for v in lists.values()), default=0)
    while lo < hi:                       # largest list length that fits
        mid = (lo + hi + 1) // 2
        if _json_size(cut(max(mid, 0))) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if lo >= 0:
        return cut(lo), True
    numbers = {k: v for k, v in timings.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and isinstance(k, str) and len(k) <= 64}
    out = {"truncated": True}
    for k in sorted(numbers):
        out[k] = numbers[k]
        if _json_size(out) > limit:
            del out[k]
            break
    return out, True


_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false",
               dict: "a JSON object", list: "a list"}


def check_meta_types(meta: Any, where: str = "image metadata") -> dict:
    """Raise ImageError unless ``meta`` is a dict whose keys of defined
    meaning (META_TYPES, cmdline) have their types."""
    if not isinstance(meta, dict):
        raise ImageError(f"{where} must be a JSON object, got {type(meta).__name__}")
    for key, typ in META_TYPES.items():
        if key in meta and not (isinstance(meta[key], typ)
                                and (typ is bool or not isinstance(meta[key], bool))):
            raise ImageError(f"{where} {key!r} must be {_TYPE_NAMES[typ]}, got "
                             f"{meta[key]!r:.60}")
    cmd = meta.get("cmdline")
    if cmd is not None and not (isinstance(cmd, list)
                                and all(isinstance(a, str) for a in cmd)):
        raise ImageError(f"{where} 'cmdline' must be a list of strings")
    return meta


def check_meta(meta: Any, limit: int | None = None) -> dict:
    """Source-supplied metadata: JSON-able, bounded (``limit`` bytes of
    JSON, default MAX_META_BYTES), typed where we use it."""
    if not isinstance(meta, dict):
        raise ImageError("image metadata must be a dict")
    try:
        blob = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"image metadata is not plain JSON data: {exc}") from None
    limit = MAX_META_BYTES if limit is None else limit
    if len(blob) > limit:
        raise MetaTooLarge(f"image metadata is {len(blob)} bytes of JSON, more than the "
                           f"{limit} allowed")
    return check_meta_types(json.loads(blob))


# -- runs ------------------------------------------------------------------

def runs_to_json(starts: np.ndarray, counts: np.ndarray) -> list[list]:
    return [[f"{s:#x}", c] for s, c in zip(starts.tolist(), counts.tolist())]


_HEX_RE = re.compile(r"0x[0-9a-f]{1,16}")
# A run cannot hold more pages than a 64-bit address space.
_MAX_RUN_PAGES = 1 << (64 - PAGE_SHIFT)
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")


def hex_field(value: Any, what: str) -> int:
    """An address or offset of the manifest: a lowercase hex string such as
    "0x7f1c00000000" (below 2^64)."""
    if not isinstance(value, str) or not _HEX_RE.fullmatch(value):
        raise ImageError(f"{what} must be a hex string such as \"0x7f1c00000000\", "
                         f"got {value!r:.60}")
    return int(value, 16)


def _int_value(value: Any, what: str, lo: int = 0, hi: int = 1 << 63) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value < hi:
        raise ImageError(f"{what} must be an integer from {lo} to {hi - 1}, got "
                         f"{value!r:.60}")
    return value


def run_pairs(pairs: Any, what: str) -> list[tuple[int, int]]:
    """The (address, pages) runs of a manifest list: each a pair of a hex
    address and a page count >= 1."""
    if not isinstance(pairs, list):
        raise ImageError(f"{what} runs must be a list, got {type(pairs).__name__}")
    out = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ImageError(f"{what} runs must be [address, pages] pairs, got "
                             f"{pair!r:.60}")
        out.append((hex_field(pair[0], f"{what} run address"),
                    _int_value(pair[1], f"{what} run length", 1, _MAX_RUN_PAGES)))
    return out


def runs_from_json(pairs: Any, what: str) -> PageRuns:
    try:
        arr = run_pairs(pairs, what)
    except ImageError as exc:
        raise ImageError(f"manifest: {exc}") from None
    return PageRuns.from_pairs(arr) if arr else PageRuns.empty()


def rows_to_runs(chunk_vaddrs: np.ndarray, masks: np.ndarray) -> PageRuns:
    """Runs of True pages of a (nchunks, CHUNK_PAGES) mask; row i covers
    the chunk at chunk_vaddrs[i].  Fully vectorised: a False column appended
    to every row keeps runs from crossing rows."""
    if masks.shape[0] == 0:
        return PageRuns.empty()
    padded = np.zeros((masks.shape[0], CHUNK_PAGES + 1), dtype=bool)
    padded[:, :CHUNK_PAGES] = masks
    flat = PageRuns.from_mask(0, padded.ravel())
    idx = flat.starts >> np.uint64(PAGE_SHIFT)
    row = idx // np.uint64(CHUNK_PAGES + 1)
    col = idx % np.uint64(CHUNK_PAGES + 1)
    starts = np.asarray(chunk_vaddrs, np.uint64)[row.astype(np.int64)] + \
        col * np.uint64(PAGE_SIZE)
    return PageRuns(starts, flat.counts)


def cut_at_chunks(starts: np.ndarray, counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Cut runs at chunk boundaries (vectorised); returns page-number based
    (start_page, npages) arrays as int64 -- every piece lies in one chunk."""
    sp = (np.asarray(starts, np.uint64) >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    ep = sp + np.asarray(counts, np.int64)
    if sp.size == 0:
        return sp, ep
    first = sp // CHUNK_PAGES
    pieces = (ep - 1) // CHUNK_PAGES - first + 1
    rs = np.repeat(sp, pieces)
    re_ = np.repeat(ep, pieces)
    k = np.arange(rs.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    chunk = np.repeat(first, pieces) + k
    ps = np.maximum(rs, chunk * CHUNK_PAGES)
    pe = np.minimum(re_, (chunk + 1) * CHUNK_PAGES)
    return ps, pe - ps


def runs_per_mapping(runs: PageRuns, starts: np.ndarray, ends: np.ndarray) -> list[list]:
    """The JSON runs (``runs_to_json`` pairs) of ``runs`` inside each of the
    sorted, disjoint ranges [starts[i], ends[i]), all ranges at once.

    A run may span adjacent ranges (two mappings that differ only in their
    permissions), so runs are first cut at every range boundary that falls
    inside them; each piece then belongs to at most one range.  A few array
    operations over runs and ranges instead of two binary searches per
    range: 165 mappings took 8 ms that way, inside the freeze."""
    n = len(starts)
    if n == 0 or not runs:
        return [[] for _ in range(n)]
    ms = np.asarray(starts, np.uint64)
    me = np.asarray(ends, np.uint64)
    s, e = runs.starts, runs.ends()
    bounds = np.union1d(ms, me)
    lo = np.searchsorted(bounds, s, side="right")      # first boundary > s
    hi = np.searchsorted(bounds, e, side="left")       # first boundary >= e
    pieces = (hi - lo + 1).astype(np.int64)
    k = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    at = np.repeat(lo.astype(np.int64), pieces) + k    # boundary ending piece k
    top = bounds.size - 1
    ps = np.where(k == 0, np.repeat(s, pieces), bounds[np.clip(at - 1, 0, top)])
    pe = np.where(k == np.repeat(pieces - 1, pieces), np.repeat(e, pieces),
                  bounds[np.clip(at, 0, top)])
    owner = np.searchsorted(ms, ps, side="right").astype(np.int64) - 1
    inside = (owner >= 0) & (ps < me[np.maximum(owner, 0)])
    ps, pe, owner = ps[inside], pe[inside], owner[inside]
    pairs = runs_to_json(ps, (pe - ps) >> np.uint64(PAGE_SHIFT))
    cut = np.searchsorted(owner, np.arange(n + 1)).tolist()
    return [pairs[cut[i]:cut[i + 1]] for i in range(n)]


def mapping_records(layout: list[dict], data: PageRuns, zero: PageRuns) -> list[dict]:
    """The manifest's ``mappings``: each normalized mapping with addresses
    and offset as hex, ``migrates``, and for those that migrate the
    ``data`` and ``zero`` runs inside it."""
    moving = [m for m in layout if m["kind"] in MIGRATABLE_KINDS]
    starts = np.array([m["start"] for m in moving], np.uint64)
    ends = np.array([m["end"] for m in moving], np.uint64)
    data_of = iter(runs_per_mapping(data, starts, ends))
    zero_of = iter(runs_per_mapping(zero, starts, ends))
    records = []
    for mp in layout:
        rec = dict(mp, start=f"{mp['start']:#x}", end=f"{mp['end']:#x}",
                   offset=f"{mp['offset']:#x}", migrates=mp["kind"] in MIGRATABLE_KINDS)
        if rec["migrates"]:
            rec["data"] = next(data_of)
            rec["zero"] = next(zero_of)
        records.append(rec)
    return records


# -- digests ---------------------------------------------------------------

def canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False).encode()


def image_digest(manifest: dict) -> str:
    """xxh3_128 over the canonical JSON of everything but "digest" (which
    includes every chunk digest, so it seals data and description)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return xxhash.xxh3_128_hexdigest(canonical(body))


# Lists in the manifest written one element per line (see seal_manifest).
_LINE_LISTS = ("mappings", "chunks")


def _encoder(item_sep: str, key_sep: str) -> Callable[[Any], str]:
    """One value as JSON with sorted keys, ASCII only, no NaN, by a C
    encoder made once.  (json.JSONEncoder.encode makes a new C encoder on
    every call; for a manifest's hundreds of records that was most of the
    encoding time, inside the freeze.)"""
    if _c_make_encoder is None:          # an interpreter without _json
        return json.JSONEncoder(sort_keys=True, separators=(item_sep, key_sep),
                                ensure_ascii=True, allow_nan=False).encode
    refuse = json.JSONEncoder().default  # raises TypeError, as dumps would
    c_enc = _c_make_encoder(None, refuse, encode_basestring_ascii, None,
                            key_sep, item_sep, True, False, False)
    return lambda value: "".join(c_enc(value, 0))


def seal_manifest(manifest: dict) -> tuple[str, bytes]:
    """Digest a manifest and encode its file: sets ``manifest["digest"]``
    and returns (digest, file bytes).

    The digest is image_digest()'s, over canonical JSON assembled from
    each record's compact encoding exactly as json.dumps would join them
    (a test holds the two equal).  The file: keys sorted, one top-level key
    per line, one mapping or chunk record per line (protocol/IMAGE.md;
    readers must not depend on the whitespace)."""
    compact, spaced = _encoder(",", ":"), _encoder(", ", ": ")
    inline: dict[str, str] = {}
    lined: dict[str, str] = {}
    for key, value in manifest.items():
        if key == "digest":
            continue
        if key in _LINE_LISTS and isinstance(value, list) and value:
            inline[key] = "[" + ",".join([compact(item) for item in value]) + "]"
            lined[key] = "[\n" + ",\n".join(["  " + spaced(item) for item in value]) + "\n ]"
        else:
            inline[key] = compact(value)
            lined[key] = spaced(value)
    body = "{" + ",".join([f"{compact(k)}:{inline[k]}" for k in sorted(inline)]) + "}"
    digest = xxhash.xxh3_128_hexdigest(body.encode())
    manifest["digest"] = digest
    lined["digest"] = spaced(digest)
    text = ",\n".join([f" {spaced(k)}: {lined[k]}" for k in sorted(lined)])
    return digest, ("{\n" + text + "\n}\n").encode()


# What a manifest holds (IMAGE.md, "manifest.json"); verify reports any
# other key, and any of these missing.
MANIFEST_KEYS = frozenset({"format", "version", "image_id", "page_size", "chunk_pages",
                           "data_file", "began_at", "committed_at", "meta", "mappings",
                           "chunks", "totals", "store_timings_ms", "digest"})
# Informational, and absent from images of builds before it existed.
OPTIONAL_KEYS = frozenset({"store_timings_ms"})
TOTALS_KEYS = ("mappings", "migratable_mappings", "data_pages", "zero_pages", "data_bytes",
               "file_bytes", "bytes_received", "chunks")
MAPPING_KEYS = frozenset({"start", "end", "perms", "offset", "kind", "migrates", "path",
                          "deleted", "dev", "inode", "flags"})
RUN_KEYS = ("data", "zero")          # only (and always) in mappings that migrate
CHUNK_KEYS = frozenset({"vaddr", "slot", "pages", "digest"})
# A slot is a 2 MiB piece of the page file: 2^40 of them is far beyond any
# file we write, and keeps slot * CHUNK_BYTES a sane file offset.
MAX_SLOT = 1 << 40
# Violations verify spells out one by one; past that it says how many more.
MAX_PROBLEMS_SHOWN = 8


def _where_mapping(i: int, mp: dict) -> str:
    return f"mapping {i} ({mp.get('start')!s:.20}-{mp.get('end')!s:.20})"


def _check_types(m: dict) -> None:
    """Raise ImageError naming the first field of ``m`` a reader uses that
    does not have its type (IMAGE.md)."""
    for key in ("image_id", "data_file", "began_at", "committed_at", "digest"):
        if not isinstance(m.get(key), str):
            raise ImageError(f"field {key!r} must be a string, got {m.get(key)!r:.60}")
    if not _DIGEST_RE.fullmatch(m["digest"]):
        raise ImageError(f"field 'digest' must be 32 hex digits, got {m['digest']!r:.60}")
    for key in ("page_size", "chunk_pages"):
        _int_value(m.get(key), f"field {key!r}", 1)
    check_meta_types(m.get("meta"), "field 'meta':")
    totals = m.get("totals")
    if not isinstance(totals, dict):
        raise ImageError(f"field 'totals' must be a JSON object, got {type(totals).__name__}")
    for key in TOTALS_KEYS:
        _int_value(totals.get(key), f"totals.{key}")
    if not isinstance(m.get("store_timings_ms", {}), dict):
        raise ImageError("field 'store_timings_ms' must be a JSON object")
    mappings, chunks = m.get("mappings"), m.get("chunks")
    if not isinstance(mappings, list) or not isinstance(chunks, list):
        raise ImageError("fields 'mappings' and 'chunks' must be lists")
    for i, mp in enumerate(mappings):
        if not isinstance(mp, dict):
            raise ImageError(f"mapping {i} must be a JSON object, got {mp!r:.60}")
        where = _where_mapping(i, mp)
        for key in ("start", "end", "offset"):
            hex_field(mp.get(key), f"{where}: {key!r}")
        for key in ("perms", "kind", "path", "dev"):
            if not isinstance(mp.get(key), str):
                raise ImageError(f"{where}: {key!r} must be a string, got {mp.get(key)!r:.60}")
        for key in ("migrates", "deleted"):
            if not isinstance(mp.get(key), bool):
                raise ImageError(f"{where}: {key!r} must be true or false, got "
                                 f"{mp.get(key)!r:.60}")
        _int_value(mp.get("inode"), f"{where}: 'inode'")
        flags = mp.get("flags")
        if not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise ImageError(f"{where}: 'flags' must be a list of strings")
        for key in RUN_KEYS:
            if key in mp:
                run_pairs(mp[key], f"{where}: {key}")
    for i, c in enumerate(chunks):
        if not isinstance(c, dict):
            raise ImageError(f"chunk {i} must be a JSON object, got {c!r:.60}")
        where = f"chunk {i}"
        hex_field(c.get("vaddr"), f"{where}: 'vaddr'")
        slot = _int_value(c.get("slot"), f"{where}: 'slot'")
        if slot >= MAX_SLOT:
            raise ImageError(f"{where}: slot {slot} is beyond any page file")
        _int_value(c.get("pages"), f"{where}: 'pages'")
        if not (isinstance(c.get("digest"), str) and _DIGEST_RE.fullmatch(c["digest"])):
            raise ImageError(f"{where}: 'digest' must be 32 hex digits, got "
                             f"{c.get('digest')!r:.60}")


def decode_manifest(blob: bytes, image_id: str) -> dict:
    """Parse a manifest read from disk and check the type of every field a
    reader uses (list, show, verify, export): ImageError if one is wrong.
    Whether the image is consistent is verify's question
    (structure_problems)."""
    try:
        m = json.loads(blob)
    # RecursionError: nested deeper than the parser goes (a few KiB of '{"a":'
    # do it); a corrupt manifest like any other, not a crash of every reader.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ImageError(f"image {image_id}: manifest is not valid JSON ({exc}); "
                         "the image is corrupt -- remove it with "
                         f"`migratectl images rm {image_id}`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ImageError(f"image {image_id}: not a migrated image manifest")
    if m.get("version") != FORMAT_VERSION:
        raise ImageError(f"image {image_id}: manifest version {m.get('version')!r} "
                         f"is not supported (this build reads {FORMAT_VERSION})")
    try:
        _check_types(m)
    except ImageError as exc:
        raise ImageError(f"image {image_id}: manifest has a bad field: {exc}; the image "
                         f"is corrupt -- remove it with `migratectl images rm {image_id}`"
                         ) from None
    if m["image_id"] != image_id:
        raise ImageError(f"image {image_id}: manifest names another image "
                         f"({m['image_id']!r:.60})")
    if m["page_size"] != PAGE_SIZE or m["chunk_pages"] != CHUNK_PAGES:
        raise ImageError(f"image {image_id}: page size {m['page_size']} / "
                         f"chunk {m['chunk_pages']} differ from this host's")
    return m


class _Problems:
    """Violations found by structure_problems, counted per kind: the first
    of each kind is described, the others counted."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.count: dict[str, int] = {}

    def add(self, kind: str, text: str, n: int = 1) -> None:
        if n <= 0:
            return
        self.first.setdefault(kind, text)
        self.count[kind] = self.count.get(kind, 0) + n

    def __bool__(self) -> bool:
        return bool(self.count)

    def lines(self) -> list[str]:
        return [text if self.count[k] == 1 else f"{text} (and {self.count[k] - 1} more)"
                for k, text in self.first.items()]


def _run_arrays(maps: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(address, pages, owner mapping index) of every ``key`` run, in file
    order (the manifest was decoded: decode_manifest checked the pairs)."""
    addr: list[int] = []
    pages: list[int] = []
    owner: list[int] = []
    for i, mp in enumerate(maps):
        pairs = mp.get(key, ())
        addr += [int(a, 16) for a, _ in pairs]
        pages += [n for _, n in pairs]
        owner += [i] * len(pairs)
    return (np.array(addr, np.uint64), np.array(pages, np.uint64),
            np.array(owner, np.int64))


def structure_problems(m: dict) -> tuple[list[str], PageRuns | None]:
    """Every way a decoded manifest contradicts IMAGE.md: key set, mapping
    records (sorted, disjoint, valid, ``migrates`` iff the kind migrates,
    runs only where it does), runs (page aligned, sorted, disjoint, inside
    their mapping; data and zero disjoint), chunk records (exactly the
    chunks holding data, sorted, chunk aligned, unique slots, page counts)
    and totals (equal to recounts).  Returns the violations, one line per
    kind, and the data runs when they are sound enough to check chunk
    digests against (else None).  Vectorised over runs; Python per mapping
    and chunk record."""
    bad = _Problems()
    keys = set(m)
    missing = sorted(MANIFEST_KEYS - keys - OPTIONAL_KEYS)
    if missing:
        bad.add("keys", f"the manifest lacks {', '.join(missing)}")
    extra = sorted(keys - MANIFEST_KEYS)
    if extra:
        bad.add("keys-extra", f"the manifest has keys IMAGE.md does not define: "
                f"{', '.join(repr(k)[:40] for k in extra[:5])}")
    if m.get("data_file") != PAGES_NAME:
        bad.add("data_file", f"data_file is {m.get('data_file')!r:.60}, not {PAGES_NAME!r}")
    maps = m["mappings"]
    if len(maps) > MAX_MAPPINGS:
        bad.add("many", f"{len(maps)} mappings, more than the {MAX_MAPPINGS} a layout may have")
    starts = [int(mp["start"], 16) for mp in maps]
    ends = [int(mp["end"], 16) for mp in maps]
    for i, mp in enumerate(maps):
        where = _where_mapping(i, mp)
        try:
            normalize_mapping(mp)
        except ImageError as exc:
            bad.add("mapping", f"{where}: {exc}")
        moves = mp["kind"] in MIGRATABLE_KINDS
        if mp["migrates"] != moves:
            bad.add("migrates", f"{where} is of kind {mp['kind']!r:.20} but says migrates: "
                    f"{str(mp['migrates']).lower()} (it migrates exactly when its kind "
                    f"is one of {', '.join(sorted(MIGRATABLE_KINDS))})")
        has = [k for k in RUN_KEYS if k in mp]
        if moves and len(has) != len(RUN_KEYS):
            bad.add("runs-missing", f"{where} migrates but has no "
                    f"{' and '.join(k for k in RUN_KEYS if k not in has)} runs")
        if not moves and has:
            bad.add("runs-stray", f"{where} does not migrate but has {' and '.join(has)} runs")
        extra = sorted(set(mp) - MAPPING_KEYS - set(RUN_KEYS))
        if extra:
            bad.add("mapping-keys", f"{where} has keys IMAGE.md does not define: "
                    f"{', '.join(repr(k)[:40] for k in extra[:5])}")
    order = [i for i in range(1, len(maps)) if starts[i] < ends[i - 1]]
    if order:
        i = order[0]
        bad.add("overlap", f"{_where_mapping(i - 1, maps[i - 1])} and "
                f"{_where_mapping(i, maps[i])} overlap or are out of address order",
                len(order))
    ms = np.array(starts, np.uint64)
    me = np.array(ends, np.uint64)
    sound = {}
    runs = {}
    page = np.uint64(PAGE_SIZE)
    for key in RUN_KEYS:
        a, n, own = _run_arrays(maps, key)
        e = a + n * page
        ok = True
        misaligned = np.flatnonzero(a % page)
        if misaligned.size:
            bad.add(f"{key}-align", f"{key} run at {int(a[misaligned[0]]):#x} is not page "
                    "aligned", misaligned.size)
            ok = False
        outside = np.flatnonzero((a < ms[own]) | (e > me[own]) | (e < a)) if a.size else a
        if outside.size:
            j = int(outside[0])
            bad.add(f"{key}-outside", f"{key} run {int(a[j]):#x} + {int(n[j])} pages lies "
                    f"outside its {_where_mapping(int(own[j]), maps[int(own[j])])}",
                    outside.size)
            ok = False
        unsorted = np.flatnonzero(a[1:] < e[:-1]) + 1 if a.size else a
        if unsorted.size:
            j = int(unsorted[0])
            bad.add(f"{key}-order", f"{key} runs at {int(a[j - 1]):#x} and {int(a[j]):#x} "
                    "overlap or are out of address order", unsorted.size)
            ok = False
        sound[key] = ok
        runs[key] = PageRuns.from_pairs(zip(a.tolist(), n.tolist())) if ok and a.size \
            else PageRuns.empty()
    data, zero = runs["data"], runs["zero"]
    if sound["data"] and sound["zero"]:
        both = data.intersect(zero)
        if both:
            a, n = both.pairs()[0]
            bad.add("data-zero", f"{both.total_pages()} pages are listed both as data and "
                    f"as zero (first at {a:#x}, {n} pages)")
    # chunk records: exactly the chunks holding data pages
    chunks = m["chunks"]
    vaddrs = [int(c["vaddr"], 16) for c in chunks]
    misaligned = [v for v in vaddrs if v % CHUNK_BYTES]
    if misaligned:
        bad.add("chunk-align", f"chunk record at {misaligned[0]:#x} is not aligned on a "
                f"chunk ({CHUNK_BYTES >> 20} MiB)", len(misaligned))
    unordered = [i for i in range(1, len(vaddrs)) if vaddrs[i] <= vaddrs[i - 1]]
    if unordered:
        bad.add("chunk-order", f"chunk records at {vaddrs[unordered[0] - 1]:#x} and "
                f"{vaddrs[unordered[0]]:#x} are repeated or out of address order",
                len(unordered))
    odd = [c for c in chunks if set(c) != CHUNK_KEYS]
    if odd:
        bad.add("chunk-keys", f"chunk record {odd[0]['vaddr']} has keys other than "
                f"{', '.join(sorted(CHUNK_KEYS))}", len(odd))
    slots: dict[int, int] = {}
    for v, c in zip(vaddrs, chunks):
        if c["slot"] in slots and slots[c["slot"]] != v:
            bad.add("slots", f"chunks {slots[c['slot']]:#x} and {v:#x} share slot {c['slot']}")
        slots.setdefault(c["slot"], v)
    if sound["data"]:
        ps, pn = cut_at_chunks(data.starts, data.counts)
        held, held_pages = np.unique(ps // CHUNK_PAGES, return_inverse=True)
        per_chunk = np.bincount(held_pages, weights=pn, minlength=held.size).astype(np.int64)
        want = dict(zip(held.tolist(), per_chunk.tolist()))
        got = {v >> CHUNK_SHIFT: c["pages"] for v, c in zip(vaddrs, chunks)}
        lost = sorted(set(want) - set(got))
        if lost:
            bad.add("chunk-missing", f"chunk {lost[0] << CHUNK_SHIFT:#x} holds "
                    f"{want[lost[0]]} data pages but has no chunk record", len(lost))
        empty = sorted(set(got) - set(want))
        if empty:
            bad.add("chunk-empty", f"chunk record {empty[0] << CHUNK_SHIFT:#x} names a "
                    "chunk that holds no data pages", len(empty))
        wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        if wrong:
            k = wrong[0]
            bad.add("chunk-pages", f"chunk record {k << CHUNK_SHIFT:#x} says {got[k]} pages, "
                    f"its data runs hold {want[k]}", len(wrong))
    # totals: equal to what the records say
    totals = m["totals"]
    recount = {"mappings": len(maps), "migratable_mappings": sum(mp["migrates"] for mp in maps),
               "chunks": len(chunks)}
    if sound["data"]:
        recount["data_pages"] = data.total_pages()
        recount["data_bytes"] = data.total_pages() * PAGE_SIZE
    if sound["zero"]:
        recount["zero_pages"] = zero.total_pages()
    for key, value in recount.items():
        if totals[key] != value:
            bad.add(f"totals-{key}", f"totals.{key} is {totals[key]}, the records say {value}")
    return bad.lines(), (data if sound["data"] else None)
