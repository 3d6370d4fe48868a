"""migratectl images: list, show, verify, export, rm (in process and as a
subprocess), JSON output and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from migrated.cli import main
from migrated.image import ImageStore
from migrated.image.manifest import CHUNK_BYTES, PAGES_NAME

from .conftest import mapping, write_pattern

BASE = 0x20000000


def _image(state: str) -> str:
    store = ImageStore(state, min_free_bytes=0)
    w = store.begin({"pid": 99, "cmdline": ["prog", "arg"], "exe": "/usr/bin/prog",
                     "source_node": "node-a"}, 0)
    w.set_layout([mapping(BASE, 64), mapping(BASE + 64 * 4096, 4, "shared-file",
                                              "rw-s", "/srv/data")])
    write_pattern(w, BASE, 40, 1)
    return w.commit({"timings": {"total_ms": 3}})[0]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_images_commands(tmp_path, capsys):
    state = str(tmp_path / "state")
    image_id = _image(state)

    rc, out, _ = run(capsys, "images", "list", "--json", "--state-dir", state)
    rows = json.loads(out)
    assert rc == 0 and [r["image_id"] for r in rows] == [image_id]
    assert rows[0]["pid"] == 99 and rows[0]["data_pages"] == 40

    rc, out, _ = run(capsys, "images", "--state-dir", state, "list")
    assert rc == 0 and image_id in out and "prog arg" in out

    rc, out, _ = run(capsys, "images", "show", image_id, "--json", "--state-dir", state)
    m = json.loads(out)
    assert rc == 0 and m["image_id"] == image_id and len(m["mappings"]) == 2
    rc, out, _ = run(capsys, "images", "show", image_id, "--state-dir", state)
    assert rc == 0 and "/srv/data" in out and "shared-file" in out

    rc, out, _ = run(capsys, "images", "verify", image_id, "--json", "--state-dir", state)
    assert rc == 0 and json.loads(out)["ok"] is True

    core = str(tmp_path / "x.core")
    rc, out, _ = run(capsys, "images", "export", image_id, "--core", core,
                     "--state-dir", state)
    assert rc == 0 and os.path.exists(core) and "ELF core" in out
    rc, _, err = run(capsys, "images", "export", image_id, "--core", core,
                     "--state-dir", state)
    assert rc == 1 and "exists" in err

    # One flipped bit: verify exits 1 and names the chunk.
    pages = os.path.join(state, "images", image_id, PAGES_NAME)
    with open(pages, "r+b") as f:
        f.seek(m["chunks"][0]["slot"] * CHUNK_BYTES + 4096 * 3 + 9)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x10]))
    rc, out, _ = run(capsys, "images", "verify", image_id, "--state-dir", state)
    assert rc == 1 and "FAILED" in out and m["chunks"][0]["vaddr"] in out

    rc, out, _ = run(capsys, "images", "rm", image_id, "--state-dir", state)
    assert rc == 0
    rc, out, _ = run(capsys, "images", "list", "--json", "--state-dir", state)
    assert json.loads(out) == []


@pytest.mark.parametrize("bad", ["../../etc", "nope"])
def test_bad_ids_are_clean_errors(tmp_path, capsys, bad):
    state = str(tmp_path / "state")
    _image(state)
    for action in ("show", "verify", "rm"):
        rc, out, err = run(capsys, "images", action, bad, "--state-dir", state)
        assert rc == 1 and "invalid image id" in err and out == ""


def test_missing_state_dir_is_not_created(tmp_path, capsys):
    state = str(tmp_path / "absent")
    rc, out, _ = run(capsys, "images", "list", "--json", "--state-dir", state)
    assert rc == 0 and json.loads(out) == []
    assert not os.path.exists(state)
    rc, _, err = run(capsys, "images", "show", "20250101-000000.000-0123456789",
                     "--state-dir", state)
    assert rc == 1 and "no image" in err


def test_subprocess_json(tmp_path):
    state = str(tmp_path / "state")
    image_id = _image(state)
    r = subprocess.run([sys.executable, "-m", "migrated.cli", "images", "list",
                        "--json", "--state-dir", state],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [x["image_id"] for x in json.loads(r.stdout)] == [image_id]


def _hostile_image(state: str) -> str:
    """An image as a source can make it: the process's command line, exe
    and a mapping path carry terminal escape sequences and bytes that are
    not UTF-8 (both legal in a Linux argv and path)."""
    store = ImageStore(state, min_free_bytes=0)
    w = store.begin({"pid": 99, "cmdline": ["prog\x1b]0;owned\x07", "\x1b[2J\udcff"],
                     "exe": "/usr/bin/\x1b[31mprog", "source_node": "node-a"}, 0)
    w.set_layout([mapping(BASE, 64, path="/lib/\x1b[31m\udcfe.so")])
    write_pattern(w, BASE, 4, 1)
    return w.commit({})[0]


def test_text_from_the_source_reaches_the_terminal_escaped(tmp_path, capsys):
    state = str(tmp_path / "state")
    image_id = _hostile_image(state)
    rc, out, _ = run(capsys, "images", "list", "--state-dir", state)
    assert rc == 0 and "\x1b" not in out and "\x07" not in out
    assert "prog\\x1b]0;owned\\x07 \\x1b[2J\\xff" in out
    rc, out, _ = run(capsys, "images", "show", image_id, "--state-dir", state)
    assert rc == 0 and "\x1b" not in out
    assert "/usr/bin/\\x1b[31mprog" in out and "/lib/\\x1b[31m\\xfe.so" in out
    # A strict UTF-8 stdout (the usual en_US.UTF-8 locale) could not even
    # encode the undecodable byte: list failed with a traceback.
    for cmd in (["list"], ["show", image_id]):
        r = subprocess.run([sys.executable, "-m", "migrated.cli", "images", *cmd,
                            "--state-dir", state], capture_output=True,
                           env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
        assert r.returncode == 0, r.stderr.decode()
        assert b"\x1b" not in r.stdout


def test_json_is_accepted_where_the_readme_shows_it(tmp_path, capsys):
    """README: `migratectl images ... rm ID [--state-dir DIR] [--json]`; and
    an operator who scripts one command with --json tries it on the others.
    `images rm --json`, `cancel --json` and `certs show --json` were usage
    errors (exit 2)."""
    state = str(tmp_path / "state")
    first, second = _image(state), _image(state)
    rc, out, _ = run(capsys, "images", "rm", first, second, "--json", "--state-dir", state)
    assert rc == 0 and json.loads(out) == {"removed": [first, second]}
    rc, out, err = run(capsys, "images", "rm", "20250101-000000.000-0123456789", "--json",
                       "--state-dir", state)
    assert rc == 1 and json.loads(out) == {"removed": []} and "no image" in err

    rc, _, err = run(capsys, "--control", str(tmp_path / "none.sock"), "cancel", "abc",
                     "--json")
    assert rc == 1 and "cannot reach" in err

    pki = str(tmp_path / "pki")
    assert run(capsys, "certs", "make", "--dir", pki, "--nodes", "n1")[0] == 0
    rc, out, _ = run(capsys, "certs", "show", os.path.join(pki, "n1.pem"), "--json")
    assert rc == 0 and "n1" in json.loads(out)["names"]


def test_a_closed_stdout_is_no_crash(tmp_path):
    """Started with stdout closed (`>&-`, a cron job), Python's sys.stdout
    is None and print() to it does nothing: the escaping wrapper must not
    turn that into an AttributeError and exit status 1."""
    state = str(tmp_path / "state")
    _image(state)
    r = subprocess.run([sys.executable, "-m", "migrated.cli", "images", "list",
                        "--state-dir", state],
                       stderr=subprocess.PIPE, text=True, timeout=60,
                       preexec_fn=lambda: os.close(1))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
