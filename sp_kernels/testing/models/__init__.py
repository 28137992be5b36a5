"""Small reference models used by the demo and the tests."""

from .dit import DiT, DiTConfig

__all__ = ["DiT", "DiTConfig"]
