"""Fixtures for the image store tests: a store in a temp dir, a tiny tmpfs
for disk-full cases, and helpers to build layouts and page data."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from migrated.image import ImageStore
from migrated.runs import PAGE_SIZE, PageRuns
from tests.target import expected

MiB = 1 << 20


def mapping(start: int, npages: int, kind: str = "anon", perms: str = "rw-p",
            path: str = "", offset: int = 0) -> dict:
    return {"start": start, "end": start + npages * PAGE_SIZE, "perms": perms,
            "offset": offset, "path": path, "kind": kind}


def runs(start: int, npages: int) -> PageRuns:
    return PageRuns.from_range(start, start + npages * PAGE_SIZE)


def write_pattern(writer, start: int, npages: int, seed: int) -> bytes:
    """Write the tests.target page pattern for those pages; return it."""
    data = expected(start, npages, seed)
    writer.write_pages(runs(start, npages), data)
    return data


@pytest.fixture
def store(tmp_path) -> ImageStore:
    return ImageStore(str(tmp_path / "state"), min_free_bytes=0)


@pytest.fixture
def tiny_tmpfs():
    """A 2 MiB tmpfs mounted on a fresh temp dir (we run as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="migrated-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", d],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)
