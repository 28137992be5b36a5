"""Contract import path of the plan types (docs/api.md; vLLM-Omni's module name, so a port changes
only its import prefix). Defined in ``sp_kernels.plan.specs``."""

from .plan.specs import (
    JOINT_STRATEGIES,
    SequenceParallelInput,
    SequenceParallelJointInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    get_sp_plan_from_model,
    validate_sp_plan,
)

__all__ = [
    "JOINT_STRATEGIES",
    "SequenceParallelInput",
    "SequenceParallelJointInput",
    "SequenceParallelOutput",
    "SequenceParallelPartialInput",
    "get_sp_plan_from_model",
    "validate_sp_plan",
]
