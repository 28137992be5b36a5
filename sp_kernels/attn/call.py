"""One attention call as the backends see it, and the validation of user inputs that builds it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..distributed.parallel_state import SPState
from ..plan.context import ShardLayout
from ..plan.specs import JOINT_STRATEGIES
from .mask import FullMask

Tensor = torch.Tensor


@dataclass(frozen=True)
class Joint:
    """Replicated (text) tokens attended together with the sharded sequence."""

    query: Tensor  # [B, J, Hq, D]
    key: Tensor  # [B, J, Hkv, D]
    value: Tensor  # [B, J, Hkv, D]
    strategy: str  # "front": output rows [joint | local]; "rear": [local | joint]

    @property
    def length(self) -> int:
        return self.query.shape[1]


@dataclass(frozen=True)
class AttentionCall:
    query: Tensor  # [B, S_local, Hq, D]: the sharded part only (a replicated prefix moved into joint)
    key: Tensor
    value: Tensor
    scale: float
    causal: bool
    joint: Joint | None
    backend: str
    state: SPState
    layout: ShardLayout | None  # how the sequence was cut (auto_pad), None when unknown
    mask: FullMask | None = None  # the mask in the full frame of the call (attn/mask.py), None: no mask

    def valid_rows(self, sp_rank: int) -> int:
        """Real rows of ``sp_rank``'s shard (all of them when no layout was recorded)."""
        if self.layout is None:
            return self.query.shape[1]
        return self.layout.valid_rows(sp_rank)

    def needs_grad(self) -> bool:
        """Whether autograd records this call: the differentiable backends run it (attn/grad.py)."""
        if not torch.is_grad_enabled():
            return False
        tensors = (self.query, self.key, self.value)
        if self.joint is not None:
            tensors += (self.joint.query, self.joint.key, self.joint.value)
        return any(t.requires_grad for t in tensors)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_4d(name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"attention: {name} must be [batch, seq, heads, head_dim] (4 dims), got shape {_shape(t)}")
    return t


def validate_inputs(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    softmax_scale: float | None,
    joint_query: Tensor | None,
    joint_key: Tensor | None,
    joint_value: Tensor | None,
    joint_strategy: str,
) -> tuple[float, Joint | None]:
    """Check shapes, dtypes and options; return (softmax scale, joint tokens or None)."""
    q, k, v = _check_4d("query", query), _check_4d("key", key), _check_4d("value", value)
    if k.shape != v.shape:
        raise ValueError(f"attention: key {_shape(k)} and value {_shape(v)} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: batch of query ({q.shape[0]}) and key/value ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention: head_dim of query ({q.shape[3]}) and key/value ({k.shape[3]}) differ; expected equal"
        )
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"attention: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]}) "
            "(MHA, GQA or MQA)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: query/key/value dtypes differ: {q.dtype}/{k.dtype}/{v.dtype}; expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: query/key/value devices differ: {q.device}/{k.device}/{v.device}")
    if q.shape[3] < 1:
        raise ValueError(f"attention: head_dim (the last dim) must be >= 1, got query shape {_shape(q)}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"attention: softmax_scale must be a float or None, got {softmax_scale!r}")
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"attention: softmax_scale must be a finite positive number, got {softmax_scale!r}")

    if joint_strategy not in JOINT_STRATEGIES:
        raise ValueError(f"attention: joint_strategy={joint_strategy!r} is unknown; expected one of {list(JOINT_STRATEGIES)}")
    given = {"joint_query": joint_query, "joint_key": joint_key, "joint_value": joint_value}
    present = [name for name, t in given.items() if t is not None]
    if not present:
        return scale, None
    if len(present) != 3:
        missing = [name for name, t in given.items() if t is None]
        raise ValueError(
            f"attention: joint tensors must be given together; got {present} but not {missing} "
            "(pass all of joint_query, joint_key, joint_value, or none)"
        )
    jq, jk, jv = (_check_4d(name, t) for name, t in given.items())
    expect_q = [q.shape[0], jq.shape[1], q.shape[2], q.shape[3]]
    expect_kv = [q.shape[0], jq.shape[1], k.shape[2], q.shape[3]]
    if list(jq.shape) != expect_q:
        raise ValueError(
            f"attention: joint_query has shape {_shape(jq)}; expected [batch, joint_len, heads, head_dim] = {expect_q} "
            "(same batch, heads and head_dim as query)"
        )
    for name, t in (("joint_key", jk), ("joint_value", jv)):
        if list(t.shape) != expect_kv:
            raise ValueError(
                f"attention: {name} has shape {_shape(t)}; expected {expect_kv} "
                "(same batch and joint_len as joint_query, heads and head_dim of key)"
            )
    for name, t in (("joint_query", jq), ("joint_key", jk), ("joint_value", jv)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"attention: {name} is {t.dtype} on {t.device}; expected {q.dtype} on {q.device} like query"
            )
    return scale, Joint(jq, jk, jv, joint_strategy)
