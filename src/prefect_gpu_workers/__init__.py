"""Per-worker GPU concurrency limits for Prefect process workers."""

__version__ = "0.1.0"
