"""A state dir someone else can write is refused (like sshd's StrictModes):
records planted there must never make root's daemon or --thaw-journal
act -- here, SIGCONT a root process that was stopped on purpose."""

from __future__ import annotations

import json
import os
import pwd
import subprocess

import pytest

from migrated.daemon.config import ConfigError, load_config
from migrated.daemon.durable import UnsafeStateDir, check_private_dir
from migrated.daemon.indoubt import InDoubt
from migrated.daemon.journal import FrozenJournal
from migrated.kernel.procfs import read_starttime

from .conftest import PY, ROOT, open_dir, proc_state, wait_state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to nobody")


def _nobody() -> tuple[int, int]:
    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


@pytest.fixture
def base():
    """A 0755 root-owned dir under /tmp (uid nobody can traverse it)."""
    d = open_dir()
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


def _plant(state_dir: str, pid: int) -> str:
    """What the reviewer's nobody did: a state dir and frozen/ owned by
    nobody, and a record naming ``pid`` written as nobody."""
    uid, gid = _nobody()
    frozen = os.path.join(state_dir, "frozen")
    os.makedirs(frozen, mode=0o755)
    for p in (state_dir, frozen):
        os.chown(p, uid, gid)
    rec = os.path.join(frozen, f"{pid}.json")
    with open(rec, "w") as f:
        json.dump({"pid": pid, "starttime": read_starttime(pid)}, f)
    os.chown(rec, uid, gid)
    return rec


def test_check_private_dir_rules(base):
    ok = os.path.join(base, "ok")
    os.mkdir(ok, 0o755)
    check_private_dir(ok)                      # 0755, ours, /tmp is sticky: fine
    os.chmod(ok, 0o770)
    with pytest.raises(UnsafeStateDir, match="writable by group or others .*0770"):
        check_private_dir(ok)
    os.chmod(ok, 0o700)
    uid, gid = _nobody()
    os.chown(ok, uid, gid)
    with pytest.raises(UnsafeStateDir, match=f"owned by uid {uid}, not by uid 0"):
        check_private_dir(ok)
    # A parent someone else owns could swap the state dir under us.
    parent = os.path.join(base, "p")
    os.mkdir(parent, 0o755)
    child = os.path.join(parent, "sd")
    os.mkdir(child, 0o700)
    os.chown(parent, uid, gid)
    with pytest.raises(UnsafeStateDir, match=f"{parent} above the state dir"):
        check_private_dir(child)
    # ... and so could a symlink to it.
    link = os.path.join(base, "link")
    os.symlink(child, link)
    with pytest.raises(UnsafeStateDir, match="above the state dir"):
        check_private_dir(link)


def test_journal_and_indoubt_refuse_a_foreign_state_dir(base, children):
    victim = children()
    sd = os.path.join(base, "sd")
    _plant(sd, victim.pid)
    with pytest.raises(UnsafeStateDir, match="owned by uid"):
        FrozenJournal(sd)
    with pytest.raises(UnsafeStateDir, match="owned by uid"):
        InDoubt(sd, None, lambda rec: "absent")
    # The state dir is ours but frozen/ is not.
    os.chown(sd, 0, 0)
    with pytest.raises(UnsafeStateDir, match="frozen-PID journal .*owned by uid"):
        FrozenJournal(sd)
    # The state dir is ours but group-writable.
    os.chown(os.path.join(sd, "frozen"), 0, 0)
    os.chmod(sd, 0o775)
    with pytest.raises(UnsafeStateDir, match="writable by group"):
        FrozenJournal(sd)
    with pytest.raises(UnsafeStateDir, match="writable by group"):
        InDoubt(sd, None, lambda rec: "absent")


class _Log:
    def __init__(self):
        self.lines = []

    def line(self, event, mid=None, level="info", **fields):
        self.lines.append((event, fields))

    def error(self, event, mid=None, **fields):
        self.lines.append((event, fields))


def test_a_record_we_do_not_own_is_not_acted_on(base, children):
    victim = children()
    os.kill(victim.pid, 19)                     # SIGSTOP, on purpose
    assert wait_state(victim.pid, "T")
    sd = os.path.join(base, "sd")
    rec = _plant(sd, victim.pid)
    for p in (sd, os.path.dirname(rec)):       # dirs ours, the record not
        os.chown(p, 0, 0)
        os.chmod(p, 0o700)
    log = _Log()
    j = FrozenJournal(sd, log)
    assert j.records() == []
    res = j.replay()
    assert res.thawed == [] and proc_state(victim.pid) == "T"
    assert any(e == "journal_bad_record" and "not trusted" in f["error"] for e, f in log.lines)
    # A symlink record is not followed either.
    os.unlink(rec)
    target = os.path.join(base, "elsewhere.json")
    with open(target, "w") as f:
        json.dump({"pid": victim.pid, "starttime": read_starttime(victim.pid)}, f)
    os.symlink(target, rec)
    assert j.replay().thawed == [] and proc_state(victim.pid) == "T"


