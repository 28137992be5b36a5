"""sp_kernels: sequence parallelism of attention for PyTorch models (diffusion transformers first).

Public API (a contract, see docs/api.md): the ``_sp_plan`` types, sharding helpers,
configuration, apply/remove of the hooks, and ``attention``.
"""

from __future__ import annotations

from .attn import Attention, attention
from .distributed.parallel_state import SequenceParallelConfig, destroy_sequence_parallel, init_sequence_parallel
from .ops._ext import build_info
from .plan.hooks import apply_sequence_parallel, is_sequence_parallel, remove_sequence_parallel
from .plan.sharding import sp_gather, sp_shard, sp_shard_with_padding
from .plan.specs import (
    SequenceParallelInput,
    SequenceParallelJointInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    get_sp_plan_from_model,
    validate_sp_plan,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "SequenceParallelConfig",
    "SequenceParallelInput",
    "SequenceParallelOutput",
    "SequenceParallelPartialInput",
    "SequenceParallelJointInput",
    "apply_sequence_parallel",
    "attention",
    "build_info",
    "destroy_sequence_parallel",
    "get_sp_plan_from_model",
    "init_sequence_parallel",
    "is_sequence_parallel",
    "remove_sequence_parallel",
    "sp_gather",
    "sp_shard",
    "sp_shard_with_padding",
    "validate_sp_plan",
]

