"""Manifests that are valid JSON (and correctly sealed) but hold a field of
the wrong type: every reader refuses them with an ImageError naming the
field, `images list` shows the image as one unreadable row and still lists
the others, `verify` fails, and no `migratectl images` action prints a
traceback."""

from __future__ import annotations

import copy
import json
import os

import pytest

from migrated.cli import main
from migrated.errors import ImageError
from migrated.image import ImageStore
from migrated.image import manifest as mf

from .conftest import mapping, runs, write_pattern

P = 4096
A = 0x7F0000000000
F = 0x7F1000000000


def _image(store: ImageStore, pid: int) -> str:
    w = store.begin({"pid": pid, "cmdline": ["app", "--x"], "exe": "/usr/bin/app"}, 0)
    w.set_layout([mapping(A, 600), mapping(F, 16, "file", "r--p", "/usr/lib/libfoo.so",
                                            0x3000)])
    write_pattern(w, A, 520, 1)
    w.write_zeros(runs(A + 520 * P, 10))
    write_pattern(w, F + 2 * P, 3, 2)
    return w.commit({"timings": {"t": 1.5}})[0]


def _set(path, value):
    def edit(m):
        *head, last = path
        for k in head:
            m = m[k]
        m[last] = value
    return edit


def _pop(path):
    def edit(m):
        *head, last = path
        for k in head:
            m = m[k]
        del m[last]
    return edit


EDITS = {
    "meta-list": _set(["meta"], []),
    "meta-string": _set(["meta"], "x"),
    "totals-list": _set(["totals"], [1]),
    "totals-missing-key": _pop(["totals", "data_pages"]),
    "cmdline-ints": _set(["meta", "cmdline"], [1, 2]),
    "cmdline-string": _set(["meta", "cmdline"], "app --x"),
    "pid-string": _set(["meta", "pid"], "abc"),
    "pid-bool": _set(["meta", "pid"], True),
    "arch-int": _set(["meta", "arch"], 5),
    "timings-string": _set(["meta", "timings"], "slow"),
    "data-string": _set(["mappings", 0, "data"], "x"),
    "data-triplets": _set(["mappings", 0, "data"], [["0x7f0000000000", 1, 2]]),
    "data-count-zero": _set(["mappings", 0, "data"], [["0x7f0000000000", 0]]),
    "data-address-int": _set(["mappings", 0, "data"], [[0x7F0000000000, 1]]),
    "perms-int": _set(["mappings", 0, "perms"], 7),
    "path-int": _set(["mappings", 1, "path"], 5),
    "offset-not-hex": _set(["mappings", 1, "offset"], "zz"),
    "migrates-missing": _pop(["mappings", 0, "migrates"]),
    "flags-string": _set(["mappings", 0, "flags"], "heap"),
    "mapping-list": _set(["mappings", 0], [1, 2]),
    "chunk-vaddr-int": _set(["chunks", 0, "vaddr"], 5),
    "chunk-slot-string": _set(["chunks", 0, "slot"], "1"),
    "chunk-digest-short": _set(["chunks", 0, "digest"], "abc"),
    "chunks-dict": _set(["chunks"], {}),
}


@pytest.fixture
def two_images(tmp_path):
    store = ImageStore(str(tmp_path / "state"), min_free_bytes=0)
    bad, good = _image(store, 1), _image(store, 2)
    path = os.path.join(store.images_dir, bad, mf.MANIFEST_NAME)
    with open(path, "rb") as f:
        original = json.loads(f.read())
    return store, bad, good, path, original


def _write(path: str, m: dict) -> None:
    m = dict(m)
    m.pop("digest", None)
    _, blob = mf.seal_manifest(m)
    with open(path, "wb") as f:
        f.write(blob)


@pytest.mark.parametrize("name", sorted(EDITS))
def test_a_field_of_the_wrong_type_is_refused_cleanly(two_images, name, capsys, tmp_path):
    store, bad, good, path, original = two_images
    m = copy.deepcopy(original)
    EDITS[name](m)
    _write(path, m)

    with pytest.raises(ImageError, match="bad field"):
        store.show(bad)
    rows = {r["image_id"]: r for r in store.list()}
    assert set(rows) == {bad, good}
    assert "error" in rows[bad] and "bad field" in rows[bad]["error"]
    assert "error" not in rows[good] and rows[good]["pid"] == 2
    res = store.verify(bad)
    assert not res.ok and "bad field" in res.error

    state = store.state_dir
    for argv in (["list"], ["list", "--json"], ["show", bad], ["show", bad, "--json"],
                 ["verify", bad], ["export", bad, "--core", str(tmp_path / "core")]):
        rc = main(["images", *argv, "--state-dir", state])    # a traceback fails here
        out, err = capsys.readouterr()
        if argv[0] == "list":
            assert rc == 0 and ("unreadable" in out or '"error"' in out), out
            assert good in out
        else:
            assert rc != 0, (argv, out, err)
    assert not (tmp_path / "core").exists()


def test_the_intact_manifest_reads_back(two_images):
    store, bad, _, path, original = two_images
    _write(path, copy.deepcopy(original))
    assert store.show(bad)["meta"]["pid"] == 1
    assert store.verify(bad).ok


def test_a_manifest_nested_past_the_parser_is_one_unreadable_image(two_images, capsys, tmp_path):
    """JSON nested deeper than the parser goes raised RecursionError out of
    show(): `images list` ended with a traceback instead of listing the
    other images (found by fuzzing the image store)."""
    store, bad, good, path, _ = two_images
    with open(path, "wb") as f:
        f.write(b'{"a":' * 2000)
    with pytest.raises(ImageError, match="not valid JSON"):
        store.show(bad)
    rows = {r["image_id"]: r for r in store.list()}
    assert "not valid JSON" in rows[bad]["error"] and rows[good]["pid"] == 2
    assert not store.verify(bad).ok
    state = store.state_dir
    for argv in (["list"], ["verify", bad], ["export", bad, "--core", str(tmp_path / "core")]):
        rc = main(["images", *argv, "--state-dir", state])    # a traceback fails here
        out, _ = capsys.readouterr()
        assert (rc == 0 and good in out) if argv[0] == "list" else rc != 0, (argv, out)
    assert not (tmp_path / "core").exists()
