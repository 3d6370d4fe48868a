"""`make demo` interrupted with Ctrl-C: everything is cleaned up and it says
so, without Python tracebacks (before: two, the demo's and the workload's)."""

from __future__ import annotations

import glob
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ctrl_c_during_the_migration_cleans_up_quietly():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "migrated-demo-*")))
    env = dict(os.environ, DEMO_MIB="64", DEMO_RATE="5000", DEMO_HOT_MIB="16")
    p = subprocess.Popen([sys.executable, "demo/run.py"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)      # its own group: Ctrl-C reaches all
    out = []
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("migration ") for line in out):
            assert time.monotonic() < deadline, "".join(out)
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if r:
                line = p.stdout.readline()
                assert line, "".join(out)
                out.append(line)
        os.killpg(p.pid, signal.SIGINT)           # what a terminal's Ctrl-C does
        rest, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    text = "".join(out) + rest
    assert "Traceback" not in text, text
    assert "demo: interrupted" in text, text
    assert p.returncode == 128 + signal.SIGINT, (p.returncode, text)
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "migrated-demo-*")))
    assert after <= before, after - before
    # nothing of the group is left running
    assert subprocess.run(["pgrep", "-g", str(p.pid)], capture_output=True).returncode == 1
