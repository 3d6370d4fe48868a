"""The destination's image store: partial images being written, complete
images committed atomically, listing, verification, removal and export.

Layout under ``state_dir`` (see protocol/IMAGE.md)::

    images/<id>/manifest.json  pages.img     complete images
    partial/<id>/pages.img  (manifest.json)  in progress; removed at start

A directory only ever appears under images/ by one rename of a partial
directory whose manifest was written and fsynced last, so a crash at any
moment leaves either a complete image or a partial one that the next
``cleanup_partials()`` removes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import logging
import os
import shutil
import stat
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import xxhash

from migrated.errors import ImageError, ImageNotFound, ImageWithdrawn, QuotaExceeded
from migrated.runs import PAGE_SHIFT, PAGE_SIZE, PageRuns
from migrated.threads import Thread

from . import manifest as mf
from .manifest import CHUNK_BYTES, CHUNK_PAGES, CHUNK_SHIFT

log = logging.getLogger("migrated.image.store")

# Keep this much free on the state filesystem whatever the quota says: the
# daemon's journal and other images must still be writable when an
# incoming image is refused.
DEFAULT_MIN_FREE_BYTES = 64 * 1024 * 1024

# Re-check free space after every this many bytes written, so a filesystem
# filled by someone else is noticed before ENOSPC hits mid-page.
FREE_RECHECK_BYTES = 32 * 1024 * 1024

# Page data is written to the page file in pieces of at most this many
# bytes.  The kernel gives a buffered write page-cache folios as large as
# the write allows: a 4 MiB pwrite takes 2 MiB folios, which only free
# 2 MiB blocks can supply.  On a VM that returns the memory its guest
# frees to the host (free page reporting, 2 MiB blocks at a time), those
# blocks are the ones the host took back, and the first write into them
# costs a host fault per page.  Measured here (a 512 MiB TLS round 0):
# the writer thread's CPU per byte stored was 1.6-2.2 ns/B whenever the
# guest's recently used memory had been given back (the rate fell to
# 276-376 MiB/s), 0.30-0.37 otherwise.  In 256 KiB pieces the folios are
# small and come from memory the guest kept: 0.37-0.57 ns/B either way
# (368-495 MiB/s with the memory given back, 406-491 without, against
# 448-497 for whole batches).  On bare metal the pieces cost a few more
# calls and folios, nothing else.  Pages spliced from a plain socket are
# left as they are (up to 1 MiB per splice): cutting those splices into
# such pieces measured slower (TCP round 0 median 889 against 1004 MiB/s,
# nine alternating runs each).  tests/image/test_folios.py reads the
# folio sizes back.
STORE_WRITE_BYTES = 256 * 1024

# read_memory() is for inspection: bound what one call may allocate.
MAX_READ_BYTES = 256 * 1024 * 1024

# Chunks (2 MiB of address space each with 4 KiB pages) one image may
# describe: chunks holding data or zero pages.  Zero pages carry no bytes,
# so neither the peer's quota nor the store's sees them, yet each chunk
# they touch costs the writer a slot of bookkeeping (three 512-byte
# bitmap rows and a table entry: ~1.6 KiB).  Without a bound a 60-byte
# zeros message over a mapping as large as user space (2^56 bytes) made
# the daemon take gigabytes.  2^17 chunks are 256 GiB of address space
# with data or zero pages, more than any process we migrate; the writer's
# bookkeeping then stays near 210 MiB.  An image that would describe more
# is refused (QuotaExceeded: code "quota" on the wire).  ImageStore's
# ``max_image_chunks`` overrides it (tests use a small one).
MAX_IMAGE_CHUNKS = 1 << 17

# Zero, drop and layout changes build page masks of at most this many
# chunks at once (1024 x 513 bytes: 0.5 MiB, a few such temporaries),
# whatever the runs name.
_MASK_BLOCK_CHUNKS = 1024

# Threads digesting the chunks left for commit (pread and xxh3 both release
# the GIL).  Two: the source is idle waiting for our answer and the
# machines we measure on have two cores; more would only contend.
COMMIT_DIGEST_THREADS = 2

# A write_pages call whose pages fall into at most this many stretches of
# the page file updates the bitmaps by slices, else by page index.
_FEW_STRETCHES = 16

# Initial rows of the per-chunk bitmaps; they double as needed.
_INITIAL_SLOTS = 64

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class DiskFull(QuotaExceeded):
    """ENOSPC/EDQUOT, or free space below the reserve, while writing."""


class LayoutViolation(ImageError):
    """Pages outside the migratable mappings of the declared layout."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _punch(fd: int, offset: int, length: int) -> bool:
    """Free the blocks of a file range (reads then return zeros)."""
    return _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                           offset, length) == 0


# Errors of fallocate() that mean "this filesystem cannot": writes then
# allocate as they always did.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def _allocate(fd: int, stretches: list[tuple[int, int, int]]) -> bool:
    """Allocate the blocks of the file ranges about to be written, each
    (file offset, first byte, end byte), in one fallocate call per range,
    without changing the file's size.  Page data written into blocks so
    allocated skips ext4's delayed allocation, which reserves and tracks
    every 4 KiB block of a buffered write on its own: the destination's
    CPU per byte stored fell from 0.52-0.62 to 0.44-0.50 ns/B (512 MiB
    round 0 over TCP, nine runs each, alternating).  Only pages that carry
    data are ever written, so no space goes to zero pages.  Returns False
    where the filesystem cannot (the caller stops asking); raises OSError
    (ENOSPC, EDQUOT...) otherwise."""
    for off, a, b in stretches:
        if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, off, b - a) != 0:
            err = ctypes.get_errno()
            if err in _NO_FALLOCATE:
                return False
            raise OSError(err, os.strerror(err))
    return True


def _page_index(seg_fp: np.ndarray, seg_data: np.ndarray, seg_n: np.ndarray) -> np.ndarray:
    """File page of every page of the stretches ImageWriter._segments
    returns, in data order."""
    return np.repeat(seg_fp - seg_data, seg_n) + np.arange(int(seg_n.sum()))


def _page_bounds(runs: PageRuns) -> tuple[np.ndarray, np.ndarray]:
    """First and end page number of each run (int64)."""
    pn = (runs.starts >> np.uint64(PAGE_SHIFT)).astype(np.int64)
    return pn, pn + runs.counts.astype(np.int64)


def _distinct_chunks(pn: np.ndarray, end: np.ndarray) -> int:
    """Chunks that page ranges [pn, end) (sorted, disjoint) touch, counted
    per range: a chunk shared by neighbours is counted once."""
    first, last = pn // CHUNK_PAGES, (end - 1) // CHUNK_PAGES
    return int((last - first + 1).sum()) - int(np.count_nonzero(first[1:] == last[:-1]))


