"""ELF core export writes a temporary file and renames it into place: a
failed, corrupt or interrupted export leaves nothing under the requested
name (and no descriptor open), --force replaces a file or symlink instead
of writing through it, the result is 0600 and the exporter's, and the
state directory is never a destination."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from migrated.errors import ImageError
from migrated.image import ImageStore
from migrated.image import manifest as mf
from migrated.image.elfcore import export_image
from migrated.runs import PAGE_SIZE

from .conftest import mapping, runs, write_pattern

P = PAGE_SIZE
A = 0x7f0000000000          # anon mapping, 1500 pages (3 chunks)
F = 0x7f1000000000          # private file mapping whose file is not here
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _image(store: ImageStore, pages: int = 1200) -> str:
    w = store.begin({"pid": 4242, "cmdline": ["app"], "exe": "/usr/bin/app"}, 0)
    w.set_layout([mapping(A, max(1500, pages), "anon"),
                  mapping(F, 16, "file", "r--p", "/nonexistent/libfoo.so", offset=3 * P)])
    for at in range(0, pages, 512):
        write_pattern(w, A + at * P, min(512, pages - at), seed=1)
    w.write_zeros(runs(A + pages * P, 10))
    write_pattern(w, F + 2 * P, 3, seed=2)
    return w.commit()[0]


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _nothing_left(directory: str, name: str) -> None:
    left = sorted(os.listdir(directory))
    assert name not in left and not [n for n in left if n.endswith(".tmp")], left


def _manifest(store, image_id) -> str:
    return os.path.join(store.images_dir, image_id, mf.MANIFEST_NAME)


def test_manifest_bit_flip_exports_nothing(store, tmp_path):
    image_id = _image(store)
    man = _manifest(store, image_id)
    blob = bytearray(open(man, "rb").read())
    i = blob.index(b'"vaddr": "0x7f0000000000"') + len(b'"vaddr": "0x7f0000')
    blob[i] ^= 0x02                              # chunk 0x7f0000000000 -> ...200000
    open(man, "wb").write(bytes(blob))
    out = tmp_path / "out"
    out.mkdir()
    before = _fds()
    with pytest.raises(ImageError, match=rf"manifest digest.*images verify {image_id}"):
        export_image(store, image_id, str(out / "core"))
    _nothing_left(str(out), "core")
    assert _fds() == before


def test_sealed_but_inconsistent_manifest_leaves_no_core(store, tmp_path):
    """The digest holds (resealed), yet a chunk with data has no record:
    refused by the structure check, or found while writing (after the
    temporary file exists) where the tree has no such check."""
    image_id = _image(store)
    man = _manifest(store, image_id)
    m = store.show(image_id)
    m["chunks"] = [c for c in m["chunks"] if c["vaddr"] != f"{A + 512 * P:#x}"]
    m.pop("digest")
    _, blob = mf.seal_manifest(m)
    open(man, "wb").write(blob)
    out = tmp_path / "out"
    out.mkdir()
    before = _fds()
    with pytest.raises(ImageError, match="no slot|no chunk record"):
        export_image(store, image_id, str(out / "core"))
    _nothing_left(str(out), "core")
    assert _fds() == before


def test_page_data_bit_flip_is_refused(store, tmp_path):
    image_id = _image(store)
    m = store.show(image_id)
    slot = next(c for c in m["chunks"] if c["vaddr"] == f"{A + 1024 * P:#x}")["slot"]
    with open(os.path.join(store.images_dir, image_id, mf.PAGES_NAME), "r+b") as f:
        f.seek(slot * mf.CHUNK_BYTES + 5 * P + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    assert not store.verify(image_id).ok
    out = tmp_path / "out"
    out.mkdir()
    before = _fds()
    # The third chunk: two were already copied into the temporary file.
    with pytest.raises(ImageError, match=rf"{A + 1024 * P:#x}.*digest.*images verify"):
        export_image(store, image_id, str(out / "core"))
    _nothing_left(str(out), "core")
    assert _fds() == before


# A migratectl whose second pwrite (the first after the headers) stops
# and says so, so the test can signal it mid-export every time.
SLOW_EXPORT = r"""
import os, sys, time
real, calls = os.pwrite, [0]
def pwrite(fd, data, off):
    calls[0] += 1
    if calls[0] == 2:
        print("writing", flush=True)
        time.sleep(60)
    return real(fd, data, off)
os.pwrite = pwrite
from migrated.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,rc", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_export_leaves_nothing(store, tmp_path, sig, rc):
    image_id = _image(store)
    out = tmp_path / "out"
    out.mkdir()
    core = str(out / "core")
    p = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, "images", "export", image_id,
                          "--core", core, "--state-dir", store.state_dir],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(sig)
        assert p.wait(30) == rc
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    _nothing_left(str(out), "core")


def test_force_replaces_file_and_symlink_never_writes_through(store, tmp_path):
    image_id = _image(store, pages=8)
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)
    pre, victim, link = d / "core.pre", d / "victim", d / "core.link"
    pre.write_bytes(b"someone else's file")
    victim.write_bytes(b"victim")
    os.chmod(pre, 0o644)
    os.chmod(victim, 0o666)
    os.symlink(victim, link)
    if os.geteuid() == 0:
        for p in (pre, victim):
            os.chown(p, 65534, 65534)
        os.lchown(link, 65534, 65534)
    # Without --force neither is touched (a symlink counts as existing).
    for p in (pre, link):
        with pytest.raises(ImageError, match="exists"):
            export_image(store, image_id, str(p))
    assert pre.read_bytes() == b"someone else's file" and os.path.islink(link)
    for p in (pre, link):
        export_image(store, image_id, str(p), overwrite=True)
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode), p
        assert stat.S_IMODE(st.st_mode) == 0o600, (p, oct(st.st_mode))
        assert st.st_uid == os.geteuid(), p
        assert open(p, "rb").read(4) == b"\x7fELF"
    assert victim.read_bytes() == b"victim"
    assert sorted(os.listdir(d)) == ["core.link", "core.pre", "victim"]


def test_umask_does_not_change_the_mode(store, tmp_path):
    image_id = _image(store, pages=8)
    old = os.umask(0o277)
    try:
        export_image(store, image_id, str(tmp_path / "core"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "core").st_mode) == 0o600


def test_state_dir_is_never_a_destination(store, tmp_path):
    image_id = _image(store, pages=8)
    pages = os.path.join(store.images_dir, image_id, mf.PAGES_NAME)
    around = tmp_path / "into-image"
    os.symlink(os.path.join(store.images_dir, image_id), around)
    for target in (pages, os.path.join(store.partial_dir, "x.core"),
                   os.path.join(store.state_dir, "x.core"), str(around / "pages.img")):
        with pytest.raises(ImageError, match="state directory"):
            export_image(store, image_id, target, overwrite=True)
        # The store's own entry point refuses it too.
        with pytest.raises(ImageError, match="state directory"):
            store.export_core(image_id, target, overwrite=True)
    assert store.verify(image_id).ok
    assert not os.path.exists(os.path.join(store.partial_dir, "x.core"))


def test_disk_full_leaves_nothing(store, tiny_tmpfs):
    """ENOSPC half way (a 2 MiB tmpfs, ~4.7 MiB of pages): a clear error,
    no core and no temporary file."""
    image_id = _image(store)
    before = _fds()
    with pytest.raises(ImageError, match="No space left"):
        export_image(store, image_id, os.path.join(tiny_tmpfs, "core"))
    assert os.listdir(tiny_tmpfs) == []
    assert _fds() == before
