"""migratectl's messages and output shapes when things go wrong: bad
arguments (named by their flag, with the real limits; `send --json` still
prints its one object), wrong --control paths, certificate files that are
missing or not PEM, a daemon that dies while `send` follows it, stdout closed
early, ids shown whole by `list`, an IPv6 listen address shown in the form
`send` reads back, and the final delta's size in the live table."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import time

import pytest

from migrated.cli.send import OPTION_INT_MAX
from migrated.daemon.config import parse_hostport
from migrated.engine.transport import MIN_LINK_RATE
from migrated.wire import limits as L

from .conftest import PY, ROOT, control_request, ctl

# The keys `migratectl send --json` documents (issue 4 item 5), plus the
# ones it has always added.
SEND_JSON_KEYS = ("status", "image_id", "tracker", "rounds", "freeze_ms", "total_ms",
                  "bytes_sent", "migration_id", "pid", "peer", "error")
# A workload prints "ready" within this long on a loaded 2-core box.
WORKLOAD_READY_S = 30.0
# Waits for a migration's progress in the daemon's status.
PROGRESS_TIMEOUT_S = 30.0


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr, r.stderr


@contextlib.contextmanager
def workload(mib: int, rate: int):
    p = subprocess.Popen([PY, "-m", "migrated.workload", "--mib", str(mib), "--rate", str(rate)],
                         stdout=subprocess.PIPE, cwd=ROOT)
    try:
        r, _, _ = select.select([p.stdout], [], [], WORKLOAD_READY_S)
        assert r, "workload did not start"
        assert p.stdout.readline().decode().startswith("ready")
        yield p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)   # works on a stopped process too
        p.wait(10)
        p.stdout.close()


def wait_migration(control: str, pred, timeout: float = PROGRESS_TIMEOUT_S) -> list[dict]:
    """`list` over the control socket until ``pred(migrations)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        ms = control_request(control, {"op": "list"})["result"]
        if pred(ms):
            return ms
        assert time.monotonic() < deadline, f"timed out waiting: {ms}"
        time.sleep(0.05)


# -- arguments (no daemon needed: they fail before connecting) -------------------

NOWHERE = "/nonexistent/migrated.sock"


MIN_RATE_SHOWN = f"{MIN_LINK_RATE // 1024}K"


@pytest.mark.parametrize("args, flag, says", [
    (["--downtime-ms", "99999999"], "--downtime-ms", f"0 to {OPTION_INT_MAX}"),
    (["--downtime-ms", "-1"], "--downtime-ms", f"0 to {OPTION_INT_MAX}"),
    (["--max-rounds", str(2 * OPTION_INT_MAX)], "--max-rounds", f"0 to {OPTION_INT_MAX}"),
    (["--max-bandwidth", "0.5"], "--max-bandwidth", MIN_RATE_SHOWN),
    (["--max-bandwidth", str(MIN_LINK_RATE - 1)], "--max-bandwidth", MIN_RATE_SHOWN),
    (["--max-bandwidth", "garbage"], "--max-bandwidth", "K, M, G"),
    (["--timeout", "inf"], "--timeout", "finite"),
    (["--timeout", "nan"], "--timeout", "finite"),
])
def test_send_option_errors_name_the_flag_and_the_real_limit(args, flag, says):
    """Before: the daemon refused with its internal keys (downtime_ms,
    max_bandwidth, timeout_s) and wrong reasons ("not 0.0" for 0.5)."""
    r = ctl(NOWHERE, "send", "1", "127.0.0.1:1", *args)
    no_traceback(r)
    assert r.returncode == 2, r
    assert flag in r.stderr and says in r.stderr, r.stderr
    for internal in ("downtime_ms", "max_bandwidth", "timeout_s", "cannot reach"):
        assert internal not in r.stderr, r.stderr


def test_send_limits_are_inclusive():
    """The limits themselves pass parsing (and fail later, at the socket)."""
    r = ctl(NOWHERE, "send", "1", "127.0.0.1:1", "--max-bandwidth", MIN_RATE_SHOWN,
            "--downtime-ms", str(OPTION_INT_MAX), "--max-rounds", "0", "--timeout", "1e-3")
    assert r.returncode == 1 and "cannot reach migrated" in r.stderr, r.stderr


@pytest.mark.parametrize("args", [
    ["abc", "127.0.0.1:1"],
    ["0", "127.0.0.1:1"],
    ["1", "127.0.0.1:1", "--max-bandwidth", "garbage"],
    ["1", "127.0.0.1:1", "--downtime-ms", "-1"],
    ["1"],
    ["1", "127.0.0.1:1", "surplus"],
])
def test_send_json_argument_errors_still_print_the_json_object(args):
    """Before: argparse's usage and exit 2, no JSON on stdout at all."""
    r = ctl(NOWHERE, "send", *args, "--json")
    no_traceback(r)
    assert r.returncode == 2, r
    obj = json.loads(r.stdout)
    assert set(SEND_JSON_KEYS) <= set(obj), obj
    assert obj["status"] == "failed" and obj["rounds"] == [] and obj["bytes_sent"] == 0
    assert obj["error"] and "usage:" in r.stderr
    # Without --json, no JSON.
    r = ctl(NOWHERE, "send", *args)
    assert r.returncode == 2 and r.stdout == ""


