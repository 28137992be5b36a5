"""The "fused_ring" backend's names, kept importable here; it lives in ring.py with the reference ring."""

from __future__ import annotations

from .ring import (
    DEFAULT_MERGE,
    MERGE_ENV,
    default_engine,
    fused_ring_attention,
    release_ring_buffers,
    set_default_merge,
)

__all__ = [
    "DEFAULT_MERGE",
    "MERGE_ENV",
    "default_engine",
    "fused_ring_attention",
    "release_ring_buffers",
    "set_default_merge",
]
