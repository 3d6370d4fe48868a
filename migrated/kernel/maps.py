"""The memory map of a process: parse /proc/PID/maps, classify, diff.

Classification follows CRIU's rules (what to take, what to record):

========== ==================================================== ========
kind       what                                                 migrates
========== ==================================================== ========
anon       private anonymous: "", [heap], [stack], [stack:TID],  yes
           [anon:NAME]
file       private file mapping (only pages that are not plain   yes
           page-cache pages are taken: pagemap bit 61 clear)
shared-anon MAP_SHARED anonymous: "/dev/zero (deleted)",          yes
           "/SYSV...", "/memfd:...", [anon_shmem:NAME]; also a
           memfd or a deleted file mapped MAP_PRIVATE (see
           _PRIVATE_SHMEM_PREFIXES)
shared-file MAP_SHARED of a real file: recorded as external       no
vdso       [vdso]                                               yes
skip       [vvar], [vvar_vclock], [vsyscall], [uprobes], and     no
           mappings with no permissions (guard pages, gaps)
========== ==================================================== ========
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from migrated.kernel import procfs
from migrated.runs import PAGE_SHIFT, PageRuns

DELETED_SUFFIX = " (deleted)"

# memfd_secret(2) memory, as /proc/PID/maps names it (always MAP_SHARED, on
# the kernel's internal secretmem mount: device major 0).  Its pages are
# taken out of the kernel's direct map, so nobody but the process itself can
# read them -- not process_vm_readv, /proc/PID/mem or ptrace, not even root.
# By the rules below it is a shared file (recorded, not copied): the image
# would hold nothing of it, silently.  See Mapping.secret.
SECRETMEM_PATH = "/secretmem" + DELETED_SUFFIX

# Pseudo paths the kernel prints for special mappings we never copy: the
# vvar pages are per-boot kernel data, vsyscall is a fixed legacy page, and
# uprobes' xol area is recreated by the kernel.
_SKIP_PSEUDO = ("[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
# Names of shared anonymous memory as /proc/PID/maps prints them.  Also
# POSIX shared memory (shm_open: files in /dev/shm, a tmpfs; unlinked right
# after mapping by programs that want it anonymous): it is this host's
# memory, not a file any other node has -- as an external shared file the
# image held none of it.
_SHARED_ANON_PREFIXES = ("/dev/zero", "/SYSV", "/memfd:", "[anon_shmem:", "/dev/shm/")
# A memfd mapped MAP_PRIVATE (copy-on-write over an initial image: how
# wasmtime instantiates a module's memory) is not a file the destination
# can read: the pages the process has not written come from an object that
# exists only here.  As a private file mapping only its own copies were
# sent (an image had 14 of 16 such pages as zeros).  It is tracked and
# sent like shared memory instead: every page it shows, the memfd's pages
# it has not mapped yet, and a content check (a pwrite on the memfd changes
# a page it only read, with no write of its own).
_PRIVATE_SHMEM_PREFIXES = ("/memfd:", "/dev/shm/")
# So is any deleted file mapped MAP_PRIVATE (a binary or library upgraded
# under a running process, a scratch file unlinked after mapping): it too
# exists only in this host's page cache (the image had only the pages the
# process had written; a page dropped with MADV_DONTNEED, which reads as the
# file's again, was lost).
# Private anonymous memory with a kernel-given or user-given name.
_ANON_PSEUDO_PREFIXES = ("[heap]", "[stack]", "[stack:", "[anon:")

MIGRATING_KINDS = frozenset({"anon", "file", "shared-anon", "vdso"})


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str          # "rwxp" / "r--s" ...
    offset: int
    dev: str            # "fe:00"
    inode: int
    path: str           # "" for anonymous; " (deleted)" suffix kept
    deleted: bool = False
    kind: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", classify(self))

    # -- derived -----------------------------------------------------------

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def migrates(self) -> bool:
        return self.kind in MIGRATING_KINDS

    @property
    def secret(self) -> bool:
        """memfd_secret(2) memory: its content cannot be read from outside
        the process, so it cannot be migrated (SECRETMEM_PATH)."""
        return self.shared and self.path == SECRETMEM_PATH and self.dev.startswith("00:")

    @property
    def shared_memory(self) -> bool:
        """MAP_SHARED anonymous memory (memfd, /dev/zero, SysV, ...), whatever
        its permissions: its content lives in an object only this host has."""
        return self.shared and (self.path == "" or self.path.startswith(_SHARED_ANON_PREFIXES))

    @property
    def base_path(self) -> str:
        """Path without the " (deleted)" suffix."""
        return self.path[: -len(DELETED_SUFFIX)] if self.deleted else self.path

    def identity(self) -> tuple:
        """What a mapping *is*, independent of where it sits: used to decide
        that two mappings at different addresses (or with different ends)
        are the same object.  For anonymous memory this is weak (kind and
        permissions only); for files it includes device, inode and the path
        (deletion does not change identity)."""
        if self.kind in ("file", "shared-file"):
            return (self.kind, self.perms, self.dev, self.inode, self.base_path)
        if self.kind == "shared-anon":
            return (self.kind, self.perms, self.inode, self.base_path)
        return (self.kind, self.perms, self.base_path)

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def runs(self) -> PageRuns:
        return PageRuns.from_range(self.start, self.end)

    def __str__(self) -> str:
        return (f"{self.start:x}-{self.end:x} {self.perms} {self.offset:08x} "
                f"{self.dev} {self.inode} {self.path}".rstrip())


def classify(m: Mapping) -> str:
    path, perms = m.path, m.perms
    if path in _SKIP_PSEUDO:
        return "skip"
    if path == "[vdso]":
        return "vdso"
    if perms[:3] == "---":
        # No access at all: guard pages and the gaps ld.so leaves between
        # segments.  Nothing can be read, nothing to copy.
        return "skip"
    shared = perms[3] == "s"
    if shared:
        if path == "" or path.startswith(_SHARED_ANON_PREFIXES):
            return "shared-anon"
        return "shared-file"
    if path == "" or path.startswith(_ANON_PSEUDO_PREFIXES):
        return "anon"
    if path.startswith(_PRIVATE_SHMEM_PREFIXES) or path.endswith(DELETED_SUFFIX):
        return "shared-anon"
    if path.startswith("["):
        # An unknown kernel pseudo mapping ([uprobes] and friends from
        # future kernels): do not guess what it holds.
        return "skip"
    return "file"


def parse_line(line: str) -> Mapping:
    """One /proc/PID/maps line.  The path is everything after the inode
    column's padding, so spaces inside it survive (a trailing space in a
    file name survives too; a newline in it is printed as \\012)."""
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"malformed maps line: {line!r}")
    lo, _, hi = parts[0].partition("-")
    path = parts[5] if len(parts) == 6 else ""
    deleted = path.endswith(DELETED_SUFFIX)
    return Mapping(start=int(lo, 16), end=int(hi, 16), perms=parts[1],
                   offset=int(parts[2], 16), dev=parts[3], inode=int(parts[4]),
                   path=path, deleted=deleted)


class Layout(tuple):
    """A process's mappings, sorted by start address (a tuple of Mapping).
    One parsed from /proc/PID/maps keeps that text as ``_text`` (see
    read_layout)."""

    def __new__(cls, mappings: Iterable[Mapping] = ()):
        return super().__new__(cls, sorted(mappings, key=lambda m: m.start))

    def __init__(self, mappings: Iterable[Mapping] = ()):
        self._starts = [m.start for m in self]

    def find(self, addr: int) -> Mapping | None:
        """The mapping containing ``addr``, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self[i].contains(addr):
            return self[i]
        return None

    def migratable(self) -> list[Mapping]:
        return [m for m in self if m.migrates]

    def migratable_bytes(self) -> int:
        return sum(m.size for m in self if m.migrates)

    def by_kind(self, kind: str) -> list[Mapping]:
        return [m for m in self if m.kind == kind]

    def runs(self, migratable_only: bool = True) -> PageRuns:
        """Address ranges of (migratable) mappings as PageRuns (computed
        once per layout: a layout and its mappings never change)."""
        cache = self.__dict__.setdefault("_runs", {})
        got = cache.get(migratable_only)
        if got is None:
            ms = [m for m in self if m.migrates or not migratable_only]
            if not ms:
                got = PageRuns.empty()
            else:
                got = PageRuns(np.array([m.start for m in ms], np.uint64),
                               np.array([m.npages for m in ms], np.uint64))
            cache[migratable_only] = got
        return got