# -- wrong --control paths ------------------------------------------------------------

def test_control_path_that_is_no_socket_is_explained(tmp_path):
    """Before: a file or a directory was "the daemon is not running (stale
    socket)", a path too long for a unix socket ended in ": None"."""
    reg = tmp_path / "not-a-socket"
    reg.write_text("")
    r = ctl(str(reg), "status")
    assert r.returncode == 1 and "is not a socket" in r.stderr, r.stderr
    r = ctl(str(tmp_path), "status")
    assert r.returncode == 1 and "is a directory" in r.stderr, r.stderr
    long = str(tmp_path / ("x" * 120))
    r = ctl(long, "status")
    assert r.returncode == 1 and "longer than a unix socket address allows" in r.stderr, r.stderr
    for bad in (reg, tmp_path, long):
        r = ctl(str(bad), "list")
        assert "stale socket" not in r.stderr and "None" not in r.stderr, r.stderr
    # A missing path and a socket nobody listens on keep their hints.
    r = ctl(str(tmp_path / "absent.sock"), "status")
    assert "No such file" in r.stderr and "is migrated running?" in r.stderr
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale)                     # closed without listening: refused
    r = ctl(stale, "status")
    assert r.returncode == 1 and "stale socket" in r.stderr, r.stderr


# -- certificates ------------------------------------------------------------------

def test_certs_errors_are_messages_not_tracebacks(tmp_path):
    d = str(tmp_path)
    r = ctl(NOWHERE, "certs", "init-ca", "--dir", d)
    assert r.returncode == 0, r.stderr
    missing = os.path.join(d, "missing.pem")
    r = ctl(NOWHERE, "certs", "show", missing)
    no_traceback(r)
    assert r.returncode == 1 and missing in r.stderr and "No such file" in r.stderr
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    r = ctl(NOWHERE, "certs", "show", str(junk))
    no_traceback(r)
    assert r.returncode == 1 and "not a PEM certificate" in r.stderr, r.stderr
    for days in ("-5", "0", "99999999", "soon"):
        for cmd in (["issue", "--dir", d, "--name", "n1"],
                    ["init-ca", "--dir", os.path.join(d, "ca2")]):
            r = ctl(NOWHERE, "certs", *cmd, "--days", days)
            no_traceback(r)
            assert r.returncode == 2 and "--days" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(d, "n1.pem"))
    r = ctl(NOWHERE, "certs", "issue", "--dir", d, "--name", "n1", "--days", "1")
    assert r.returncode == 0, r.stderr
    r = ctl(NOWHERE, "certs", "show", os.path.join(d, "n1.pem"))
    assert r.returncode == 0 and json.loads(r.stdout)["names"] == ["n1"]


# -- against daemons ------------------------------------------------------------

def test_list_shows_ids_whole(daemons):
    """A receive that has not learned its migration id is listed by its own
    id, "recv-" + 12 hex: before, `list` cut it to 14 characters and neither
    `status` nor `cancel` took what it showed."""
    b = daemons("b")
    s = socket.create_connection(("127.0.0.1", b.port))
    try:
        s.sendall(L.PREAMBLE)             # then silence: a slow peer
        ms = wait_migration(b.control, lambda ms: any(m["role"] == "receive" for m in ms))
        want = next(m["migration_id"] for m in ms if m["role"] == "receive")
        r = ctl(b.control, "list")
        assert r.returncode == 0, r.stderr
        shown = [line.split()[0] for line in r.stdout.splitlines()[1:]]
        assert want in shown, r.stdout
        r = ctl(b.control, "status", want)
        assert r.returncode == 0 and f"migration {want}" in r.stdout, r.stderr
        r = ctl(b.control, "cancel", want)
        assert r.returncode == 0, r.stderr
    finally:
        s.close()


def test_ipv6_listen_address_is_shown_as_send_reads_it(daemons, children):
    """Before: "::1:PORT" in `status` and the ready line, which `send` read
    as the host "::1:PORT" on the default port."""
    a = daemons("a")
    b = daemons("b", extra=["--listen", "[::1]:0"])
    r = ctl(b.control, "status")
    shown = re.search(r"listening on (\S+),", r.stdout).group(1)
    assert shown == f"[::1]:{b.port}", r.stdout
    assert parse_hostport(shown) == ("::1", b.port)
    assert re.search(rf"listen=\S*\[::1\]:{b.port}\b", b.log()), b.log()
    t = children()
    r = ctl(a.control, "send", str(t.pid), shown, "--then", "resume", "--json")
    assert json.loads(r.stdout)["status"] == "completed", r.stdout + r.stderr


def test_send_table_shows_the_final_delta_size(daemons, children):
    """The freeze event carries pending_pages; before, the table looked for
    "pages" and printed "frozen: final delta" without a size."""
    a, b = daemons("a"), daemons("b")
    t = children()
    r = ctl(a.control, "send", str(t.pid), f"127.0.0.1:{b.port}", "--then", "resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^frozen: final delta \(\d+ pages\)$", r.stdout, re.M), r.stdout


