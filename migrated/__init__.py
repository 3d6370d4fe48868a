"""migrated: live migration of Linux process memory between nodes."""

import os as _os

# We use numpy for integer and boolean array work only, never BLAS; its
# thread pool would be one more spinning thread per process competing with
# the page stream for the same cores.  Set before numpy is first imported.
_os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "0.1.0"
