"""The destination's image store (format: protocol/IMAGE.md)."""

from migrated.errors import ImageError, ImageNotFound, QuotaExceeded

from .manifest import CHUNK_PAGES, FORMAT_VERSION, IMAGE_ID_RE, MIGRATABLE_KINDS
from .store import (DEFAULT_MIN_FREE_BYTES, DiskFull, ImageStore, ImageWriter,
                    LayoutViolation, VerifyResult)

__all__ = [
    "ImageStore", "ImageWriter", "VerifyResult", "ImageError", "ImageNotFound",
    "QuotaExceeded", "DiskFull", "LayoutViolation", "DEFAULT_MIN_FREE_BYTES",
    "CHUNK_PAGES", "FORMAT_VERSION", "IMAGE_ID_RE", "MIGRATABLE_KINDS",
]
