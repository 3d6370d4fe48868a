"""maps.py: parsing, classification and layout diffs, on text and real children."""

import os

import pytest

from migrated.errors import NoSuchProcess
from migrated.kernel.maps import Layout, diff_layouts, parse_line, parse_maps, read_layout
from migrated.runs import PAGE_SIZE, PageRuns

P = PAGE_SIZE

SAMPLE = """\
55d9cdcb2000-55d9cdcb4000 r--p 00000000 fe:00 260131                     /usr/bin/cat
55d9cdcbd000-55d9cdcbe000 rw-p 0000a000 fe:00 260131                     /usr/bin/cat
55d9d2b9d000-55d9d2bbe000 rw-p 00000000 00:00 0                          [heap]
7f08c2ae4000-7f08c2b06000 rw-p 00000000 00:00 0 \n\
7f08c2b06000-7f08c2b08000 ---p 00000000 00:00 0 \n\
7f08c2b08000-7f08c2b0a000 rw-p 00001000 fe:00 42                         /tmp/my file (1).dat (deleted)
7f08c2b0a000-7f08c2b0c000 rw-p 00000000 fe:00 43                         /tmp/trailing space \n\
7f08c2b0c000-7f08c2b0e000 rw-s 00000000 00:01 1030                       /dev/zero (deleted)
7f08c2b0e000-7f08c2b10000 rw-s 00000000 00:01 2                          /SYSV00000000 (deleted)
7f08c2b10000-7f08c2b12000 rw-s 00000000 00:01 1031                       /memfd:buf (deleted)
7f08c2b12000-7f08c2b14000 r--s 00000000 fe:00 338846                     /usr/lib/gconv/gconv-modules.cache
7f08c2b14000-7f08c2b16000 rw-p 00000000 00:00 0                          [anon:my heap]
7f08c2b16000-7f08c2b18000 rw-s 00000000 00:01 7                          [anon_shmem:ring]
7f08c2b18000-7f08c2b1a000 r-xp 00000000 fe:00 44                         /lib/libx.so
7f08c2b1a000-7f08c2b1c000 ---p 00002000 fe:00 44                         /lib/libx.so
7f08c2d56000-7f08c2d5a000 r--p 00000000 00:00 0                          [vvar]
7f08c2d5a000-7f08c2d5c000 r--p 00000000 00:00 0                          [vvar_vclock]
7f08c2d5c000-7f08c2d5e000 r-xp 00000000 00:00 0                          [vdso]
7ffee08e6000-7ffee0907000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""

EXPECTED_KINDS = [
    ("/usr/bin/cat", "file"), ("/usr/bin/cat", "file"), ("[heap]", "anon"),
    ("", "anon"), ("", "skip"), ("/tmp/my file (1).dat (deleted)", "shared-anon"),
    ("/tmp/trailing space ", "file"), ("/dev/zero (deleted)", "shared-anon"),
    ("/SYSV00000000 (deleted)", "shared-anon"), ("/memfd:buf (deleted)", "shared-anon"),
    ("/usr/lib/gconv/gconv-modules.cache", "shared-file"), ("[anon:my heap]", "anon"),
    ("[anon_shmem:ring]", "shared-anon"), ("/lib/libx.so", "file"), ("/lib/libx.so", "skip"),
    ("[vvar]", "skip"), ("[vvar_vclock]", "skip"), ("[vdso]", "vdso"), ("[stack]", "anon"),
    ("[vsyscall]", "skip"),
]


def test_parse_sample_paths_and_kinds():
    layout = parse_maps(SAMPLE)
    assert [(m.path, m.kind) for m in layout] == EXPECTED_KINDS
    deleted = [m for m in layout if m.deleted]
    assert [m.base_path for m in deleted] == [
        "/tmp/my file (1).dat", "/dev/zero", "/SYSV00000000", "/memfd:buf"]
    m = layout[5]
    assert (m.start, m.end, m.perms, m.offset, m.dev, m.inode) == (
        0x7F08C2B08000, 0x7F08C2B0A000, "rw-p", 0x1000, "fe:00", 42)
    assert [m.migrates for m in layout].count(True) == 14


def test_secret_memory_is_told_apart():
    """memfd_secret memory looks like a deleted shared file; only it, on the
    kernel's internal mount (device major 0), is ``secret``."""
    secret = parse_line("7f08c2b10000-7f08c2b12000 rw-s 00000000 00:0e 48779"
                        "                      /secretmem (deleted)")
    assert secret.secret and secret.kind == "shared-file"
    for line in ("7f08c2b10000-7f08c2b12000 rw-s 00000000 fe:00 12 /secretmem (deleted)",
                 "7f08c2b10000-7f08c2b12000 rw-s 00000000 00:0e 12 /secretmem",
                 "7f08c2b10000-7f08c2b12000 rw-p 00000000 00:0e 12 /secretmem (deleted)"):
        assert not parse_line(line).secret, line
    assert not any(m.secret for m in parse_maps(SAMPLE))


