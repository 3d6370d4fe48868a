"""An image removed by another process gives its quota back at once.

`migratectl images rm` works on the state directory with a store of its
own; the daemon's store must not keep charging the image it removed (the
daemon's own refusal tells the operator to run exactly that command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migrated.errors import QuotaExceeded
from migrated.image import ImageStore

from .conftest import MiB, mapping, write_pattern

M = 0x10000000
PAGES = 256                      # 1 MiB of page data per image
QUOTA = 3 * MiB + MiB // 2       # two images and a half


def _image(store: ImageStore, base: int) -> str:
    w = store.begin({"pid": 1}, 0)
    w.set_layout([mapping(base, PAGES)])
    write_pattern(w, base, PAGES, 1)
    return w.commit()[0]


@pytest.fixture
def daemon_and_cli(tmp_path):
    state = str(tmp_path / "state")
    daemon = ImageStore(state, quota_bytes=QUOTA, min_free_bytes=0)
    cli = ImageStore(state, min_free_bytes=0, create=False)
    first, _ = _image(daemon, M), _image(daemon, M + (1 << 30))
    return daemon, cli, first


def test_begin_counts_images_removed_by_another_store(daemon_and_cli):
    daemon, cli, first = daemon_and_cli
    with pytest.raises(QuotaExceeded):
        daemon.begin({}, 2 * MiB)                # 2 images + 2 MiB > quota
    cli.remove(first)
    w = daemon.begin({}, 2 * MiB)                # 1 image + 2 MiB fits
    w.abort()
    assert daemon.used_bytes() < 2 * MiB


def test_a_write_counts_again_before_it_is_refused(daemon_and_cli):
    # The writer began while both images were there; one is removed by
    # another store while it writes: its pages fit now.
    daemon, cli, first = daemon_and_cli
    w = daemon.begin({}, 0)
    w.set_layout([mapping(M, 2 * PAGES)])
    cli.remove(first)
    write_pattern(w, M, 2 * PAGES, 2)
    image_id, _ = w.commit()
    assert daemon.verify(image_id).ok


def test_an_image_being_published_is_not_counted_twice(daemon_and_cli, monkeypatch):
    # Between publish()'s rename and the writer's hand-over, the image is in
    # images/ and still charged by the writer: a count then (another
    # begin) must not add it a second time.
    from migrated.image import store as store_mod
    daemon, _, _ = daemon_and_cli
    w = daemon.begin({}, 0)
    w.set_layout([mapping(M + (2 << 30), 64)])
    write_pattern(w, M + (2 << 30), 64, 3)
    w.prepare()
    seen = []
    real = store_mod._fsync_dir

    def fsync_dir(path):
        if path == daemon.images_dir and not seen:
            seen.append(daemon.used_bytes())
        real(path)
    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    w.publish()
    # (The writer charges its manifest's length, the count its blocks.)
    assert seen and abs(seen[0] - daemon.used_bytes()) < 16 * 1024 < 64 * 4096


# -- through a real daemon and the real CLI -----------------------------------------------

CTL = os.path.join(os.path.dirname(sys.executable), "migratectl")


def _ctl(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([CTL, *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="migrating a process needs root")
def test_images_rm_gives_quota_back_to_a_running_daemon(tmp_path):
    from tests.cluster import Cluster, FAST_TIMEOUTS
    from tests.engine.procs import workload

    with Cluster(tls=False, timeouts=FAST_TIMEOUTS) as c, \
            workload(mib=24) as w:
        a, b = c.daemon("a"), c.daemon("b", extra=["--min-free", "1M"])
        # How much one image of this process takes, to set a quota that
        # holds two of them and not three.
        probe = a.migrate(w.pid, b, then="resume")
        assert probe["status"] == "completed", probe
        size = b.images()[0]["file_bytes"]
        got = _ctl("images", "rm", probe["image_id"], "--state-dir", b.state_dir)
        assert got.returncode == 0, got.stderr
        b.extra += ["--image-quota", str(size * 5 // 2)]
        b.restart()

        first = a.migrate(w.pid, b, then="resume")
        second = a.migrate(w.pid, b, then="resume")
        assert first["status"] == second["status"] == "completed", (first, second)
        refused = a.migrate(w.pid, b, then="resume")
        assert refused["status"] == "failed" and "quota" in refused.get("error", ""), refused

        got = _ctl("images", "rm", first["image_id"], "--state-dir", b.state_dir)
        assert got.returncode == 0, got.stderr
        again = a.migrate(w.pid, b, then="resume")      # no daemon restart
        assert again["status"] == "completed", again
        assert {r["image_id"] for r in b.images()} == {second["image_id"],
                                                        again["image_id"]}

        # The image is what IMAGE.md says a received image holds.
        got = _ctl("images", "verify", again["image_id"], "--state-dir", b.state_dir)
        assert got.returncode == 0, got.stdout + got.stderr
        got = _ctl("images", "show", again["image_id"], "--json", "--state-dir", b.state_dir)
        m = json.loads(got.stdout)
        for mp in m["mappings"]:
            assert (mp["dev"], mp["inode"]) == ("00:00", 0)
            assert set(mp["flags"]) <= {"deleted", "heap", "stack"}
            assert mp["deleted"] == ("deleted" in mp["flags"])
        assert isinstance(m["meta"]["timings"], dict)