def test_send_with_stdout_closed_leaves_quietly(daemons):
    """`migratectl send ... | head -1`: before, a BrokenPipeError traceback.
    Now exit 128+SIGPIPE with one line on stderr; the migration goes on."""
    a, b = daemons("a"), daemons("b")
    with workload(mib=4, rate=200) as w:
        # Capped so that the round rows come after the reader has gone.
        p = subprocess.Popen([PY, "-m", "migrated.cli", "--control", a.control, "send",
                              str(w.pid), f"127.0.0.1:{b.port}", "--then", "resume",
                              "--max-bandwidth", "32M"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = p.stdout.readline()
            p.stdout.close()              # the reader goes away (head -1)
            _, err = p.communicate(timeout=60)
            rc = p.returncode
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        mid = re.match(r"migration (\S+):", first).group(1)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert rc == 128 + signal.SIGPIPE, (rc, err)
        assert f"migration {mid} goes on" in err, err
        done = wait_migration(a.control, lambda ms: any(
            m["migration_id"] == mid and m.get("status") for m in ms))
        assert [m["status"] for m in done if m["migration_id"] == mid] == ["completed"]


def test_send_reports_what_it_saw_when_the_daemon_dies(daemons):
    """The daemon is killed while two sends follow migrations it accepted.
    Before: --json said "migration_id": null, rounds [] and bytes_sent 0,
    and the human message named neither the migration nor the process."""
    a, b = daemons("a"), daemons("b")
    # Every page of the 16 MiB is written again within each round: rounds of
    # about a second that never converge (pre-copy ends at the plateau,
    # rounds after the kill below).
    with workload(mib=16, rate=10000) as w1, workload(mib=16, rate=10000) as w2:
        cmd = [PY, "-m", "migrated.cli", "--control", a.control, "send"]
        tail = [f"127.0.0.1:{b.port}", "--then", "resume", "--max-bandwidth", "16M"]
        pj = subprocess.Popen(cmd + [str(w1.pid)] + tail + ["--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ph = subprocess.Popen(cmd + [str(w2.pid)] + tail,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Two rounds each: the first round's event surely reached its client.
            ms = wait_migration(a.control, lambda ms: len(ms) == 2 and all(
                m["rounds"] >= 2 for m in ms))
            a.proc.kill()                 # our daemon subprocess, by PID
            out_j, err_j = pj.communicate(timeout=30)
            out_h, err_h = ph.communicate(timeout=30)
        finally:
            for p in (pj, ph):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        ids = {m["pid"]: m["migration_id"] for m in ms}
        assert pj.returncode == 1 and ph.returncode == 1
        s = json.loads(out_j)
        assert set(SEND_JSON_KEYS) <= set(s), s
        assert s["status"] == "failed" and s["migration_id"] == ids[w1.pid], s
        assert len(s["rounds"]) >= 1 and s["bytes_sent"] > 0, s
        assert s["bytes_sent"] == sum(r["bytes"] for r in s["rounds"])
        assert s["pid"] == w1.pid and s["peer"] == f"127.0.0.1:{b.port}"
        mid = ids[w2.pid]
        assert "Traceback" not in err_h, err_h
        for words in (f"migration {mid}", f"process {w2.pid}", f"Check process {w2.pid}",
                      f"migratectl status {mid}", "journal"):
            assert words in err_h, err_h


def test_source_then_line_tells_what_happened_to_the_process(daemons):
    """`source then: stop` used to close the summary of a cancelled or
    failed migration whose process had just been thawed, and `source then:
    resume` that of one whose process, stopped before we came, stayed
    stopped.  The line is printed only for a completed migration, and says
    so when --then resume left the process stopped."""
    a, b = daemons("a"), daemons("b")
    with workload(mib=16, rate=200) as w:
        p = subprocess.Popen([PY, "-m", "migrated.cli", "--control", a.control, "send",
                              str(w.pid), f"127.0.0.1:{b.port}", "--max-bandwidth", "1M"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ms = wait_migration(a.control, lambda ms: any(m["state"] == "running" for m in ms))
            mid = [m["migration_id"] for m in ms if m["state"] == "running"][0]
            assert ctl(a.control, "cancel", mid).returncode == 0
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 1 and "status: cancelled" in out, out + err
        assert "source then" not in out, out

        os.kill(w.pid, signal.SIGSTOP)
        r = ctl(a.control, "send", str(w.pid), f"127.0.0.1:{b.port}", "--then", "resume")
        assert r.returncode == 0, r.stdout + r.stderr
        line = [x for x in r.stdout.splitlines() if x.startswith("source then:")]
        assert line and "stays stopped" in line[0] and str(w.pid) in line[0], r.stdout
        r = ctl(a.control, "send", str(w.pid), f"127.0.0.1:{b.port}", "--then", "resume",
                "--json")
        s = json.loads(r.stdout)
        assert s["status"] == "completed" and "stays stopped" in s["then_note"], s
        with open(f"/proc/{w.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"