def test_a_privately_mapped_memfd_or_deleted_file_is_shared_memory():
    """Their unwritten pages come from an object the destination does not
    have (a memfd; a deleted file): they migrate whole, like shared memory,
    not as a file.  A file that still exists is a file."""
    m = parse_line("7f08c2b10000-7f08c2b12000 rw-p 00000000 00:01 1031 /memfd:wasm (deleted)")
    assert m.kind == "shared-anon" and m.migrates and not m.shared
    assert parse_line("7f08c2b10000-7f08c2b12000 r-xp 00000000 fe:00 9 /usr/lib/x.so (deleted)"
                      ).kind == "shared-anon"
    assert parse_line("7f08c2b10000-7f08c2b12000 r-xp 00000000 fe:00 9 /usr/lib/x.so"
                      ).kind == "file"


def test_posix_shared_memory_is_shared_memory():
    """shm_open files live in /dev/shm, a tmpfs of this host: shared
    memory, mapped shared or privately, unlinked or not."""
    for line in ("7f08c2b10000-7f08c2b12000 rw-s 00000000 00:19 7 /dev/shm/ring",
                 "7f08c2b10000-7f08c2b12000 rw-s 00000000 00:19 7 /dev/shm/ring (deleted)",
                 "7f08c2b10000-7f08c2b12000 rw-p 00000000 00:19 7 /dev/shm/ring"):
        assert parse_line(line).kind == "shared-anon", line
    assert parse_line("7f08c2b10000-7f08c2b12000 rw-s 00000000 fe:00 9 /var/db/x.shm"
                      ).kind == "shared-file"


def test_layout_lookup_and_totals():
    layout = parse_maps(SAMPLE)
    assert layout.find(0x55D9D2B9D000).path == "[heap]"
    assert layout.find(0x55D9D2BBE000 - 1).path == "[heap]"
    assert layout.find(0x55D9D2BBE000) is None
    assert layout.find(0) is None
    assert layout.find(0xFFFFFFFFFF600000).path == "[vsyscall]"
    want = sum(m.end - m.start for m in layout if m.kind in ("anon", "file", "shared-anon", "vdso"))
    assert layout.migratable_bytes() == want
    assert layout.runs().total_bytes() == want
    # unsorted input comes out sorted
    assert list(Layout(reversed(layout))) == list(layout)


def test_malformed_line():
    with pytest.raises(ValueError):
        parse_line("garbage")


def _mk(start, npages, perms="rw-p", path="", inode=0, offset=0, dev="00:00"):
    return parse_line(f"{start:x}-{start + npages * P:x} {perms} {offset:08x} {dev} {inode} {path}")


def test_diff_synthetic():
    a, b, c, d, e = (0x10000000 + i * 0x100000 for i in range(5))
    old = Layout([_mk(a, 4), _mk(b, 8), _mk(c, 4), _mk(d, 2, path="/x", inode=5, dev="fe:00"),
                  _mk(e, 4)])
    new = Layout([_mk(a, 6),                      # grown
                  _mk(b, 3),                      # shrunk
                  _mk(0x20000000, 4),             # moved from c (same size, anon rw-p)
                  _mk(d, 2, perms="r--p", path="/x", inode=5, dev="fe:00"),  # changed
                  _mk(0x30000000, 1, path="/y", inode=9, dev="fe:00")])  # new; e removed
    diff = diff_layouts(old, new)
    assert [(o.start, n.end - n.start) for o, n in diff.grown] == [(a, 6 * P)]
    assert [(o.start, n.end - n.start) for o, n in diff.shrunk] == [(b, 3 * P)]
    assert [(o.start, n.start) for o, n in diff.moved] == [(c, 0x20000000)]
    assert [(o.perms, n.perms) for o, n in diff.changed] == [("rw-p", "r--p")]
    assert [m.start for m in diff.new] == [0x30000000]
    assert [m.start for m in diff.removed] == [e]
    assert diff.added_runs == PageRuns.from_pairs(
        [(a + 4 * P, 2), (0x20000000, 4), (0x30000000, 1)])
    assert diff.removed_runs == PageRuns.from_pairs([(b + 3 * P, 5), (c, 4), (e, 4)])
    assert not diff_layouts(old, old)


