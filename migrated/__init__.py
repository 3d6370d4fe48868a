"""migrated: live migration of Linux process memory between nodes."""

__version__ = "0.1.0"
