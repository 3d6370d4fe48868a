"""Fixtures of the fault matrix: one FaultBench (two plaintext daemons, a
tmpfs destination, a fault proxy) shared by every case of a module."""

from __future__ import annotations

import pytest

from tests.cluster import tmpfs_available


@pytest.fixture(scope="module")
def bench():
    if not tmpfs_available():
        pytest.skip("needs root: the destination's state dir is a small tmpfs")
    from tests.faults.harness import FaultBench
    b = FaultBench()
    try:
        yield b
    finally:
        b.close()
