"""A writer process SIGKILLed at any point leaves no complete image, and the
next start (cleanup_partials) removes what it left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from migrated.image import ImageStore
from migrated.image.manifest import MANIFEST_NAME

from .conftest import mapping, write_pattern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The writer: begin an image, then write rounds of pages until killed.
# With KILL_AT_RENAME it commits instead and SIGKILLs itself at the very
# moment the partial directory would be renamed into images/.
WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from migrated.image import ImageStore
    from migrated.runs import PageRuns
    from tests.target import expected
    store = ImageStore(sys.argv[1], min_free_bytes=0)
    w = store.begin({{"pid": os.getpid()}}, 0)
    base = 0x20000000
    w.set_layout([{{"start": base, "end": base + 4096 * 4096, "perms": "rw-p",
                    "kind": "anon", "offset": 0, "path": ""}}])
    data = expected(base, 256, 1)
    w.write_pages(PageRuns.from_range(base, base + 256 * 4096), data)
    if sys.argv[2] == "rename":
        real = os.rename
        def rename(src, dst):
            if "/partial/" in src:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.rename = rename
        w.commit()
        raise SystemExit("commit returned")
    print("writing", flush=True)
    i = 0
    while True:
        a = base + (i % 16) * 256 * 4096
        w.write_pages(PageRuns.from_range(a, a + 256 * 4096), data)
        i += 1
""")


def _run_writer(state: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER.format(root=ROOT), state, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _after_crash_checks(state: str, expect_manifest: bool) -> None:
    store = ImageStore(state, min_free_bytes=0)
    assert store.list() == []
    assert os.listdir(store.images_dir) == []
    partials = os.listdir(store.partial_dir)
    assert len(partials) == 1
    has_manifest = os.path.exists(os.path.join(store.partial_dir, partials[0],
                                               MANIFEST_NAME))
    assert has_manifest == expect_manifest
    # Daemon start: partials go; then the store works as before.
    restarted = ImageStore(state, min_free_bytes=0)
    assert restarted.cleanup_partials() == 1
    assert os.listdir(restarted.partial_dir) == []
    w = restarted.begin({"pid": 1}, 0)
    w.set_layout([mapping(0x20000000, 16)])
    write_pattern(w, 0x20000000, 16, 2)
    image_id = w.commit()[0]
    assert [r["image_id"] for r in restarted.list()] == [image_id]
    assert restarted.verify(image_id).ok


def test_writer_killed_mid_image(tmp_path):
    state = str(tmp_path / "state")
    proc = _run_writer(state, "loop")
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    _after_crash_checks(state, expect_manifest=False)


def test_writer_killed_between_manifest_and_rename(tmp_path):
    state = str(tmp_path / "state")
    proc = _run_writer(state, "rename")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL, err
    _after_crash_checks(state, expect_manifest=True)