def test_real_child_kinds(target, tmp_path):
    spaced = tmp_path / "a file (with) spaces.bin"
    gone = tmp_path / "deleted me"
    addr = {
        "anon": target.map("anon", 4, guard=True),
        "shared": target.map("shared", 4, "shared"),
        "memfd": target.map("memfd", 4, "memfd"),
        "sysv": target.sysv("sysv", 4),
        "spaced": target.map_file("spaced", str(spaced), 4),
        "gone": target.map_file("gone", str(gone), 4),
        "sfile": target.map_file("sfile", str(tmp_path / "shared.bin"), 4, "shared"),
    }
    os.unlink(gone)
    layout = read_layout(target.pid)
    got = {k: layout.find(a) for k, a in addr.items()}
    assert got["anon"].kind == "anon" and got["anon"].start == addr["anon"]
    assert got["anon"].end == addr["anon"] + 4 * P  # guard pages stop merging
    assert layout.find(addr["anon"] - 1).kind == "skip"
    for k in ("shared", "memfd", "sysv"):
        assert got[k].kind == "shared-anon", got[k]
    assert got["spaced"].kind == "file" and got["spaced"].path == str(spaced)
    assert not got["spaced"].deleted
    assert got["gone"].deleted and got["gone"].path == f"{gone} (deleted)"
    assert got["gone"].kind == "shared-anon" and got["gone"].base_path == str(gone)
    assert got["sfile"].kind == "shared-file" and not got["sfile"].migrates
    kinds = {m.kind for m in layout}
    assert {"vdso", "skip", "anon", "file"} <= kinds
    assert any(m.path == "[stack]" for m in layout)
    assert any(m.path == "[vvar]" and not m.migrates for m in layout)


def test_real_child_anon_label(target):
    target.map("lab", 2, guard=True)
    try:
        target.label("lab", "migrated-test")
    except Exception as e:
        pytest.skip(f"kernel lacks CONFIG_ANON_VMA_NAME: {e}")
    m = read_layout(target.pid).find(target.addr("lab"))
    assert m.path == "[anon:migrated-test]" and m.kind == "anon"


def test_real_child_diff(target):
    for name in ("keep", "shrink", "move"):
        target.map(name, 8, guard=True)
    # "gone" differs in size from "move": for anonymous memory identity is
    # only kind+perms, so two equal-sized vanished regions are ambiguous.
    target.map("gone", 6, guard=True)
    target.write("keep")
    gone_at, old_move = target.addr("gone"), target.addr("move")
    old = read_layout(target.pid)
    target.unmap("gone")
    target.unmap("shrink", 5, 3)
    target.remap("move", 8, move=True)
    new_region = target.map("new", 3, guard=True)
    new = read_layout(target.pid)
    diff = diff_layouts(old, new)

    assert [(o.start, n.end) for o, n in diff.shrunk] == [
        (target.addr("shrink"), target.addr("shrink", 5))]
    # (Guard pages of equal size -- "gone"'s old ones, "new"'s -- may pair up
    # as "moved" depending on where the kernel placed "new": they never
    # migrate, so only migrating mappings are compared.)
    assert [(o.start, n.start) for o, n in diff.moved if o.migrates] == \
        [(old_move, target.addr("move"))]
    assert [m.start for m in diff.removed if m.migrates] == [gone_at]
    # (the guard pages of "new" are new mappings of kind skip)
    assert [m.start for m in diff.new if m.migrates] == [new_region]
    assert not [o for o, n in diff.grown + diff.changed if o.migrates]
    assert old.find(target.addr("keep")) == new.find(target.addr("keep"))
    # exact address ranges, independent of VMA cutting -- less what the
    # other layout holds there: the kernel may place "new" or the moved
    # region in a hole just left (seen once in CI: "new" inside "gone")
    assert diff.removed_runs == PageRuns.from_pairs(
        [(target.addr("shrink", 5), 3), (old_move, 8), (gone_at, 6)]).subtract(new.runs())
    assert diff.added_runs == PageRuns.from_pairs(
        [(new_region, 3), (target.addr("move"), 8)]).subtract(old.runs())


def test_real_child_grow_in_place(target):
    target.map("g", 4, guard=True)
    target.unmap("g", 2, 2)            # free the tail: room to grow back
    old = read_layout(target.pid)
    addr = target.addr("g")
    assert target.remap("g", 4) == addr  # mremap grows in place
    diff = diff_layouts(old, read_layout(target.pid))
    assert [(o.start, o.end, n.end) for o, n in diff.grown] == [
        (addr, addr + 2 * P, addr + 4 * P)]
    assert diff.added_runs == PageRuns.from_pairs([(addr + 2 * P, 2)])


def test_read_layout_of_gone_process(target):
    pid = target.pid
    target.close()
    with pytest.raises(NoSuchProcess, match=str(pid)):
        read_layout(pid)


def test_an_unchanged_layout_is_reused_and_a_changed_one_read_again(target):
    """read_layout(pid, previous) skips the parse only when the maps text
    is byte for byte what ``previous`` was parsed from."""
    target.map("a", 4, guard=True)
    first = read_layout(target.pid)
    again = read_layout(target.pid, first)
    assert again is first
    assert again.runs() is first.runs()            # computed once per layout
    target.map("b", 3, guard=True)
    changed = read_layout(target.pid, first)
    assert changed is not first
    assert changed == read_layout(target.pid)       # as a fresh parse sees it
    assert changed.find(target.addr("b")) is not None and first.find(target.addr("b")) is None
    target.unmap("a", 0, 1)
    shrunk = read_layout(target.pid, changed)
    assert shrunk is not changed and shrunk.find(target.addr("a")) is None
    # A Layout made by hand (no text behind it) is never taken for current.
    assert read_layout(target.pid, Layout(list(changed))) is not None
