"""`make demo`: a live migration on one machine with nothing to configure.

Two daemons on loopback with throwaway certificates, the bundled workload
dirtying memory at a steady rate, `migratectl send` printing the
round-by-round table and the summary, the image verified on the receiving
side, and everything cleaned up (processes ended by the PIDs we started,
temporary directory removed).

Settings (environment): DEMO_MIB (default 256), DEMO_RATE pages/s (default
20000), DEMO_HOT_MIB (default 32).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PY = sys.executable
BIN = os.path.dirname(PY)
MIGRATED = os.path.join(BIN, "migrated")
MIGRATECTL = os.path.join(BIN, "migratectl")
READY_TIMEOUT_S = 20.0


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctl(control: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([MIGRATECTL, "--control", control, *args], check=check,
                          text=True, capture_output=True)


def wait_ready(control: str, proc: subprocess.Popen, logpath: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: daemon exited early (status {proc.returncode}); "
                             f"its log:\n{open(logpath).read()}")
        if os.path.exists(control) and ctl(control, "status", check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"demo: daemon did not become ready in {READY_TIMEOUT_S:.0f} s; "
                     f"its log:\n{open(logpath).read()}")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGCONT)  # the workload stays stopped after --then stop
        proc.terminate()
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def main() -> int:
    mib = int(os.environ.get("DEMO_MIB", "256"))
    rate = int(os.environ.get("DEMO_RATE", "20000"))
    hot = int(os.environ.get("DEMO_HOT_MIB", "32"))
    work = tempfile.mkdtemp(prefix="migrated-demo-")
    procs: list[subprocess.Popen] = []
    workload = None
    try:
        say("throwaway cluster CA and node certificates")
        pki = os.path.join(work, "pki")
        subprocess.run([MIGRATECTL, "certs", "make", "--dir", pki, "--nodes", "alpha,beta",
                        "--san", "127.0.0.1"], check=True)

        nodes = {}
        for name in ("alpha", "beta"):
            port = free_port()
            control = os.path.join(work, f"{name}.sock")
            state = os.path.join(work, f"{name}-state")
            logpath = os.path.join(work, f"{name}.log")
            argv = [MIGRATED, "--node", name, "--listen", f"127.0.0.1:{port}",
                    "--control", control, "--state-dir", state,
                    "--config", os.path.join(work, "none.toml"),
                    "--tls-ca", os.path.join(pki, "ca.pem"),
                    "--tls-cert", os.path.join(pki, f"{name}.pem"),
                    "--tls-key", os.path.join(pki, f"{name}.key")]
            open(os.path.join(work, "none.toml"), "w").close()
            log = open(logpath, "w")
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            procs.append(proc)
            nodes[name] = dict(port=port, control=control, state=state, log=logpath, proc=proc)
        for n in nodes.values():
            wait_ready(n["control"], n["proc"], n["log"])
        say(f"daemons up: alpha (pid {nodes['alpha']['proc'].pid}) and beta "
            f"(pid {nodes['beta']['proc'].pid}), mutual TLS 1.3 on loopback")

        say(f"workload: {mib} MiB resident, dirtying {rate} pages/s in its first {hot} MiB")
        workload = subprocess.Popen([PY, "-m", "migrated.workload", "--mib", str(mib),
                                     "--rate", str(rate), "--hot-mib", str(hot)],
                                    stdout=subprocess.PIPE, text=True)
        line = workload.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"demo: workload failed to start: {line!r}")
        print(line.strip())
        time.sleep(1.0)

        say(f"migratectl send {workload.pid} 127.0.0.1:{nodes['beta']['port']}")
        rc = subprocess.run([MIGRATECTL, "--control", nodes["alpha"]["control"], "send",
                             str(workload.pid), f"127.0.0.1:{nodes['beta']['port']}"]).returncode
        if rc != 0:
            print("\ndemo: the migration failed; sender's log:")
            print(open(nodes["alpha"]["log"]).read())
            return rc

        say("images on beta")
        listing = json.loads(ctl(nodes["beta"]["control"], "images", "list", "--json",
                                 "--state-dir", nodes["beta"]["state"]).stdout)
        for img in listing:
            print(f"{img['image_id']}  pid={img['pid']}  {img['data_bytes'] / 2**20:.1f} MiB "
                  f"data, {img['zero_pages']} zero pages, digest {img['digest']}")
        image_id = listing[-1]["image_id"]

        say(f"migratectl images verify {image_id}")
        v = subprocess.run([MIGRATECTL, "images", "verify", image_id,
                            "--state-dir", nodes["beta"]["state"]])
        if v.returncode != 0:
            return v.returncode

        say("convergence log (sender)")
        with open(nodes["alpha"]["log"]) as f:
            for line in f:
                if "event=" in line and ("event=round" in line or "event=freeze" in line
                                         or "event=commit" in line or "event=end" in line
                                         or "event=start" in line):
                    print(line.rstrip()[:200])
        say("demo complete; cleaning up")
        return 0
    finally:
        stop(workload)
        for p in procs:
            stop(p)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # main's finally has stopped the daemons and the workload and removed
        # the throwaway directory; a traceback would only hide that.
        print("\ndemo: interrupted; daemons and workload stopped, temporary files removed",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