def parse_maps(text: str) -> Layout:
    layout = Layout(parse_line(line) for line in text.split("\n") if line)
    layout._text = text
    return layout


def read_layout(pid: int, previous: Layout | None = None) -> Layout:
    """The layout of ``pid`` now.  ``previous``: an earlier read of the
    same process; if /proc/PID/maps reads back byte for byte as it did
    then, that Layout is returned instead of parsing every line again
    (171 mappings: 1.3-2 ms, and the final one is read inside the freeze).
    The parse is a function of the text alone, so nothing can differ."""
    text = procfs.read_maps_text(pid)
    if previous is not None and getattr(previous, "_text", None) == text:
        return previous
    return parse_maps(text)


# -- diff -------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutDiff:
    """How a layout changed between two reads.

    Definitions (mappings are compared by start address and identity(),
    see Mapping.identity):

    * ``grown`` / ``shrunk``: (old, new) pairs with the same start and
      identity whose end moved up / down (file mappings must also keep
      their offset).  A mapping split by mprotect shows as shrunk plus new
      pieces; two anonymous neighbours merged show as grown plus removed.
    * ``moved``: (old, new) pairs left over after the above, with the same
      identity and the same size at a different address, the old address
      no longer starting a like mapping (mremap MAYMOVE without resizing).
      A move that also resized shows as removed + new.  For anonymous
      memory identity is only kind and permissions, so "moved" is a best
      guess; the page content must be re-read either way.
    * ``new`` / ``removed``: every other mapping of the new / old layout.
    * ``changed``: (old, new) with same start, end and identity apart from
      permissions (mprotect of a whole mapping).
    * ``added_runs`` / ``removed_runs``: the exact address ranges of
      migratable memory present only in new / only in old -- what trackers
      use to add and drop pages, independent of how VMAs were cut.
    """

    new: list[Mapping]
    removed: list[Mapping]
    grown: list[tuple[Mapping, Mapping]]
    shrunk: list[tuple[Mapping, Mapping]]
    moved: list[tuple[Mapping, Mapping]]
    changed: list[tuple[Mapping, Mapping]]
    added_runs: PageRuns
    removed_runs: PageRuns

    def __bool__(self) -> bool:
        return bool(self.new or self.removed or self.grown or self.shrunk
                    or self.moved or self.changed)