def test_thaw_journal_refuses_a_foreign_state_dir(base, children):
    """The reviewer's repro_statedir_owner.sh: before the fix root's
    --thaw-journal thawed a root process stopped on purpose."""
    victim = children()
    os.kill(victim.pid, 19)
    assert wait_state(victim.pid, "T")
    sd = os.path.join(base, "sd")
    _plant(sd, victim.pid)
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--thaw-journal", "--config",
                        "/dev/null", "--state-dir", sd],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0, r
    assert "owned by uid" in r.stdout + r.stderr, r
    assert proc_state(victim.pid) == "T"
    assert os.listdir(os.path.join(sd, "frozen")) == [f"{victim.pid}.json"]


def test_daemon_refuses_a_foreign_state_dir(base, children):
    victim = children()
    os.kill(victim.pid, 19)
    assert wait_state(victim.pid, "T")
    sd = os.path.join(base, "sd")
    _plant(sd, victim.pid)
    with pytest.raises(ConfigError, match="state dir .* owned by uid .*from --state-dir"):
        load_config(["--config", "/dev/null", "--insecure", "--state-dir", sd])
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--config", "/dev/null", "--insecure",
                        "--listen", "127.0.0.1:0", "--control", os.path.join(base, "c.sock"),
                        "--state-dir", sd],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode != 0, r
    assert "owned by uid" in r.stderr and "event=ready" not in r.stdout + r.stderr, r
    assert proc_state(victim.pid) == "T"
    # frozen/ alone being someone else's is refused too.
    os.chown(sd, 0, 0)
    with pytest.raises(ConfigError, match="frozen/ .*owned by uid"):
        load_config(["--config", "/dev/null", "--insecure", "--state-dir", sd])


def test_our_own_state_dirs_still_work(base, children):
    """mkdtemp (0700) and a fresh state dir made by the journal are fine,
    and records we write there are replayed."""
    sd = os.path.join(base, "fresh", "sd")
    j = FrozenJournal(sd)
    assert oct(os.stat(j.dir).st_mode & 0o777) == "0o700"
    InDoubt(sd, None, lambda rec: "absent")
    p = children()
    j.on_freeze(p.pid, read_starttime(p.pid))
    os.kill(p.pid, 19)
    assert wait_state(p.pid, "T")
    assert FrozenJournal(sd).replay().thawed == [p.pid]
    assert wait_state(p.pid, "S")
    load_config(["--config", "/dev/null", "--insecure", "--state-dir", sd])


def test_thaw_journal_never_opens_a_planted_lock(base, children):
    """Root's --thaw-journal on a state dir owned by nobody: nobody's
    migrated.lock symlink must not make root truncate and write its
    target, and the refusal is one clear log line, not a traceback."""
    sd = os.path.join(base, "sd")
    victim = children()
    _plant(sd, victim.pid)
    precious = os.path.join(base, "root-owned")
    with open(precious, "w") as f:
        f.write("keep me\n")
    os.chmod(precious, 0o600)
    uid, gid = _nobody()
    subprocess.run(["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups",
                    "ln", "-s", precious, os.path.join(sd, "migrated.lock")], check=True)
    r = subprocess.run([PY, "-m", "migrated.daemon.main", "--thaw-journal", "--config",
                        "/dev/null", "--state-dir", sd],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    with open(precious) as f:
        assert f.read() == "keep me\n"
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "event=thaw_refused" in out and "owned by uid" in out, r
    assert "Traceback" not in out, out


def test_an_indoubt_record_we_do_not_own_is_not_acted_on(base, children):
    p = children()
    sd = os.path.join(base, "sd")
    calls = []
    log = _Log()
    d = InDoubt(sd, log, lambda rec: calls.append(rec) or "absent")
    rec = os.path.join(d.dir, "m1.json")
    with open(rec, "w") as f:
        json.dump({"mid": "m1", "pid": p.pid, "starttime": read_starttime(p.pid),
                   "host": "127.0.0.1", "port": 9, "image_id": "x", "since": 0.0}, f)
    os.chown(rec, *_nobody())
    assert d.resume() == {"withdrawing": [], "completed": []}
    assert calls == [] and os.path.exists(rec)
    assert any(e == "indoubt_bad_record" and "not trusted" in f["error"] for e, f in log.lines)
    d.close()
