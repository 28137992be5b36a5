"""Contract import path of the sharding helpers (docs/api.md; vLLM-Omni's module name). Defined in
``sp_kernels.plan.sharding``."""

from .plan.sharding import sp_gather, sp_shard, sp_shard_with_padding

__all__ = ["sp_gather", "sp_shard", "sp_shard_with_padding"]
