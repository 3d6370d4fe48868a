"""migratectl images: errors of an image removed under a command, the
root hint only for permission errors, and export refusing the state
directory from the command line."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from migrated.cli import main
from migrated.cli.images import _os_errors
from migrated.errors import ImageError, ImageNotFound
from migrated.image import ImageStore
from migrated.image import manifest as mf

from .conftest import mapping, write_pattern

BASE = 0x20000000


def _image(state: str) -> str:
    store = ImageStore(state, min_free_bytes=0)
    w = store.begin({"pid": 99, "cmdline": ["prog"]}, 0)
    w.set_layout([mapping(BASE, 16)])
    write_pattern(w, BASE, 8, 1)
    return w.commit()[0]


def _args(state: str, command: str, image_id: str | None = None) -> argparse.Namespace:
    ns = argparse.Namespace(state_dir=state, images_command=command)
    if image_id is not None:
        ns.image_id = image_id
    return ns


@pytest.mark.parametrize("command", ["show", "verify", "export"])
def test_image_removed_under_a_command(tmp_path, command):
    """The command had found the image; `images rm` took it before it
    opened the next file (the race a reviewer hit with rm running)."""
    state = str(tmp_path / "state")
    image_id = _image(state)
    store = ImageStore(state, min_free_bytes=0, create=False)

    def racing(args):
        store.show(image_id)                           # found it
        store.remove(image_id)                         # rm wins the race
        with open(os.path.join(store.images_dir, image_id, mf.MANIFEST_NAME)):
            pass
    with pytest.raises(ImageNotFound) as e:
        _os_errors(racing)(_args(state, command, image_id))
    assert str(e.value) == f"image {image_id} not found (removed?)"


def test_root_hint_only_for_permission_errors(tmp_path):
    state = str(tmp_path / "state")
    _image(state)

    def missing(args):
        open(str(tmp_path / "no-such-file"))
    with pytest.raises(ImageError) as e:
        _os_errors(missing)(_args(state, "list"))
    assert "No such file" in str(e.value) and "run as root" not in str(e.value)

    def denied(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), state)
    with pytest.raises(ImageError, match=r"run as root, or pass --state-dir"):
        _os_errors(denied)(_args(state, "list"))


def test_export_refuses_own_page_file(tmp_path, capsys):
    state = str(tmp_path / "state")
    image_id = _image(state)
    pages = os.path.join(state, "images", image_id, mf.PAGES_NAME)
    rc = main(["images", "export", image_id, "--core", pages, "--force",
               "--state-dir", state])
    _, err = capsys.readouterr()
    assert rc == 1 and "state directory" in err
    rc = main(["images", "verify", image_id, "--state-dir", state])
    out, _ = capsys.readouterr()
    assert rc == 0 and "OK" in out


def test_export_summary_names_files_left_to_nt_file(tmp_path, capsys):
    state = str(tmp_path / "state")
    store = ImageStore(state, min_free_bytes=0)
    w = store.begin({"pid": 5}, 0)
    w.set_layout([mapping(BASE, 4, "file", "r--p", "/nonexistent/lib.so")])
    write_pattern(w, BASE, 1, 3)
    image_id = w.commit()[0]
    core = str(tmp_path / "core")
    rc = main(["images", "export", image_id, "--core", core, "--state-dir", state])
    out, err = capsys.readouterr()
    assert rc == 0 and "ELF core" in out
    assert "/nonexistent/lib.so" in err and "NT_FILE" in err