def _chunk_pieces(pn: np.ndarray, end: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut page ranges [pn, end) at chunk boundaries: (chunk number, first
    page in the chunk, end page in the chunk) of each piece, in address
    order.  One entry per piece, so the caller bounds the chunks first
    (_distinct_chunks)."""
    first = pn // CHUNK_PAGES
    pieces = (end - 1) // CHUNK_PAGES - first + 1
    run = np.repeat(np.arange(pn.size), pieces)
    chunk = first[run] + (np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces))
    base = chunk * CHUNK_PAGES
    return (chunk, np.maximum(pn[run], base) - base,
            np.minimum(end[run], base + CHUNK_PAGES) - base)


def _piece_masks(slots: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Yield (slots, page masks) for pieces (slot, first page, end page) in
    address order (a slot's pieces are neighbours): each slot once, with a
    (n, CHUNK_PAGES) mask of its pages, at most _MASK_BLOCK_CHUNKS rows at
    a time."""
    if slots.size == 0:
        return
    head = np.empty(slots.size, bool)
    head[0] = True
    np.not_equal(slots[1:], slots[:-1], out=head[1:])
    row = np.cumsum(head) - 1
    uniq = slots[head]
    width = CHUNK_PAGES + 1
    for r0 in range(0, uniq.size, _MASK_BLOCK_CHUNKS):
        r1 = min(uniq.size, r0 + _MASK_BLOCK_CHUNKS)
        p0, p1 = np.searchsorted(row, [r0, r1])
        at = (row[p0:p1] - r0) * width
        delta = np.zeros((r1 - r0) * width, np.int8)
        np.add.at(delta, at + lo[p0:p1], 1)
        np.add.at(delta, at + hi[p0:p1], -1)
        masks = np.cumsum(delta.reshape(r1 - r0, width), axis=1, dtype=np.int8)
        yield uniq[r0:r1], masks[:, :CHUNK_PAGES] > 0


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset``, at most STORE_WRITE_BYTES per
    call (a short write is resumed)."""
    while len(view):
        n = os.pwrite(fd, view[:STORE_WRITE_BYTES], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view, offset = view[n:], offset + n


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread that pads a short read (sparse tail) with zeros."""
    buf = os.pread(fd, length, offset)
    if len(buf) < length:
        buf += bytes(length - len(buf))
    return buf


@dataclass
class VerifyResult:
    image_id: str
    ok: bool
    manifest_ok: bool
    chunks: int
    chunks_checked: int
    bytes_checked: int
    bad_chunks: int
    first_bad: dict | None
    error: str | None
    # Every way the image contradicts protocol/IMAGE.md (one line per kind
    # of violation); ``error`` sums them up.  Empty when ``ok``.
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class ImageStore:
    """Images of migrated processes under ``state_dir``.

    ``quota_bytes`` caps the page data held by the store (complete images
    plus every open writer); ``min_free_bytes`` is kept free on the
    filesystem regardless; ``max_image_chunks`` caps the chunks one image
    may describe (MAX_IMAGE_CHUNKS).  One instance is meant to serve the
    whole daemon (writers in several threads share its accounting).
    """

    def __init__(self, state_dir: str, quota_bytes: int | None = None,
                 min_free_bytes: int = DEFAULT_MIN_FREE_BYTES, *,
                 create: bool = True, max_image_chunks: int = MAX_IMAGE_CHUNKS):
        self.state_dir = os.path.abspath(state_dir)
        self.images_dir = os.path.join(self.state_dir, "images")
        self.partial_dir = os.path.join(self.state_dir, "partial")
        self.quota_bytes = quota_bytes
        self.min_free_bytes = int(min_free_bytes)
        self.max_image_chunks = int(max_image_chunks)
        self._lock = threading.Lock()
        # Open and staged writers.  A withdrawal (SPEC.md 9.2) marks those of
        # the requester's own migration; nothing else is remembered, so a
        # peer can neither fill nor flush any list of withdrawn migrations.
        self._writers: set[ImageWriter] = set()
        # Bytes of complete images, as last counted from images/.  Other
        # processes change images/ too (`migratectl images rm` has a store of
        # its own), so begin() counts again, and so does any quota check
        # before it refuses (_check_room).
        self._committed: int | None = None
        if create:
            for d in (self.state_dir, self.images_dir, self.partial_dir):
                os.makedirs(d, mode=_DIR_MODE, exist_ok=True)

    # -- paths ----------------------------------------------------------

    def _image_path(self, image_id: str) -> str:
        return os.path.join(self.images_dir, mf.check_image_id(image_id))

    def _existing(self, image_id: str) -> str:
        path = self._image_path(image_id)
        if not os.path.isfile(os.path.join(path, mf.MANIFEST_NAME)):
            raise ImageNotFound(f"no image {image_id} in {self.images_dir} "
                                "(see `migratectl images list`)")
        return path

    # -- accounting -------------------------------------------------------

    @staticmethod
    def _dir_bytes(path: str) -> int:
        total = 0
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_blocks * 512
        except FileNotFoundError:
            pass
        return total

    def _committed_bytes(self, fresh: bool = False) -> int:
        """Bytes of the complete images; with ``fresh`` (or when unknown)
        counted again from images/: one scandir of it and one of each image
        (two files).  An image a writer of ours has renamed into images/ but
        not yet handed over (publish() between its rename and _forget) is
        left out: the writer still charges it.  Call locked."""
        if fresh or self._committed is None:
            ours = {w.image_id for w in self._writers}
            total = 0
            try:
                with os.scandir(self.images_dir) as it:
                    for e in it:
                        if e.name not in ours and mf.IMAGE_ID_RE.fullmatch(e.name) \
                                and e.is_dir(follow_symlinks=False):
                            total += self._dir_bytes(e.path)
            except FileNotFoundError:
                pass
            self._committed = total
        return self._committed

    def used_bytes(self) -> int:
        """Bytes charged against the quota now (images + open writers)."""
        with self._lock:
            return self._committed_bytes(fresh=True) + sum(w._charge() for w in self._writers)

    def _free_bytes(self) -> int:
        st = os.statvfs(self.state_dir)
        return st.f_bavail * st.f_frsize

    def _check_room(self, writer: "ImageWriter | None", extra: int,
                    peer_charge: int) -> None:
        """Raise unless ``extra`` more bytes fit the quota.  Call locked."""
        if self.quota_bytes is None:
            return
        others = sum(w._charge() for w in self._writers if w is not writer)
        used = self._committed_bytes() + others
        if used + peer_charge + extra > self.quota_bytes:
            # Images may have been removed by another process since the
            # count: count again before refusing (only on this path, so
            # writes never pay for a scan).
            used = self._committed_bytes(fresh=True) + others
        if used + peer_charge + extra > self.quota_bytes:
            raise QuotaExceeded(
                f"image store quota exceeded in {self.state_dir}: "
                f"{_mib(used)} in use by other images, this image needs "
                f"{_mib(peer_charge + extra)}, quota {_mib(self.quota_bytes)}; "
                "remove old images (`migratectl images rm ID`) or raise the quota")

    # -- writers ----------------------------------------------------------

    def cleanup_partials(self) -> int:
        """Remove every partial image (call at daemon start); returns count."""
        n = 0
        try:
            entries = os.listdir(self.partial_dir)
        except FileNotFoundError:
            return 0
        for name in entries:
            p = os.path.join(self.partial_dir, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
            n += 1
        if n:
            _fsync_dir(self.partial_dir)
        return n

    def begin(self, meta: dict, expected_bytes: int = 0) -> "ImageWriter":
        """Open a writer for a new image.  The free-space and quota checks
        happen here, before any page is accepted."""
        meta = mf.check_meta(meta)
        if not isinstance(expected_bytes, int) or expected_bytes < 0:
            raise ImageError(f"expected image size {expected_bytes!r} is not a "
                             "non-negative integer")
        with self._lock:
            # Free space is promised to the images being received too: what
            # each still expects to write is not free (three receives at
            # once each saw the same free space and ran the disk full).
            promised = sum(max(0, w._charge() - w._alloc_pages * PAGE_SIZE)
                           for w in self._writers)
            free = self._free_bytes() - promised
            if expected_bytes + self.min_free_bytes > free:
                raise DiskFull(
                    f"not enough free space in {self.state_dir}: the image needs "
                    f"{_mib(expected_bytes)} and {_mib(self.min_free_bytes)} must stay "
                    f"free, but only {_mib(max(free, 0))} is available"
                    + (f" ({_mib(promised)} more is promised to images being received)"
                       if promised else "")
                    + "; free some space or remove old images (`migratectl images rm ID`)")
            self._committed_bytes(fresh=True)     # images rm'd by others count no more
            self._check_room(None, expected_bytes, 0)
            image_id = mf.new_image_id()
            path = os.path.join(self.partial_dir, image_id)
            os.mkdir(path, _DIR_MODE)
            try:
                writer = ImageWriter(self, image_id, path, meta, expected_bytes)
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            self._writers.add(writer)
        return writer

    def _forget(self, writer: "ImageWriter", committed_bytes: int = 0) -> None:
        with self._lock:
            self._writers.discard(writer)
            if self._committed is not None:
                self._committed += committed_bytes

    # -- complete images --------------------------------------------------

    def _image_ids(self) -> list[str]:
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if mf.IMAGE_ID_RE.fullmatch(n)
                      and os.path.isfile(os.path.join(self.images_dir, n,
                                                      mf.MANIFEST_NAME)))

    def _gone(self, image_id: str) -> ImageNotFound:
        return ImageNotFound(f"no image {image_id} in {self.images_dir} (it was just "
                             "removed; see `migratectl images list`)")

    def show(self, image_id: str) -> dict:
        """The image's manifest, every field a reader uses type-checked
        (ImageError otherwise); ImageNotFound if it is not there, or was
        removed while being read."""
        path = self._existing(image_id)
        try:
            with open(os.path.join(path, mf.MANIFEST_NAME), "rb") as f:
                blob = f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise self._gone(image_id) from None
        return mf.decode_manifest(blob, image_id)

    def list(self) -> list[dict]:
        """One row per complete image.  An image whose manifest cannot be
        read or is malformed is one row with ``error`` (the others are still
        listed); one removed while listing is left out."""
        out = []
        for image_id in self._image_ids():
            try:
                m = self.show(image_id)
            except ImageNotFound:
                continue              # removed since the directory was read
            except ImageError as exc:
                out.append({"image_id": image_id, "error": str(exc)})
                continue
            except PermissionError:
                raise                 # the caller's own problem (not root?)
            except OSError as exc:
                out.append({"image_id": image_id, "error": f"image {image_id}: manifest "
                            f"cannot be read: {exc.strerror or exc}"})
                continue
            meta = m["meta"]
            out.append({
                "image_id": image_id,
                "created": m.get("committed_at"),
                "source_node": meta.get("source_node"),
                "migration_id": meta.get("migration_id"),
                "pid": meta.get("pid"),
                "exe": meta.get("exe"),
                "cmdline": meta.get("cmdline"),
                "mappings": len(m["mappings"]),
                **{k: m["totals"][k] for k in mf.TOTALS_KEYS},
                "digest": m["digest"],
            })
        return out

    def remove(self, image_id: str) -> None:
        """Take an image out of images/ in one rename, then delete it.
        ImageNotFound if it is not there -- or if another process (an
        `images rm`, a withdrawal) removed it first."""
        path = self._existing(image_id)
        # Move it out of images/ in one rename first: a crash mid-delete
        # leaves a partial that the next start removes, never half an image.
        trash = os.path.join(self.partial_dir, f"{image_id}.removing")
        nbytes = self._dir_bytes(path)
        for attempt in (1, 2):
            try:
                os.rename(path, trash)
                break
            except FileNotFoundError:
                raise self._gone(image_id) from None
            except OSError as exc:
                # A trash directory left by a removal that crashed (or one
                # under way elsewhere): clear it, try once more.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or attempt == 2:
                    raise
                if not os.path.isdir(path):
                    raise self._gone(image_id) from None
                shutil.rmtree(trash, ignore_errors=True)
        _fsync_dir(self.images_dir)
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            if self._committed is not None:
                self._committed = max(0, self._committed - nbytes)

    def withdraw_migration(self, migration_id: str, image_id: str, *,
                           source_node: str, source_peer: str = "") -> str:
        """A source resolving a migration left in doubt (SPEC.md 9.2).

        Only what the requester owns is touched -- a writer or an image
        whose metadata names this ``migration_id``, ``source_node`` and
        ``source_peer`` (the certificate name it presented):

        * every open or staged writer of that migration is marked, so that
          it is never published (publish() checks the mark under the store
          lock, so either the mark comes first or the rename does, and the
          image is then found below);
        * the published image ``image_id``, and any image such a writer has
          already renamed into images/, is removed.

        Returns "removed" (an image was taken out) or "absent" (none was
        published, and none of that migration will be).  A request that
        matches nothing records nothing: no peer can fill or flush a list
        of withdrawn migrations, nor block another source's publish.
        Raises ImageError when image ``image_id`` exists but is not the
        requester's (it is left alone)."""
        image_id = mf.check_image_id(image_id)
        owner = (migration_id, source_node, source_peer)
        with self._lock:
            mine = [w for w in self._writers if _owned_by(w.meta, *owner)]
            for w in mine:
                w._withdraw_requested = True
        removed = False
        for iid in dict.fromkeys([image_id] + [w.image_id for w in mine]):
            try:
                meta = self.show(iid)["meta"]
            except ImageNotFound:
                continue
            if not _owned_by(meta, *owner):
                raise ImageError(f"image {iid} was not published for migration "
                                 f"{migration_id} from {source_node}; it is left alone")
            try:
                self.remove(iid)
                removed = True
            except ImageNotFound:
                pass                 # removed meanwhile (images rm): gone all the same
        return "removed" if removed else "absent"

    def is_withdrawn(self, migration_id: str | None) -> bool:
        """Whether a writer of that migration is marked withdrawn (it will
        not be published)."""
        with self._lock:
            return bool(migration_id) and any(
                w._withdraw_requested and w.meta.get("migration_id") == migration_id
                for w in self._writers)

    def verify(self, image_id: str) -> VerifyResult:
        """Check the image against protocol/IMAGE.md: the manifest's types
        and digest, every structural rule it states (mappings, runs, chunk
        records, totals; mf.structure_problems), the directory's contents
        and the page file's length, and every chunk digest against
        pages.img.  Every check runs even after a failure; ``problems``
        lists each kind of violation found."""
        path = self._existing(image_id)
        res = VerifyResult(image_id, False, False, 0, 0, 0, 0, None, None)
        try:
            m = self.show(image_id)
        except ImageNotFound:
            raise
        except ImageError as exc:
            res.error = str(exc)
            res.problems = [str(exc)]
            return res
        problems: list[str] = []
        res.chunks = len(m["chunks"])
        want = m["digest"]
        got = mf.image_digest(m)
        res.manifest_ok = want == got
        if not res.manifest_ok:
            problems.append(f"manifest digest mismatch: recorded {want}, computed "
                            f"{got}; the manifest was altered or corrupted")
        structure, data = mf.structure_problems(m)
        problems += structure
        fd = -1
        try:
            fd = os.open(os.path.join(path, mf.PAGES_NAME), os.O_RDONLY | _OPEN_FLAGS)
        except OSError as exc:
            if not os.path.isdir(path):
                raise self._gone(image_id) from None    # removed while we looked
            problems.append(f"cannot open page data {mf.PAGES_NAME}: {exc.strerror or exc}")
        try:
            problems += self._directory_problems(path, image_id)
            if fd >= 0:
                problems += _tail_problems(fd, m["chunks"])
                if data is None:
                    problems.append("chunk digests not checked: the data runs are "
                                    "inconsistent (see above)")
                else:
                    self._verify_chunks(fd, m, data, res)
        finally:
            if fd >= 0:
                os.close(fd)
        if res.first_bad is not None:
            fb = res.first_bad
            problems.append(f"{res.bad_chunks} of {res.chunks} chunks differ; first bad "
                            f"chunk at {fb['vaddr']} (slot {fb['slot']}): expected "
                            f"{fb['expected']}, got {fb['actual']}")
        res.problems = problems
        res.ok = not problems
        if problems:
            shown = problems[:mf.MAX_PROBLEMS_SHOWN]
            more = len(problems) - len(shown)
            res.error = "; ".join(shown) + (f"; and {more} more" if more else "")
        return res

    @staticmethod
    def _verify_chunks(fd: int, m: dict, data: PageRuns, res: VerifyResult) -> None:
        """Digest every chunk record's data pages from the page file (one
        read per chunk) and compare; counts into ``res``.  A record whose
        chunk holds no data (structure_problems reports it) is skipped."""
        ps, pn = mf.cut_at_chunks(data.starts, data.counts)
        chunk_of = ps // CHUNK_PAGES
        for c in m["chunks"]:
            vaddr = int(c["vaddr"], 16)
            lo, hi = np.searchsorted(chunk_of, [vaddr >> CHUNK_SHIFT,
                                                (vaddr >> CHUNK_SHIFT) + 1])
            if lo == hi or vaddr % CHUNK_BYTES:
                continue
            mask = _mask_from_pieces(ps[lo:hi] - (vaddr >> PAGE_SHIFT), pn[lo:hi])
            digest, nbytes = _chunk_digest(fd, c["slot"], mask)
            res.chunks_checked += 1
            res.bytes_checked += nbytes
            if digest != c["digest"] or int(mask.sum()) != c["pages"]:
                res.bad_chunks += 1
                if res.first_bad is None:
                    res.first_bad = {"vaddr": c["vaddr"], "slot": c["slot"],
                                     "expected": c["digest"], "actual": digest}

    def _directory_problems(self, path: str, image_id: str) -> list[str]:
        """The image directory must hold exactly manifest.json and pages.img,
        both regular files (IMAGE.md, "Directory layout")."""
        try:
            names = set(os.listdir(path))
        except FileNotFoundError:
            raise self._gone(image_id) from None      # removed while we looked
        except OSError as exc:
            return [f"cannot list the image directory: {exc.strerror or exc}"]
        out = []
        extra = sorted(names - {mf.MANIFEST_NAME, mf.PAGES_NAME})
        if extra:
            out.append(f"the image directory holds files IMAGE.md does not list: "
                       f"{', '.join(repr(n) for n in extra[:5])}"
                       f"{f' and {len(extra) - 5} more' if len(extra) > 5 else ''}")
        for name in (mf.MANIFEST_NAME, mf.PAGES_NAME):
            try:
                st = os.lstat(os.path.join(path, name))
            except FileNotFoundError:
                out.append(f"{name} is missing")
                continue
            if not stat.S_ISREG(st.st_mode):
                out.append(f"{name} is not a regular file")
        return out

    def read_memory(self, image_id: str, addr: int, length: int) -> bytes:
        """The bytes the process had at [addr, addr+length) as stored in the
        image (zeros where no data page is held).  For inspection and tests."""
        if not 0 <= length <= MAX_READ_BYTES:
            raise ImageError(f"read of {length} bytes: at most {MAX_READ_BYTES} "
                             "per call")
        path = self._existing(image_id)
        m = self.show(image_id)
        lo = addr & ~(PAGE_SIZE - 1)
        hi = (addr + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        out = bytearray(hi - lo)
        if hi == lo:
            return b""
        want = self._data_runs(m).clip(lo, hi)
        ps, pn = mf.cut_at_chunks(want.starts, want.counts)
        slot_of = {int(c["vaddr"], 16) >> CHUNK_SHIFT: c["slot"] for c in m["chunks"]}
        fd = os.open(os.path.join(path, mf.PAGES_NAME), os.O_RDONLY | _OPEN_FLAGS)
        try:
            for p, n in zip(ps.tolist(), pn.tolist()):
                slot = slot_of.get(p // CHUNK_PAGES)
                if slot is None:
                    raise ImageError(f"image {image_id}: data at {p << PAGE_SHIFT:#x} "
                                     "has no chunk slot; the manifest is corrupt")
                off = slot * CHUNK_BYTES + (p % CHUNK_PAGES) * PAGE_SIZE
                at = (p << PAGE_SHIFT) - lo
                out[at:at + n * PAGE_SIZE] = _pread_full(fd, n * PAGE_SIZE, off)
        finally:
            os.close(fd)
        return bytes(out[addr - lo:addr - lo + length])

    @staticmethod
    def _data_runs(m: dict) -> PageRuns:
        parts = [mf.runs_from_json(mp.get("data", []), "data") for mp in m["mappings"]]
        return PageRuns.concat(parts)

    def export_core(self, image_id: str, path: str, *, overwrite: bool = False) -> dict:
        """Write the image as an ELF core file; returns a small summary.
        An image whose manifest contradicts IMAGE.md is refused (the core
        would miss or misplace memory); chunk digests are not checked here
        (``verify`` does)."""
        from .elfcore import write_core
        src = self._existing(image_id)
        m = self.show(image_id)
        problems, _ = mf.structure_problems(m)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ImageError(f"image {image_id} is inconsistent, not exporting it: "
                             f"{problems[0]}{more}; see `migratectl images verify "
                             f"{image_id}`")
        fd = os.open(os.path.join(src, mf.PAGES_NAME), os.O_RDONLY | _OPEN_FLAGS)
        try:
            return write_core(m, fd, path, overwrite=overwrite)
        finally:
            os.close(fd)


def _tail_problems(fd: int, chunks: list[dict]) -> list[str]:
    """pages.img may not hold data past the end of the highest slot a chunk
    record names (the writer truncates it there; holes past it, as images
    written before that left, are harmless)."""
    end = (max(c["slot"] for c in chunks) + 1) * CHUNK_BYTES if chunks else 0
    size = os.fstat(fd).st_size
    if size <= end:
        return []
    try:
        at = os.lseek(fd, end, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return []                 # only holes past the last slot
        at = end                      # SEEK_DATA unsupported: take it as data
    return [f"{mf.PAGES_NAME} is {size} bytes and holds data at {at}, past the end of "
            f"its last chunk slot ({end} bytes): bytes no chunk record describes"]


def _mask_from_pieces(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Page mask of one chunk from (first page index, count) pieces."""
    delta = np.zeros(CHUNK_PAGES + 1, np.int32)
    np.add.at(delta, first, 1)
    np.add.at(delta, first + counts, -1)
    return np.cumsum(delta[:-1]) > 0


class _ChunkBuffers:
    """Chunk-sized read buffers for digesting, lent to whichever thread
    digests and kept across threads.  (They were per thread: the commit's
    digest helpers live for milliseconds, and each one's first chunk paid
    for a fresh buffer's page faults -- 1.3-2.8 ms against 0.2-0.3 for the
    chunks after, inside the freeze.  Now they get the buffers the
    checkpoint thread kept warm.)  A buffer is an anonymous mapping, so page
    aligned: a malloc'd bytearray starts 16 bytes into a page, and reads
    from the page cache into a destination so aligned were measured 8x
    slower here (0.9 vs 0.12 ms per 2 MiB).  At most ``keep`` idle buffers
    are kept; more in use at once are made and dropped as needed."""

    def __init__(self, keep: int):
        self._keep = keep
        self._idle: list[memoryview] = []
        self._lock = threading.Lock()
        self.made = 0

    def _make(self) -> memoryview:
        with self._lock:
            self.made += 1
        return memoryview(mmap.mmap(-1, CHUNK_BYTES,
                                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))

    def take(self) -> memoryview:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self._make()

    def give_back(self, buf: memoryview) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(buf)

    def reserve(self, n: int) -> None:
        """Have at least ``n`` idle buffers (at most ``keep``), their pages
        already faulted in: called off the freeze, so that every digest
        thread of a commit finds a warm one.  (A fresh buffer's first read
        faults in 512 zeroed pages: 2 ms, and up to 20 ms on a VM whose
        host took that memory back.)"""
        with self._lock:
            missing = min(n, self._keep) - len(self._idle)
        made = [self._make() for _ in range(max(0, missing))]
        for buf in made:
            np.frombuffer(buf, np.uint8)[::PAGE_SIZE] = 0     # touch every page
            self.give_back(buf)


# Idle buffers kept: one per commit digest thread, and two more for the
# checkpoint threads of images received at the same time (4 x 2 MiB).
_CHUNK_BUFFERS = _ChunkBuffers(keep=COMMIT_DIGEST_THREADS + 2)


def _chunk_digest(fd: int, slot: int, mask: np.ndarray) -> tuple[str, int]:
    """xxh3_128 of the present pages of one chunk, in address order: one
    read of the span they cover into a reused buffer, then the runs of
    present pages fed to one streaming hash (the same digest as hashing
    their concatenation, without building it)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return xxhash.xxh3_128_hexdigest(b""), 0
    lo, hi = int(idx[0]), int(idx[-1]) + 1
    span = (hi - lo) * PAGE_SIZE
    buf = _CHUNK_BUFFERS.take()
    try:
        view = buf[:span]
        off = slot * CHUNK_BYTES + lo * PAGE_SIZE
        got = 0
        while got < span:
            k = os.preadv(fd, [view[got:]], off + got)
            if k <= 0:                       # end of a sparse file: zeros
                view[got:] = bytes(span - got)
                break
            got += k
        if idx.size == hi - lo:
            return xxhash.xxh3_128_hexdigest(view), span
        brk = np.flatnonzero(np.diff(idx) != 1) + 1
        firsts = (idx[np.concatenate(([0], brk))] - lo) * PAGE_SIZE
        lasts = (idx[np.concatenate((brk - 1, [idx.size - 1]))] + 1 - lo) * PAGE_SIZE
        h = xxhash.xxh3_128()
        for a, b in zip(firsts.tolist(), lasts.tolist()):
            h.update(view[a:b])
        return h.hexdigest(), int(idx.size) * PAGE_SIZE
    finally:
        _CHUNK_BUFFERS.give_back(buf)


class _InThread:
    """Run ``fn(*args)`` in a thread now; ``join()`` then ``result()``
    (re-raises its exception)."""

    def __init__(self, fn, *args):
        self._out: tuple[Any, BaseException | None] = (None, None)

        def run() -> None:
            try:
                self._out = (fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 -- handed to result()
                self._out = (None, exc)
        # Not named in the kernel (migrated.threads): these live for
        # milliseconds, inside the freeze, and naming costs ~20 us a thread.
        self._thread = threading.Thread(target=run, name="migrated-store", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        value, exc = self._out
        if exc is not None:
            raise exc
        return value


def _digest_chunks(fd: int, todo: list[tuple[dict, int, np.ndarray]]) -> None:
    """Fill rec["digest"] for each (rec, slot, mask), COMMIT_DIGEST_THREADS
    at a time when there are enough of them."""
    def work(part) -> None:
        for rec, slot, mask in part:
            rec["digest"] = _chunk_digest(fd, slot, mask)[0]
    if len(todo) < 2 * COMMIT_DIGEST_THREADS:
        work(todo)
        return
    helpers = [_InThread(work, todo[k::COMMIT_DIGEST_THREADS])
               for k in range(1, COMMIT_DIGEST_THREADS)]
    try:
        work(todo[0::COMMIT_DIGEST_THREADS])
    finally:
        for h in helpers:
            h.join()
    for h in helpers:
        h.result()


# A flush that carried fewer page bytes than this says more about the
# device's flush latency than about its rate: no rate sample is taken.
FLUSH_RATE_SAMPLE_BYTES = 8 * 1024 * 1024
# Weight of the newest sample in the flush rate (exponential average).
FLUSH_RATE_WEIGHT = 0.5


class _FlushState:
    """What the flusher learned, kept by the writer across flushers and
    read from other threads (plain numbers; a stale read is harmless):
    ``flushed`` = page bytes known durable (written before the start of
    the last completed flush), ``rate`` = bytes/s the flushes achieved
    (0.0: none measured yet), ``listener`` = called in the flusher's
    thread after each flush, ``error`` = the first error a background
    flush reported.

    That error is kept for prepare() to raise: Linux reports a failed
    write-back once per open file description, so once a flush has been
    told, nothing promises that the commit's own fsync hears of it again
    (older kernels, some filesystems).  The pages it lost are gone from
    disk while the page cache still serves them: commit would digest,
    verify and publish an image whose data is not on disk."""

    __slots__ = ("flushed", "rate", "listener", "error")

    def __init__(self) -> None:
        self.flushed = 0
        self.rate = 0.0
        self.listener: Callable[[], None] | None = None
        self.error: OSError | None = None

    def done(self, mark: int, seconds: float) -> None:
        carried = mark - self.flushed
        if mark > self.flushed:
            self.flushed = mark
        if carried >= FLUSH_RATE_SAMPLE_BYTES and seconds > 0:
            sample = carried / seconds
            self.rate = sample if not self.rate else \
                FLUSH_RATE_WEIGHT * sample + (1.0 - FLUSH_RATE_WEIGHT) * self.rate


class _Flusher:
    """fdatasync of the page file in a thread of its own, on request: the
    data of the rounds received so far goes to disk while the source is
    still running, so the fsync inside commit only has the last rounds
    left.  Kicks while a flush runs ask for one more; it never blocks the
    caller.  ``written()`` gives the page bytes written so far: what a
    flush that starts now makes durable (recorded in ``state``).

    It flushes through a file description of its own (the page file opened
    again, not a dup), which it closes itself: a write-back error is then
    reported to it without being consumed for the writer's descriptor, so
    the commit's fsync still sees it.  And whatever error a flush gets is
    recorded in ``state.error`` for the commit to raise (see _FlushState);
    after one, no more flushes are made (the image is lost anyway)."""

    def __init__(self, fd: int, state: _FlushState, written: Callable[[], int],
                 what: str = "a page file"):
        self._what = what
        try:
            self._fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = os.dup(fd)   # no /proc: the recorded error still counts
        self._kick = threading.Event()
        self._stop = False
        self.sync_s = 0.0
        self.flushes = 0
        self._state = state
        self._written = written
        self._thread = Thread(target=self._loop, name="migrated-flush", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def _loop(self) -> None:
        try:
            while True:
                self._kick.wait()
                self._kick.clear()
                if self._stop:
                    return
                if self._state.error is not None:
                    continue
                mark = self._written()
                t0 = time.perf_counter()
                try:
                    os.fdatasync(self._fd)
                except OSError as exc:
                    # Never dropped: these pages may be lost on disk, and
                    # the commit's fsync may not be told again.
                    self._state.error = exc
                    log.error("background flush of %s failed: %s; it will not be "
                              "committed", self._what, exc)
                    continue
                dt = time.perf_counter() - t0
                self.sync_s += dt
                self.flushes += 1
                self._state.done(mark, dt)
                listener = self._state.listener
                if listener is not None and not self._stop:
                    try:
                        listener()
                    except Exception:  # noqa: BLE001 -- a report, never the flush
                        log.exception("flush listener failed")
        finally:
            os.close(self._fd)

    def stop(self) -> None:
        self._stop = True
        self._kick.set()

    def join(self) -> None:
        """Wait for the thread to end (after stop()): a flush in flight
        then has recorded its outcome."""
        self._thread.join()


class _Checkpointer:
    """Digests chunks in the background while an image is still being
    received (``ImageWriter.checkpoint``), so that commit -- which the
    source waits for with its process frozen -- only digests the chunks
    changed since the last checkpoint.  (Flushing is _Flusher's job, in a
    thread of its own, so a long fdatasync never delays a digest.)

    Jobs are handled one at a time.  A job is (the job id of each slot,
    slots, data masks as they were when it was queued).  A result is stored
    as ``cache[slot] = (job id, digest, pages)``; the writer trusts it only
    if that job was the last to snapshot the slot and the slot has not
    changed since (see ImageWriter._cached_digest).

    At most one job waits: a job submitted while another still waits is
    merged into it, a slot in both keeping the newer snapshot (the older
    one could never be trusted again).  The peer decides how often
    checkpoints come (each RoundEnd) and the digests take what reading
    their chunks takes, so a queue would grow without bound -- a source
    sending tiny rounds faster than the chunks they touch can be read made
    the destination hold hundreds of MiB of queued masks.  Merged, what
    waits is at most one snapshot per chunk of the image.  The worker reads through its
    own duplicate of the page file's descriptor and closes it itself, so the
    writer can close or remove the file at any time without waiting.
    """

    def __init__(self, fd: int):
        self._fd = os.dup(fd)
        self._cond = threading.Condition()
        self._jobs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []   # 0 or 1
        self._busy = False         # inside a digest step (touches cache)
        self._cancel = False       # drop queued work, stop between chunks
        self.cache: dict[int, tuple[int, str, int]] = {}
        self.digest_s = 0.0        # time spent digesting, all jobs
        self.chunks = 0            # chunks digested
        self._thread = Thread(target=self._loop, name="migrated-checkpoint",
                              daemon=True)
        self._thread.start()

    def submit(self, job: int, slots: np.ndarray, masks: np.ndarray) -> None:
        ids = np.full(slots.size, job, np.int64)
        with self._cond:
            if self._cancel:
                return
            if self._jobs:      # one waits already: merge (class doc)
                old_ids, old_slots, old_masks = self._jobs.pop()
                older = ~np.isin(old_slots, slots)
                ids = np.concatenate((old_ids[older], ids))
                both = np.concatenate((old_slots[older], slots))
                masks = np.concatenate((old_masks[older], masks))
                order = np.argsort(both, kind="stable")   # read the file in order
                ids, slots, masks = ids[order], both[order], masks[order]
            self._jobs.append((ids, slots, masks))
            self._cond.notify_all()

    @property
    def waiting_bytes(self) -> int:
        """Bytes of snapshots queued and not yet started."""
        with self._cond:
            return sum(s.nbytes + m.nbytes + i.nbytes for i, s, m in self._jobs)

    def _loop(self) -> None:
        try:
            # Buffers for the commit's digest threads, made here and now
            # rather than inside the freeze.
            _CHUNK_BUFFERS.reserve(COMMIT_DIGEST_THREADS)
            while True:
                with self._cond:
                    while not self._jobs and not self._cancel:
                        self._cond.wait()
                    if self._cancel:
                        return
                    ids, slots, masks = self._jobs.pop()
                    self._busy = True
                try:
                    self._digest(ids, slots, masks)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            os.close(self._fd)

    def _digest(self, ids: np.ndarray, slots: np.ndarray, masks: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            for job, slot, mask in zip(ids.tolist(), slots.tolist(), masks):
                if self._cancel:
                    return
                try:
                    digest, _ = _chunk_digest(self._fd, slot, mask)
                except OSError:
                    return     # those chunks are simply digested at commit
                with self._cond:
                    self.cache[slot] = (job, digest, int(np.count_nonzero(mask)))
                self.chunks += 1
        finally:
            self.digest_s += time.perf_counter() - t0

    def wait_digested(self, timeout: float | None) -> bool:
        """Wait until every queued job is digested."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def stop(self, wait: bool = True) -> None:
        """Drop queued jobs and stop between two chunks; with ``wait``,
        return only once no digest step runs any more (at most one chunk)."""
        with self._cond:
            self._cancel = True
            self._jobs.clear()
            self._cond.notify_all()
            while wait and self._busy:
                self._cond.wait()


class ImageWriter:
    """Builds one image in partial/<id>/ from rounds of pages.

    Page data lives in ``pages.img`` by chunk slot: the chunk of 512 pages at
    virtual address V gets a slot S the first time any of its pages arrives,
    and page i of it is stored at byte S*2MiB + i*4096.  Rewrites of a page
    overwrite it in place, so the file never grows past the image's size.
    Three bitmaps per slot say which pages hold data, which are known zero
    and which have blocks allocated on disk.
    """

    def __init__(self, store: ImageStore, image_id: str, path: str,
                 meta: dict, expected_bytes: int):
        self.store = store
        self.image_id = image_id
        self.path = path
        self.meta = meta
        self.expected_bytes = expected_bytes
        self._began = time.time()
        self._state = "open"   # open -> prepared -> committed; aborted | failed
        self._prepared_bytes = 0
        self._renamed_to: str | None = None
        self.withdrawn = False    # published, then taken back out (withdraw())
        # Its source withdrew the migration (ImageStore.withdraw_migration):
        # never publish it.  Set and read under the store lock.
        self._withdraw_requested = False
        self._layout: list[dict] | None = None
        self._layout_runs = PageRuns.empty()
        self._slot_of: dict[int, int] = {}          # chunk number -> slot
        self._chunk_of = np.zeros(_INITIAL_SLOTS, np.int64)  # slot -> chunk number
        self._data = np.zeros((_INITIAL_SLOTS, CHUNK_PAGES), bool)
        self._zero = np.zeros((_INITIAL_SLOTS, CHUNK_PAGES), bool)
        self._alloc = np.zeros((_INITIAL_SLOTS, CHUNK_PAGES), bool)
        # Checkpoints (see checkpoint()): per slot, "changed since its last
        # digest snapshot" and the id of the checkpoint job that took that
        # snapshot (0: none yet).
        self._dirty = np.zeros(_INITIAL_SLOTS, bool)
        self._snap_job = np.zeros(_INITIAL_SLOTS, np.int64)
        self._job = 0
        self._last_slots: np.ndarray | None = None   # slots of the last write
        self._ckpt: _Checkpointer | None = None
        self._flusher: _Flusher | None = None
        self._flush_state = _FlushState()
        self.commit_stats: dict = {}
        self._alloc_pages = 0
        self._since_free_check = 0
        self.bytes_received = 0
        # CPU time of the thread(s) writing page data: what filling the page
        # cache costs on this node (reported at commit; benchmarks use it).
        self.write_cpu_s = 0.0
        self._can_allocate = True     # fallocate() works here (see _allocate)
        self._fd = os.open(os.path.join(path, mf.PAGES_NAME),
                           os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
                           _FILE_MODE)

    # -- bookkeeping ------------------------------------------------------

    def _charge(self) -> int:
        if self._state == "prepared":
            return self._prepared_bytes
        if self._state != "open":
            return 0
        return max(self.expected_bytes, self._alloc_pages * PAGE_SIZE)

    def _check_open(self) -> None:
        if self._state != "open":
            raise ImageError(f"image {self.image_id} is {self._state}; no more "
                             "writes are accepted")

    def _fail(self, exc: BaseException, what: str) -> ImageError:
        self._state = "failed"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kind = "disk full" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            return DiskFull(f"image {self.image_id}: {kind} in {self.store.state_dir} "
                            f"while {what}; the partial image will be removed -- "
                            "free space or remove old images and retry")
        if isinstance(exc, OSError):
            return ImageError(f"image {self.image_id}: {what} failed: "
                              f"{os.strerror(exc.errno or 0)} ({exc})")
        return ImageError(f"image {self.image_id}: {what} failed: {exc}")

    def _describe(self) -> str:
        mid = (self.meta or {}).get("migration_id")
        return f"image {self.image_id}" + (f" (migration {mid})" if mid else "")

    def _check_flushed(self) -> None:
        """Raise what a background flush failed with (see _FlushState): the
        image must not be committed, whatever the commit's own fsync says."""
        exc = self._flush_state.error
        if exc is None:
            return
        self._state = "failed"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"{self._describe()}: the disk filled up in {self.store.state_dir} "
                           "while page data was written back to it, so some of it may be "
                           "lost; the partial image will be removed -- free space and "
                           "migrate again")
        raise ImageError(f"{self._describe()}: writing page data back to disk failed "
                         f"({os.strerror(exc.errno or 0)}: {exc}), so some of it may be "
                         f"lost; the partial image will be removed -- check the disk "
                         f"under {self.store.state_dir} (dmesg) and migrate again")

    @property
    def slots(self) -> int:
        return len(self._slot_of)

    def _slots_for(self, chunks: np.ndarray, what: str = "page data") -> np.ndarray:
        """Slot of each chunk number: new chunks get the next slots in the
        order they come -- once it is known they all fit the image's chunk
        bound (else nothing is allocated).  Runs are in address order, so
        equal chunk numbers are neighbours: each stretch of them is looked
        up once (a chunk seen again later just finds its slot)."""
        first = np.empty(chunks.size, bool)
        first[:1] = True
        np.not_equal(chunks[1:], chunks[:-1], out=first[1:])
        uniq, inv = chunks[first], np.cumsum(first) - 1
        slot_of = self._slot_of
        wanted = uniq.tolist()
        got = [slot_of.get(c) for c in wanted]
        new = {c for c, s in zip(wanted, got) if s is None}
        if new:
            self._check_chunks(self.slots + len(new), what)
            for i, c in enumerate(wanted):
                if got[i] is None:
                    got[i] = slot_of.get(c)
                    if got[i] is None:
                        got[i] = self._new_slot(c)
        return np.array(got, np.int64)[inv]

    def _check_chunks(self, chunks: int, what: str) -> None:
        """Refuse (QuotaExceeded, the image fails) if the image would
        describe more than the store's max_image_chunks chunks."""
        limit = self.store.max_image_chunks
        if chunks <= limit:
            return
        self._state = "failed"
        raise QuotaExceeded(
            f"{self._describe()}: {what} would make the image describe {chunks} chunks "
            f"of {CHUNK_BYTES >> 20} MiB ({chunks * CHUNK_BYTES >> 30} GiB of address space "
            f"with data or zero pages), more than the {limit} one image may hold; "
            "refusing it -- the partial image will be removed (a process this large "
            "cannot be migrated to this node)")

    def _new_slot(self, chunk: int) -> int:
        """The next slot of the page file, given to ``chunk``."""
        s = len(self._slot_of)
        self._check_chunks(s + 1, "page data")
        if s >= self._data.shape[0]:
            self._grow()
        self._slot_of[chunk] = s
        self._chunk_of[s] = chunk
        return s

    def _grow(self) -> None:
        n = self._data.shape[0] * 2
        for name in ("_data", "_zero", "_alloc"):
            old = getattr(self, name)
            new = np.zeros((n, CHUNK_PAGES), bool)
            new[:old.shape[0]] = old
            setattr(self, name, new)
        for name, dtype in (("_chunk_of", np.int64), ("_dirty", bool),
                            ("_snap_job", np.int64)):
            old = getattr(self, name)
            new = np.zeros(n, dtype)
            new[:old.size] = old
            setattr(self, name, new)

    def _held_pieces(self, runs: PageRuns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pieces of ``runs`` that fall in chunks this image holds:
        (slot, first page in the chunk, end page in the chunk), in address
        order.  Found per run by binary search among the held chunks, so
        the cost follows the runs and the chunks held, never the pages the
        runs name (a drop of 2^44 pages is as cheap as one of a page)."""
        n = self.slots
        pn, end = _page_bounds(runs)
        if n == 0 or pn.size == 0:
            e = np.empty(0, np.int64)
            return e, e, e
        by_chunk = np.argsort(self._chunk_of[:n], kind="stable")
        held = self._chunk_of[:n][by_chunk]
        a = np.searchsorted(held, pn // CHUNK_PAGES, side="left")
        b = np.searchsorted(held, (end - 1) // CHUNK_PAGES, side="right")
        # Runs are disjoint: a held chunk meets at most the runs inside it
        # plus two crossing its edges, so pieces <= runs + 2 x chunks held.
        cnt = b - a
        run = np.repeat(np.arange(pn.size), cnt)
        idx = a[run] + (np.arange(run.size) - np.repeat(np.cumsum(cnt) - cnt, cnt))
        base = held[idx] * CHUNK_PAGES
        return (by_chunk[idx].astype(np.int64), np.maximum(pn[run], base) - base,
                np.minimum(end[run], base + CHUNK_PAGES) - base)

    def _segments(self, runs: PageRuns) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Where the pages of ``runs`` go in the page file, allocating slots:
        (first file page, first page in the data, pages) of each stretch
        that is contiguous both in the data and in the file, and the slot of
        every piece (a run cut at chunk boundaries).  Vectorised over runs
        and chunks, never pages: a batch of one run is a few stretches."""
        if len(runs) == 1 and int(runs.counts[0]) <= 4 * CHUNK_PAGES:
            return self._segments_of_run(int(runs.starts[0]) >> PAGE_SHIFT,
                                         int(runs.counts[0]))
        return self._segments_of_runs(runs)

    def _segments_of_run(self, pn: int, count: int):
        """_segments of one run of a few chunks (most page batches: a run
        of up to 4 MiB crosses two or three), on Python ints per chunk
        instead of two dozen numpy calls on arrays of one element."""
        end = pn + count
        c0, c1 = pn // CHUNK_PAGES, (end - 1) // CHUNK_PAGES
        slot_of = self._slot_of
        slots = [slot_of.get(c) for c in range(c0, c1 + 1)]
        fps: list[int] = []
        firsts: list[int] = []
        lens: list[int] = []
        done = 0
        for i, chunk in enumerate(range(c0, c1 + 1)):
            slot = slots[i]
            if slot is None:
                slot = slots[i] = self._new_slot(chunk)
            lo, hi = max(pn, chunk * CHUNK_PAGES), min(end, (chunk + 1) * CHUNK_PAGES)
            fp = slot * CHUNK_PAGES + lo % CHUNK_PAGES
            if fps and fps[-1] + lens[-1] == fp:
                lens[-1] += hi - lo             # the next chunk's slot follows
            else:
                fps.append(fp)
                firsts.append(done)
                lens.append(hi - lo)
            done += hi - lo
        return (np.array(fps, np.int64), np.array(firsts, np.int64),
                np.array(lens, np.int64), np.array(slots, np.int64))

    def _segments_of_runs(self, runs: PageRuns):
        pn = (runs.starts >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        end = pn + runs.counts.astype(np.int64)
        first_chunk = pn // CHUNK_PAGES
        pieces = (end - 1) // CHUNK_PAGES - first_chunk + 1
        if (pieces == 1).all():
            chunk, p_start, p_end = first_chunk, pn, end
        else:
            run = np.repeat(np.arange(pn.size), pieces)
            k = np.arange(run.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            chunk = first_chunk[run] + k
            p_start = np.maximum(pn[run], chunk * CHUNK_PAGES)
            p_end = np.minimum(end[run], (chunk + 1) * CHUNK_PAGES)
        p_cnt = p_end - p_start
        slots = self._slots_for(chunk)
        fp = slots * CHUNK_PAGES + p_start % CHUNK_PAGES
        # Pieces follow each other in the data; a stretch ends where the
        # next piece does not follow in the file.
        cut = np.flatnonzero(fp[1:] != fp[:-1] + p_cnt[:-1]) + 1
        heads = np.concatenate(([0], cut))
        data_page = np.cumsum(p_cnt) - p_cnt
        return fp[heads], data_page[heads], np.add.reduceat(p_cnt, heads), slots

    def _check_runs(self, runs: PageRuns, what: str) -> None:
        if not isinstance(runs, PageRuns):
            raise ImageError(f"{what}: expected PageRuns, got {type(runs).__name__}")
        if self._layout is None:
            raise LayoutViolation(f"image {self.image_id}: {what} before any memory "
                                  "layout was declared")
        if self._layout_runs.contains(runs):
            return
        outside = runs.subtract(self._layout_runs)
        if outside:
            a, n = outside.pairs()[0]
            raise LayoutViolation(
                f"image {self.image_id}: {what} of {outside.total_pages()} page(s) "
                f"outside the migratable mappings of the declared layout "
                f"(first at {a:#x}, {n} pages)")

    def _release(self, slots: np.ndarray, masks: np.ndarray) -> None:
        """Forget the data/zero state of the masked pages of ``slots`` (each
        slot once, a (n, CHUNK_PAGES) mask) and free their blocks."""
        self._dirty[slots] = True
        keep = ~masks
        self._data[slots] &= keep
        self._zero[slots] &= keep
        rows, cols = np.nonzero(self._alloc[slots] & masks)
        if rows.size == 0:
            return
        alloc = np.sort(slots[rows] * CHUNK_PAGES + cols)
        brk = np.flatnonzero(np.diff(alloc) != 1) + 1
        firsts = alloc[np.concatenate(([0], brk))]
        lens = np.diff(np.concatenate(([0], brk, [alloc.size])))
        for first, n in zip(firsts.tolist(), lens.tolist()):
            if not _punch(self._fd, first * PAGE_SIZE, n * PAGE_SIZE):
                return  # no hole punching here: blocks stay allocated, charged
        self._alloc.flat[alloc] = False
        self._alloc_pages -= int(alloc.size)

    def _forget(self, runs: PageRuns) -> None:
        """Release what the image holds of ``runs`` (chunks where it holds
        none of those pages are left as they are: their digests stay good)."""
        for slots, masks in _piece_masks(*self._held_pieces(runs)):
            masks &= self._data[slots] | self._zero[slots] | self._alloc[slots]
            hit = masks.any(axis=1)
            if hit.any():
                self._release(slots[hit], masks[hit])

    # -- API --------------------------------------------------------------

    def set_layout(self, mappings: Iterable[Any]) -> None:
        """Declare the current memory layout (any round may change it).
        Pages outside the new migratable mappings stop counting."""
        self._check_open()
        layout = mf.normalize_layout(mappings)
        new_runs = mf.migratable_runs(layout)
        old_runs = self._layout_runs
        self._layout, self._layout_runs = layout, new_runs
        gone = old_runs.subtract(new_runs)
        if gone and self._slot_of:
            self._forget(gone)

    def write_pages(self, runs: PageRuns, data) -> None:
        """Store the pages of ``runs``; ``data`` is their bytes concatenated
        -- or an object with ``nbytes`` and ``fill_into(fd, stretches)``
        that puts them in place itself, given (file offset, first byte, end
        byte) of each stretch (the destination's data still in its socket:
        migrated.wire.events.DeferredData)."""
        self._check_open()
        self._check_runs(runs, "page data")
        fill = getattr(data, "fill_into", None)
        mv = None if fill is not None else memoryview(data).cast("B")
        nbytes = data.nbytes if mv is None else mv.nbytes
        npages = runs.total_pages()
        if nbytes != npages * PAGE_SIZE:
            raise ImageError(f"image {self.image_id}: {nbytes} bytes of page data "
                             f"for {npages} pages ({npages * PAGE_SIZE} expected)")
        if npages == 0:
            return
        seg_fp, seg_data, seg_n, slots = self._segments(runs)
        # Bookkeeping by slices of the flat bitmaps while the stretches are
        # few (the usual case: one source run cut at chunk boundaries), by
        # page index otherwise.
        if seg_fp.size <= _FEW_STRETCHES:
            spans = [slice(a, a + n) for a, n in zip(seg_fp.tolist(), seg_n.tolist())]
        else:
            spans = [_page_index(seg_fp, seg_data, seg_n)]
        alloc_bits = self._alloc.reshape(-1)
        new = npages - sum(int(np.count_nonzero(alloc_bits[sp])) for sp in spans)
        st = self.store
        with st._lock:
            try:
                st._check_room(self, 0, max(self.expected_bytes,
                                            (self._alloc_pages + new) * PAGE_SIZE))
            except QuotaExceeded:
                self._state = "failed"
                raise
        self._since_free_check += new * PAGE_SIZE
        if self._since_free_check >= FREE_RECHECK_BYTES:
            self._since_free_check = 0
            free = st._free_bytes()
            if free - new * PAGE_SIZE < st.min_free_bytes:
                self._state = "failed"
                raise DiskFull(f"image {self.image_id}: free space in {st.state_dir} "
                               f"fell to {_mib(free)}, below the {_mib(st.min_free_bytes)} "
                               "reserve; the partial image will be removed")
        # One pwrite per stretch of consecutive file pages (a run of the
        # source cut where it crosses into a chunk with a non-adjacent slot).
        offs = (seg_fp * PAGE_SIZE).tolist()
        lo = (seg_data * PAGE_SIZE).tolist()
        hi = ((seg_data + seg_n) * PAGE_SIZE).tolist()
        # Marked before writing: a chunk half written when an error strikes
        # must not keep a digest taken earlier.
        self._dirty[slots] = True
        self._last_slots = slots
        fd = self._fd
        cpu0 = time.thread_time()
        stretches = list(zip(offs, lo, hi))
        try:
            if new and self._can_allocate:
                self._can_allocate = _allocate(fd, stretches)
            if fill is not None:
                fill(fd, stretches)
            else:
                for off, a, b in stretches:
                    pwrite_all(fd, mv[a:b], off)
        except OSError as exc:
            raise self._fail(exc, "writing page data") from None
        except BaseException:
            # The data's source failed (the link, its digest): what reached
            # the file is unchecked, and this image is done.
            self._state = "failed"
            raise
        self._alloc_pages += new
        data_bits, zero_bits = self._data.reshape(-1), self._zero.reshape(-1)
        for sp in spans:
            alloc_bits[sp] = True
            data_bits[sp] = True
            zero_bits[sp] = False
        self.bytes_received += nbytes
        self.write_cpu_s += time.thread_time() - cpu0

    def write_zeros(self, runs: PageRuns) -> None:
        """Record pages known to be all zeros (no data stored)."""
        self._check_open()
        self._check_runs(runs, "zero pages")
        if not runs:
            return
        # Zero pages cost no quota, so the chunks they would add are
        # bounded here, counted per run before anything is allocated; the
        # work is then per chunk piece (at most max_image_chunks of them
        # plus two per run), never per page.
        pn, end = _page_bounds(runs)
        self._check_chunks(_distinct_chunks(pn, end), "zero pages")
        chunks, lo, hi = _chunk_pieces(pn, end)
        slots = self._slots_for(chunks, "zero pages")
        for uslots, masks in _piece_masks(slots, lo, hi):
            self._release(uslots, masks)
            self._zero[uslots] |= masks

    def drop(self, runs: PageRuns) -> None:
        """Pages no longer present in the process."""
        self._check_open()
        if not isinstance(runs, PageRuns):
            raise ImageError(f"drop: expected PageRuns, got {type(runs).__name__}")
        if runs and self._slot_of:
            self._forget(runs)

    def totals(self) -> dict:
        n = self.slots
        return {"data_pages": int(self._data[:n].sum()),
                "zero_pages": int(self._zero[:n].sum()),
                "allocated_bytes": self._alloc_pages * PAGE_SIZE,
                "bytes_received": self.bytes_received,
                "write_cpu_s": self.write_cpu_s}

    def checkpoint(self, settled_only: bool = False) -> None:
        """Digest, in a background thread, the chunks changed since the last
        checkpoint, and flush the page data written so far in another;
        returns at once.  Call it between rounds (the destination does at
        each RoundEnd, and every few MiB of the final delta) so that commit
        only has the chunks of the last writes to digest and little to
        flush.  ``settled_only``: leave out the chunks of the latest
        write_pages call (a round in progress is likely to write the rest of
        its last chunk next).

        Correctness does not depend on it: a digest is used at commit only
        if no page of its chunk changed after the snapshot it was taken for
        (writes, zeros, drops and layout changes mark the chunk), so commit
        always hashes the bytes that are on disk."""
        self._check_open()
        self._check_flushed()     # fail now rather than at commit
        n = self.slots
        dirty = self._dirty[:n]
        if settled_only and self._last_slots is not None:
            dirty = dirty.copy()
            dirty[self._last_slots] = False
        slots = np.flatnonzero(dirty)
        if self._ckpt is None:
            self._ckpt = _Checkpointer(self._fd)
        self.flush_async()
        self._job += 1
        self._dirty[slots] = False
        self._snap_job[slots] = self._job
        # Only chunks holding data have a digest; masks are copied because
        # later rounds change the writer's rows while the worker reads.
        masks = self._data[slots]
        keep = masks.any(axis=1)
        self._ckpt.submit(self._job, slots[keep], masks[keep])

    def flush_async(self) -> None:
        """Start flushing the page data written so far to disk in a
        background thread (fdatasync); returns at once.  Writing back while
        pages still arrive spreads the disk work over the migration instead
        of leaving it to the fsync inside commit.  Raises what an earlier
        background flush failed with: the image is lost, say so now."""
        self._check_open()
        self._check_flushed()
        if self._flusher is None:
            me = weakref.ref(self)     # the thread must not keep a forgotten writer alive
            self._flusher = _Flusher(self._fd, self._flush_state,
                                     lambda: getattr(me(), "bytes_received", 0),
                                     self._describe())
        self._flusher.kick()

    @property
    def flushed_bytes(self) -> int:
        """Page bytes received that background flushes made durable."""
        return self._flush_state.flushed

    @property
    def flush_rate(self) -> float:
        """Bytes/s the background flushes achieved (0.0: none measured)."""
        return self._flush_state.rate

    def set_flush_listener(self, listener: Callable[[], None] | None) -> None:
        """Call ``listener`` (in the flusher's thread) after each background
        flush: the destination reports its backlog then."""
        self._flush_state.listener = listener

    def wait_checkpoints(self, timeout: float | None = None) -> bool:
        """Wait until the background digests of every checkpoint so far are
        done (for tests and benchmarks; commit never needs it).  False if
        ``timeout`` ran out first."""
        ck = self._ckpt
        return True if ck is None else ck.wait_digested(timeout)

    def _stop_checkpoints(self, wait: bool = True) -> tuple[_Checkpointer | None, _Flusher | None]:
        ck, self._ckpt = self._ckpt, None
        fl, self._flusher = self._flusher, None
        if ck is not None:
            ck.stop(wait)
        if fl is not None:
            fl.stop()      # an fdatasync under way finishes on its own
        return ck, fl

    def _cached_digest(self, ck: _Checkpointer | None, slot: int, pages: int) -> str | None:
        """The background digest of ``slot`` if it still describes the
        chunk: taken by the last job that snapshotted it, no change since."""
        if ck is None or self._dirty[slot]:
            return None
        got = ck.cache.get(slot)
        if got is None or got[0] != self._snap_job[slot] or got[2] != pages:
            return None
        return got[1]

    def commit(self, meta_update: dict | None = None) -> tuple[str, str]:
        """prepare() then publish(): seal the image and make it visible.
        Returns (image_id, digest_hex)."""
        got = self.prepare(meta_update)
        self.publish()
        return got

    def prepare(self, meta_update: dict | None = None) -> tuple[str, str]:
        """Seal the image but keep it staged in partial/ (never listed):
        check, digest, write the manifest, fsync the files and the partial
        directory.  Returns (image_id, digest_hex).  Chunks unchanged since
        their checkpoint digest are not read again.  Then publish() makes it
        visible, or abort() removes it.

        ``meta_update`` is merged into the metadata; its ``timings`` (the
        engine's figures of the migration) are cut to MAX_META_TIMINGS_BYTES
        of JSON if larger (mf.clip_timings), never refused."""
        self._check_open()
        if self._layout is None:
            raise ImageError(f"image {self.image_id}: cannot commit, no memory "
                             "layout was ever declared")
        meta = self._final_meta(meta_update)
        t0 = time.perf_counter()
        ck, fl = self._stop_checkpoints()
        try:
            self._trim_page_file()
        except OSError as exc:
            raise self._fail(exc, "committing") from None
        t_stop = time.perf_counter()
        # The data fsync (waiting on the disk) starts first and runs while
        # the layout is checked, the chunks digested and the manifest built
        # (CPU work).  It is joined on every path: never left running on a
        # descriptor that abort() closes.
        syncer = _InThread(os.fsync, self._fd)
        try:
            try:
                n = self.slots
                order = np.argsort(self._chunk_of[:n], kind="stable")
                chunk_vaddrs = self._chunk_of[:n][order].astype(np.uint64) << np.uint64(CHUNK_SHIFT)
                data_rows = self._data[:n][order]
                data = mf.rows_to_runs(chunk_vaddrs, data_rows)
                zero = mf.rows_to_runs(chunk_vaddrs, self._zero[:n][order])
                stray = data.union(zero).subtract(self._layout_runs)
                if stray:
                    self._state = "failed"
                    raise LayoutViolation(f"image {self.image_id}: {stray.total_pages()} pages "
                                          "lie outside the final layout's migratable mappings")
                chunks = []
                todo: list[tuple[dict, int, np.ndarray]] = []
                counts = np.count_nonzero(data_rows, axis=1).tolist()
                for i, cnt in enumerate(counts):
                    if cnt == 0:
                        continue
                    slot = int(order[i])
                    rec = {"vaddr": f"{int(chunk_vaddrs[i]):#x}", "slot": slot,
                           "pages": cnt, "digest": self._cached_digest(ck, slot, cnt)}
                    if rec["digest"] is None:
                        todo.append((rec, slot, data_rows[i]))
                    chunks.append(rec)
                _digest_chunks(self._fd, todo)
                fresh = len(todo)
                t_digest = time.perf_counter()
                mappings = mf.mapping_records(self._layout, data, zero)
            finally:
                syncer.join()     # never leave it running on a descriptor we close
            syncer.result()
            if fl is not None:
                fl.join()         # a flush still in flight records its outcome
            self._check_flushed()
            t_sync = time.perf_counter()
            file_bytes = os.fstat(self._fd).st_blocks * 512
            man = {
                "format": mf.FORMAT, "version": mf.FORMAT_VERSION,
                "image_id": self.image_id,
                "page_size": PAGE_SIZE, "chunk_pages": CHUNK_PAGES,
                "data_file": mf.PAGES_NAME,
                "began_at": _iso(self._began), "committed_at": _iso(time.time()),
                "meta": meta,
                "mappings": mappings,
                "chunks": chunks,
                "totals": {"mappings": len(mappings),
                           "migratable_mappings": sum(m["migrates"] for m in mappings),
                           "data_pages": data.total_pages(),
                           "zero_pages": zero.total_pages(),
                           "data_bytes": data.total_pages() * PAGE_SIZE,
                           "file_bytes": file_bytes,
                           "bytes_received": self.bytes_received,
                           "chunks": len(chunks)},
                "store_timings_ms": {"digest": round((t_digest - t_stop) * 1e3, 3),
                                     "fsync_data": round((t_sync - t_digest) * 1e3, 3)},
            }
            _, blob = mf.seal_manifest(man)
            mfd = os.open(os.path.join(self.path, mf.MANIFEST_NAME),
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, _FILE_MODE)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(mfd, view):]
                os.fsync(mfd)
            finally:
                os.close(mfd)
            os.close(self._fd)
            self._fd = -1
            _fsync_dir(self.path)
        except OSError as exc:
            raise self._fail(exc, "committing") from None
        self._state = "prepared"
        self._prepared_bytes = file_bytes + len(blob)
        t_end = time.perf_counter()
        self.commit_stats = {
            "chunks": len(chunks), "chunks_digested": fresh,
            "checkpoints": self._job,
            "checkpoint_chunks": 0 if ck is None else ck.chunks,
            "checkpoint_digest_ms": 0.0 if ck is None else round(ck.digest_s * 1e3, 3),
            "checkpoint_sync_ms": 0.0 if fl is None else round(fl.sync_s * 1e3, 3),
            "stop_ms": round((t_stop - t0) * 1e3, 3),
            "digest_ms": round((t_digest - t_stop) * 1e3, 3),
            "fsync_data_ms": round((t_sync - t_digest) * 1e3, 3),
            "seal_ms": round((t_end - t_sync) * 1e3, 3),
            "total_ms": round((t_end - t0) * 1e3, 3)}
        return self.image_id, man["digest"]

    def _final_meta(self, update: dict | None) -> dict:
        """The metadata the manifest records: the writer's, merged with
        ``update`` (checked like the source's, timings cut to their bound).
        The merged metadata may exceed MAX_META_BYTES by the timings' bound:
        any metadata begin() accepted still commits."""
        meta = dict(self.meta)
        if not update:
            return meta
        if not isinstance(update, dict):
            raise ImageError(f"image {self.image_id}: commit metadata must be a dict")
        update = dict(update)
        timings = update.get("timings")
        if timings is not None:
            if not isinstance(timings, dict):
                raise ImageError(f"image {self.image_id}: commit metadata 'timings' must "
                                 f"be a dict, got {type(timings).__name__}")
            try:
                update["timings"], _ = mf.clip_timings(timings)
            except (TypeError, ValueError) as exc:
                raise ImageError(f"image {self.image_id}: commit timings are not plain "
                                 f"JSON data: {exc}") from None
        meta.update(update)
        return mf.check_meta(meta, limit=mf.MAX_META_BYTES + mf.MAX_META_TIMINGS_BYTES)

    def _trim_page_file(self) -> None:
        """Cut pages.img at the end of the last slot that holds data pages:
        slots past it lost their data (dropped, turned zero, left the
        layout) and hold at most stale blocks, which no chunk record would
        describe (IMAGE.md; verify checks it).  Looks at one bitmap row
        when the file's last slot holds data (the usual case)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        last = min(self.slots, -(-size // CHUNK_BYTES)) - 1
        if last >= 0 and self._data[last].any():
            return
        held = np.flatnonzero(self._data[:max(last, 0)].any(axis=1))
        end = (int(held[-1]) + 1) * CHUNK_BYTES if held.size else 0
        if size > end:
            os.ftruncate(self._fd, end)

    def publish(self) -> None:
        """Make a prepared image visible: one rename of partial/<id> to
        images/<id>, then fsync both parents.  If an fsync fails the image
        is not reported published and abort() takes it back out."""
        if self._state != "prepared":
            raise ImageError(f"image {self.image_id} is {self._state}; only a "
                             "prepared image can be published")
        t0 = time.perf_counter()
        mid = (self.meta or {}).get("migration_id")
        try:
            final = os.path.join(self.store.images_dir, self.image_id)
            # Checked and renamed under the store lock: a Withdraw for this
            # migration either came first (no publish) or finds the image.
            with self.store._lock:
                if self._withdraw_requested:
                    raise ImageWithdrawn(f"image {self.image_id}: migration {mid} was "
                                         "withdrawn by its source; not publishing it")
                os.rename(self.path, final)
            # Until the fsyncs below succeed the publish is not reported; if
            # they fail, abort() takes the image back out of images/.
            self._renamed_to = final
            _fsync_dir(self.store.images_dir)
            _fsync_dir(self.store.partial_dir)
        except OSError as exc:
            raise self._fail(exc, "committing") from None  # (publishing)
        self._state = "committed"
        self._renamed_to = None
        self.commit_stats["publish_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        self.store._forget(self, self._prepared_bytes)

    def withdraw(self) -> bool:
        """Take a just-published image back out of the store: the source
        gave up before our confirmation reached it (SPEC.md 9.1), so it
        resumed its process and the image must not stay as a second copy.
        It goes like ``images rm``: one rename out of images/ (invisible at
        once), then deletion.  On an image that was never published this is abort().
        Returns True when a published image was withdrawn."""
        if self._state != "committed":
            self.abort()
            return False
        self._state = "aborted"
        self.withdrawn = True
        try:
            self.store.remove(self.image_id)   # one rename out of images/, then delete
        except ImageError:
            pass                               # an operator removed it already
        except OSError:
            shutil.rmtree(os.path.join(self.store.images_dir, self.image_id),
                          ignore_errors=True)
        return True

    @property
    def state(self) -> str:
        """open, prepared (sealed, staged), committed (published), aborted
        or failed."""
        return self._state

    def abort(self) -> None:
        """Remove the partial (or prepared, never published) image.
        Idempotent; safe after any error."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        self._stop_checkpoints(wait=False)   # they close their own descriptors
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        if self._renamed_to is not None:
            # Renamed but never reported committed: pull it back out of
            # images/ in one rename before deleting it.
            try:
                os.rename(self._renamed_to, self.path)
            except OSError:
                shutil.rmtree(self._renamed_to, ignore_errors=True)
            self._renamed_to = None
        shutil.rmtree(self.path, ignore_errors=True)
        self.store._forget(self)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._state != "committed":
            self.abort()

    def __del__(self) -> None:  # a forgotten writer must not leak its fd
        for name in ("_ckpt", "_flusher"):
            helper = getattr(self, name, None)
            if helper is not None:
                helper.stop(False) if name == "_ckpt" else helper.stop()
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def _owned_by(meta: dict, migration_id: str, source_node: str, source_peer: str) -> bool:
    """Whether image metadata says it belongs to that migration of that
    source (node name and certificate name; SPEC.md 9.2)."""
    return (bool(migration_id) and meta.get("migration_id") == migration_id
            and meta.get("source_node") == source_node
            and meta.get("source_peer", "") == source_peer)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