def _same_object(a: Mapping, b: Mapping) -> bool:
    if a.identity() != b.identity():
        return False
    return a.kind not in ("file", "shared-file") or a.offset == b.offset


def _same_but_perms(a: Mapping, b: Mapping) -> bool:
    return (a.kind == b.kind and a.dev == b.dev and a.inode == b.inode
            and a.base_path == b.base_path and a.offset == b.offset)


def diff_layouts(old: Layout, new: Layout) -> LayoutDiff:
    old_by_start = {m.start: m for m in old}
    new_by_start = {m.start: m for m in new}
    grown, shrunk, changed = [], [], []
    left_old, left_new = [], []
    for m in old:
        n = new_by_start.get(m.start)
        if n is not None and n == m:
            continue
        if n is not None and _same_object(m, n):
            if n.end > m.end:
                grown.append((m, n))
            elif n.end < m.end:
                shrunk.append((m, n))
            continue
        if n is not None and n.end == m.end and _same_but_perms(m, n):
            changed.append((m, n))
            continue
        left_old.append(m)
    for n in new:
        o = old_by_start.get(n.start)
        if o is None or not (o == n or _same_object(o, n)
                             or (o.end == n.end and _same_but_perms(o, n))):
            left_new.append(n)
    # Pair leftovers of equal size and identity, first come first served in
    # address order.
    moved = []
    pool: dict[tuple, list[Mapping]] = {}
    for m in left_old:
        pool.setdefault((m.identity(), m.size), []).append(m)
    still_new = []
    for n in left_new:
        cands = pool.get((n.identity(), n.size))
        if cands:
            moved.append((cands.pop(0), n))
        else:
            still_new.append(n)
    moved_old = {id(o) for o, _ in moved}
    removed = [m for m in left_old if id(m) not in moved_old]
    old_runs, new_runs = old.runs(), new.runs()
    return LayoutDiff(new=still_new, removed=removed, grown=grown,
                      shrunk=shrunk, moved=moved, changed=changed,
                      added_runs=new_runs.subtract(old_runs),
                      removed_runs=old_runs.subtract(new_runs))
