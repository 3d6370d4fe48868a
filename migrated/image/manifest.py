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


def check_meta(meta: Any) -> dict:
    """Source-supplied metadata: JSON-able, bounded, typed where we use it."""
    if not isinstance(meta, dict):
        raise ImageError("image metadata must be a dict")
    try:
        blob = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ImageError(f"image metadata is not plain JSON data: {exc}") from None
    if len(blob) > MAX_META_BYTES:
        raise MetaTooLarge(f"image metadata is {len(blob)} bytes of JSON, more than the "
                           f"{MAX_META_BYTES} allowed")
    meta = json.loads(blob)
    typed = {"pid": int, "exe": str, "source_node": str, "migration_id": str}
    for key, typ in typed.items():
        if key in meta and not (isinstance(meta[key], typ)
                                and not isinstance(meta[key], bool)):
            raise ImageError(f"image metadata {key!r} must be {typ.__name__}")
    cmd = meta.get("cmdline")
    if cmd is not None and not (isinstance(cmd, list)
                                and all(isinstance(a, str) for a in cmd)):
        raise ImageError("image metadata 'cmdline' must be a list of strings")
    return meta


# -- runs ------------------------------------------------------------------

def runs_to_json(starts: np.ndarray, counts: np.ndarray) -> list[list]:
    return [[f"{s:#x}", c] for s, c in zip(starts.tolist(), counts.tolist())]


def runs_from_json(pairs: Any, what: str) -> PageRuns:
    if not isinstance(pairs, list):
        raise ImageError(f"manifest: {what} runs must be a list")
    try:
        arr = [(int(a, 16), int(n)) for a, n in pairs]
    except (TypeError, ValueError):
        raise ImageError(f"manifest: malformed {what} runs") from None
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


def decode_manifest(blob: bytes, image_id: str) -> dict:
    """Parse and structurally check a manifest read from disk."""
    try:
        m = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"image {image_id}: manifest is not valid JSON ({exc}); "
                         "the image is corrupt -- remove it with "
                         f"`migratectl images rm {image_id}`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ImageError(f"image {image_id}: not a migrated image manifest")
    if m.get("version") != FORMAT_VERSION:
        raise ImageError(f"image {image_id}: manifest version {m.get('version')!r} "
                         f"is not supported (this build reads {FORMAT_VERSION})")
    try:
        if m["image_id"] != image_id:
            raise ImageError(f"image {image_id}: manifest names another image "
                             f"({m['image_id']!r})")
        if m["page_size"] != PAGE_SIZE or m["chunk_pages"] != CHUNK_PAGES:
            raise ImageError(f"image {image_id}: page size {m['page_size']} / "
                             f"chunk {m['chunk_pages']} differ from this host's")
        if not isinstance(m["mappings"], list) or not isinstance(m["chunks"], list):
            raise KeyError("mappings")
        for c in m["chunks"]:
            if not (isinstance(c["slot"], int) and 0 <= c["slot"] < 1 << 40
                    and isinstance(c["digest"], str)):
                raise KeyError("chunks")
            int(c["vaddr"], 16)
        for mp in m["mappings"]:
            int(mp["start"], 16), int(mp["end"], 16), mp["kind"], mp["perms"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageError(f"image {image_id}: manifest is missing or has a bad "
                         f"field ({exc}); the image is corrupt") from None
    return m
