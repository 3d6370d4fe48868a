"""Exactness: a committed image against the frozen source, page for page."""

from __future__ import annotations

import numpy as np

from migrated.image import manifest as mf
from migrated.kernel.maps import read_layout
from migrated.kernel.pagemap import Pagemap
from migrated.kernel.reader import MemReader
from migrated.runs import PAGE_SIZE, PageRuns

# Bytes compared per step (image read_memory + source read): bounded memory.
BLOCK_BYTES = 16 * 1024 * 1024


def image_runs(manifest: dict) -> tuple[PageRuns, PageRuns]:
    """(data pages, zero pages) the image holds."""
    data = PageRuns.concat(mf.runs_from_json(m.get("data", []), "data") for m in manifest["mappings"])
    zero = PageRuns.concat(mf.runs_from_json(m.get("zero", []), "zero") for m in manifest["mappings"])
    return data, zero


def source_present(pid: int) -> PageRuns:
    """Pages of migratable mappings the (frozen) source has, file pages excluded."""
    with Pagemap(pid) as pm:
        return PageRuns.concat(pm.present_runs(m) for m in read_layout(pid).migratable())


def compare(store, image_id: str, pid: int) -> dict:
    """Compare; returns figures, raises AssertionError with details on a difference."""
    m = store.show(image_id)
    data, zero = image_runs(m)
    held = data.union(zero)
    present = source_present(pid)
    missing = present.subtract(held)
    assert not missing, (f"{missing.total_pages()} present source pages are not in the image "
                         f"(first {missing.pairs()[:3]})")
    layout_area = read_layout(pid).runs()
    stray = held.subtract(layout_area)
    assert not stray, f"image holds pages outside the source's mappings: {stray.pairs()[:3]}"
    reader = MemReader(pid)
    compared = 0
    for start, npages in held.pairs():
        for off in range(0, npages * PAGE_SIZE, BLOCK_BYTES):
            lo = start + off
            n = min(BLOCK_BYTES, npages * PAGE_SIZE - off)
            img = store.read_memory(image_id, lo, n)
            src = reader.read_range(lo, n)
            if img != src:
                a = np.frombuffer(img, np.uint8).reshape(-1, PAGE_SIZE)
                b = np.frombuffer(src, np.uint8).reshape(-1, PAGE_SIZE)
                bad = np.flatnonzero((a != b).any(axis=1))
                raise AssertionError(f"{bad.size} page(s) differ, first at "
                                     f"{lo + int(bad[0]) * PAGE_SIZE:#x}")
            compared += n // PAGE_SIZE
    return {"data_pages": data.total_pages(), "zero_pages": zero.total_pages(),
            "compared_pages": compared, "present_pages": present.total_pages()}
