"""The Makefile's targets run files that exist (``make bench`` once pointed
at a script nobody had written), and the benchmark driver starts."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe_paths() -> list[str]:
    text = open(os.path.join(ROOT, "Makefile")).read()
    # "$(PY) some/path.py ..." in a recipe line
    return re.findall(r"^\t\$\(PY\) (\S+\.py)", text, re.M)


def test_every_script_a_make_target_runs_exists():
    paths = _recipe_paths()
    assert "benchmarks/run_all.py" in paths and "demo/run.py" in paths, paths
    missing = [p for p in paths if not os.path.isfile(os.path.join(ROOT, p))]
    assert not missing, f"Makefile runs scripts that do not exist: {missing}"


def test_the_benchmark_driver_lists_only_benchmarks_that_exist():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    for script, _, _ in run_all.BENCHES:
        assert os.path.isfile(os.path.join(ROOT, "benchmarks", script)), script
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
