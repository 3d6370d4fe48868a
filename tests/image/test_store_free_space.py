"""Free space is promised to the images being received: three receives
that start at once each saw the same free space, all were admitted, and the
disk ran full under them (the --min-free reserve gone, two migrations lost
mid-stream).  The one that does not fit is refused at begin, before any
page moves."""

from __future__ import annotations

import pytest


from migrated.image.store import DiskFull, ImageStore
from tests.cluster import Cluster, tmpfs_available

MIB = 1 << 20

pytestmark = pytest.mark.skipif(not tmpfs_available(), reason="needs root to mount a tmpfs")


def test_receives_at_once_cannot_spend_the_reserve():
    with Cluster(tls=False) as c:
        sd = c.tmpfs("state", "44M")
        store = ImageStore(sd, min_free_bytes=8 * MIB)
        meta = {"source_node": "n", "pid": 1, "cmdline": ["x"], "exe": "/x",
                "migration_id": "m"}
        a = store.begin(dict(meta, migration_id="m1"), expected_bytes=13 * MIB)
        b = store.begin(dict(meta, migration_id="m2"), expected_bytes=13 * MIB)
        with pytest.raises(DiskFull, match="promised to images being received"):
            store.begin(dict(meta, migration_id="m3"), expected_bytes=13 * MIB)
        a.abort()                                   # what it promised is free again
        c3 = store.begin(dict(meta, migration_id="m3"), expected_bytes=13 * MIB)
        b.abort()
        c3.abort()
