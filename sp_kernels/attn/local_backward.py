"""Backward of one block of attention, given the (block's or the final merged) output and LSE.

``block_attention_backward(q, k, v, out, lse, dout, scale=..., causal=...) -> (dq, dk, dv)`` is the
flash-attention backward of one query block over one key block:

    P  = exp(S * scale - lse)          S = q k^T, lse = the row's log-sum-exp (layout [B, Hq, Sq])
    dV = P^T dO        dP = dO V^T     Dr = rowsum(dO * O)     dS = P * (dP - Dr)
    dQ = scale * dS K  dK = scale * dS^T Q

Given the FINAL merged ``out`` and ``lse`` of a row (over every key block of the ring, plus joint
keys), ``P`` is that row's final softmax restricted to this block and ``Dr`` is the final
``sum_j P_ij dP_ij``, so the per-block results are exactly this block's share of the full gradient:
dq summed over blocks, and dk/dv of a block summed over query blocks, give the full-sequence
gradients. No merge backward is needed (the merge is recomputed from the final LSE, as flash
attention does).

Shapes and conventions are local.py's: BSHD ``q/out/dout [B, Sq, Hq, D]``, ``k/v [B, Sk, Hkv, D]``,
``Hq % Hkv == 0`` (GQA/MQA: dk/dv of a KV head are summed over its query group), ``lse [B, Hq, Sq]``
fp32 (fp64 for fp64 inputs), ``causal`` only for square blocks (top-left == bottom-right). A row with
lse = -inf (no keys anywhere) gets zero gradients. Results are returned in ``grad_dtype`` (default: the
input dtype); the ``math`` kernel accumulates in fp32 (fp64 for fp64) either way, so a ring passes
``grad_dtype=float32`` to accumulate low-precision gradients in fp32.

Candidates in priority order, each saying why it declines (the forward dispatcher's pattern):
``cudnn`` (``aten._scaled_dot_product_cudnn_attention_backward``), ``torch_flash``
(``aten._scaled_dot_product_flash_attention_backward``), ``torch_efficient``
(``aten._scaled_dot_product_efficient_attention_backward``), ``cpu_flash``
(``aten._scaled_dot_product_flash_attention_for_cpu_backward``) and ``math`` (chunked over query rows,
from the definition above, any device). The GPU candidates reuse the forward candidates' decline
rules (local.py), since the aten backward ops accept what their forward ops accept.

NOT RUN ON A GPU (no GPU in the session that wrote this): the cudnn, torch_flash and torch_efficient
adapters were written from the aten schemas of torch 2.14 and are untested; ``cpu_flash`` and
``math`` are tested on CPU against an fp64 autograd reference (tests/test_attention_grad.py).

A block kernel without a backward (flash-attn 2/3 forward adapters, or any kernel added with
``register_block_kernel``) has no candidate here: restricting the kernels to such names raises
``NoBackwardKernelError`` naming them, never a silently different gradient.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import local as _fwd
from .local import MATH_CHUNK_ELEMENTS, NoKernelError, block_kernel_names, insert_by_name, lse_dtype

Tensor = torch.Tensor
Grads = tuple[Tensor, Tensor, Tensor]
DeclineFn = Callable[[Tensor, Tensor, Tensor, bool], "str | None"]
RunFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, bool], Grads]


@dataclass(frozen=True)
class BlockBackwardKernel:
    """One backward candidate: ``decline`` returns a reason or None; ``run`` returns (dq, dk, dv)."""

    name: str
    decline: DeclineFn
    run: RunFn


class NoBackwardKernelError(NoKernelError):
    """No backward candidate accepts the inputs (``reasons``: kernel name -> why), or the allowed
    kernels have no backward at all (``forward_only``: their names)."""

    def __init__(self, what: str, reasons: dict[str, str], forward_only: Sequence[str] = ()):
        self.forward_only = list(forward_only)
        super().__init__(what, reasons)
        if self.forward_only:
            self.args = (
                f"block kernel(s) {self.forward_only} have no backward (backward kernels: {backward_kernel_names()}; "
                "add one with register_backward_kernel); "
                f"{self.args[0]}",
            )
        else:
            self.args = (self.args[0].replace("no local attention kernel", "no block backward kernel", 1),)


def _repeat_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    return _fwd._expand_kv(k, v, heads)


def _sum_kv(dk: Tensor, dv: Tensor, kv_heads: int) -> tuple[Tensor, Tensor]:
    """Grads of K/V repeated to the query head count -> grads of the KV heads (sum over each group)."""
    B, S, H, D = dk.shape
    if H == kv_heads:
        return dk, dv
    g = H // kv_heads
    return dk.view(B, S, kv_heads, g, D).sum(3), dv.view(B, S, kv_heads, g, D).sum(3)


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


def _finite_lse(lse: Tensor) -> Tensor:
    # A row with no keys at all (lse -inf) has P = 0 everywhere: +inf makes exp(s - lse) = 0, not NaN.
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


# ---------------------------------------------------------------------------------------------
# aten GPU backward ops (UNTESTED: written from the schemas; see the module docstring)


def _empty_philox(q: Tensor) -> tuple[Tensor, Tensor]:
    # dropout_p = 0: the RNG state is never read; the ops still take the two tensors.
    return torch.empty((), dtype=torch.int64, device=q.device), torch.empty((), dtype=torch.int64, device=q.device)


def _run_cudnn(q, k, v, out, lse, dout, scale, causal) -> Grads:
    B, Sq, H, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    ke, ve = _repeat_kv(k, v, H)
    q, ke, ve, out, dout = (t.contiguous() for t in (q, ke, ve, out, dout))
    seed, offset = _empty_philox(q)
    lse4 = lse.float().contiguous().view(B, H, Sq, 1)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), _bhsd(out), lse4, seed, offset, None, None, None,
        Sq, Sk, 0.0, causal, scale=scale,
    )
    dk, dv = _sum_kv(_bhsd(dk), _bhsd(dv), Hkv)
    return _bhsd(dq), dk, dv


def _run_torch_flash(q, k, v, out, lse, dout, scale, causal) -> Grads:
    Sq, H = q.shape[1], q.shape[2]
    Sk, Hkv = k.shape[1], k.shape[2]
    ke, ve = _repeat_kv(k, v, H)
    seed, offset = _empty_philox(q)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), _bhsd(out), lse.float().contiguous(), None, None,
        Sq, Sk, 0.0, causal, seed, offset, scale=scale,
    )
    dk, dv = _sum_kv(_bhsd(dk), _bhsd(dv), Hkv)
    return _bhsd(dq), dk, dv


def _run_torch_efficient(q, k, v, out, lse, dout, scale, causal) -> Grads:
    # The SDPA derivative of aten._scaled_dot_product_efficient_attention (BHSD views); its forward pads
    # the LSE to a multiple of 32 rows on CUDA, so the LSE handed back is padded the same way.
    B, Sq, H, _ = q.shape
    Hkv = k.shape[2]
    ke, ve = _repeat_kv(k, v, H)
    padded = -(-Sq // 32) * 32
    lse_p = torch.zeros((B, H, padded), dtype=torch.float32, device=q.device)
    lse_p[..., :Sq] = lse
    seed, offset = _empty_philox(q)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(ke), _bhsd(ve), None, _bhsd(out), lse_p, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale,
    )
    dk, dv = _sum_kv(_bhsd(dk), _bhsd(dv), Hkv)
    return _bhsd(dq), dk, dv


# ---------------------------------------------------------------------------------------------
# torch's CPU flash backward: takes the LSE it is given (tested on CPU against the fp64 reference).


def _run_cpu_flash(q, k, v, out, lse, dout, scale, causal) -> Grads:
    H, Hkv = q.shape[2], k.shape[2]
    ke, ve = _repeat_kv(k, v, H)
    # The kernel needs the LSE in the value dtype's accumulation type and contiguous.
    lse = _finite_lse(lse).to(lse_dtype(q.dtype)).contiguous()
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout.contiguous()), _bhsd(q.contiguous()), _bhsd(ke.contiguous()), _bhsd(ve.contiguous()),
        _bhsd(out.contiguous()), lse, 0.0, causal, scale=scale,
    )
    dk, dv = _sum_kv(_bhsd(dk), _bhsd(dv), Hkv)
    return _bhsd(dq), dk, dv


# ---------------------------------------------------------------------------------------------
# Math: the definition, chunked over query rows, fp32 accumulation (fp64 for fp64), any device.


def _run_math(q, k, v, out, lse, dout, scale, causal) -> Grads:
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc = lse_dtype(q.dtype)
    kh = k.permute(0, 2, 1, 3).to(acc)  # [B, Hkv, Sk, D]
    vh = v.permute(0, 2, 1, 3).to(acc)
    dq = torch.empty((B, Sq, Hq, D), dtype=acc, device=q.device)
    dk = torch.zeros((B, Hkv, Sk, D), dtype=acc, device=q.device)
    dv = torch.zeros((B, Hkv, Sk, D), dtype=acc, device=q.device)
    lse = _finite_lse(lse.to(acc))
    rows = max(1, min(Sq, MATH_CHUNK_ELEMENTS // max(1, B * Hq * Sk)))

    def grouped(t: Tensor, s0: int, c: int) -> Tensor:  # [B, c, Hq, D] -> [B, Hkv, g*c, D]
        return t[:, s0 : s0 + c].reshape(B, c, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * c, D).to(acc)

    for s0 in range(0, Sq, rows):
        c = min(Sq, s0 + rows) - s0
        qc, oc, doc = grouped(q, s0, c), grouped(out, s0, c), grouped(dout, s0, c)
        s = torch.matmul(qc, kh.transpose(-1, -2)).mul_(scale).view(B, Hkv, g, c, Sk)
        if causal:
            qpos = torch.arange(s0, s0 + c, device=q.device).unsqueeze(1)
            s.masked_fill_(torch.arange(Sk, device=q.device).unsqueeze(0) > qpos, float("-inf"))
        lc = lse[:, :, s0 : s0 + c].reshape(B, Hkv, g, c, 1)
        p = s.sub_(lc).exp_().view(B, Hkv, g * c, Sk)
        dv += torch.matmul(p.transpose(-1, -2), doc)
        dp = torch.matmul(doc, vh.transpose(-1, -2))
        dr = (doc * oc).sum(-1, keepdim=True)
        ds = p.mul_(dp.sub_(dr))  # p is not needed after this
        dqc = torch.matmul(ds, kh).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
        dq[:, s0 : s0 + c].view(B, c, Hkv, g, D).copy_(dqc.view(B, Hkv, g, c, D).permute(0, 3, 1, 2, 4))
    return dq, dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# Registry and dispatcher

_KERNELS: list[BlockBackwardKernel] = [
    BlockBackwardKernel("cudnn", _fwd._decline_cudnn, _run_cudnn),
    BlockBackwardKernel("torch_flash", _fwd._decline_torch_flash, _run_torch_flash),
    BlockBackwardKernel("torch_efficient", _fwd._decline_torch_efficient, _run_torch_efficient),
    BlockBackwardKernel("cpu_flash", _fwd._decline_cpu_flash, _run_cpu_flash),
    BlockBackwardKernel("math", _fwd._decline_math, _run_math),
]


def backward_kernel_names() -> list[str]:
    return [kern.name for kern in _KERNELS]


def register_backward_kernel(kernel: BlockBackwardKernel, *, before: str | None = None) -> None:
    """Add (or replace, by name) a backward candidate; ``before`` places it ahead of an existing one.
    A forward kernel added with ``register_block_kernel`` gets its backward under the same name."""
    insert_by_name(_KERNELS, kernel, before, "register_backward_kernel")


def _requested(kernels: Sequence[str] | None) -> list[str] | None:
    if kernels is None:
        env = os.environ.get("SP_KERNELS_BLOCK_KERNELS", "").strip()
        kernels = [s.strip() for s in env.split(",") if s.strip()] if env else None
    return None if kernels is None else list(kernels)


def select_backward_kernel(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, kernels: Sequence[str] | None = None
) -> BlockBackwardKernel:
    """The first backward candidate allowed by ``kernels`` (the forward's names, or
    $SP_KERNELS_BLOCK_KERNELS) that accepts; ``NoBackwardKernelError`` otherwise."""
    names = _requested(kernels)
    if names is not None:
        known = set(block_kernel_names()) | set(backward_kernel_names())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown block kernel name(s) {unknown}; expected names from {sorted(known)}")
    allowed = _KERNELS if names is None else [kern for kern in _KERNELS if kern.name in names]
    reasons: dict[str, str] = {}
    for kern in allowed:
        why = kern.decline(q, k, v, causal)
        if why is None:
            return kern
        reasons[kern.name] = why
    forward_only = [] if names is None else [n for n in names if n not in backward_kernel_names()]
    raise NoBackwardKernelError(_fwd._describe(q, k, causal), reasons, forward_only)


def block_attention_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    kernels: Sequence[str] | None = None,
    grad_dtype: torch.dtype | None = None,
) -> Grads:
    """``(dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D])`` of one block; see the module docstring."""
    _fwd._check_block_inputs(q, k, v, causal)
    B, Sq, Hq, D = q.shape
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(
            f"block_attention_backward: out {tuple(out.shape)} and dout {tuple(dout.shape)} must have q's shape "
            f"{tuple(q.shape)}"
        )
    if tuple(lse.shape) != (B, Hq, Sq):
        raise ValueError(f"block_attention_backward: lse must be [B, Hq, Sq] = {[B, Hq, Sq]}, got {tuple(lse.shape)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    gdt = grad_dtype if grad_dtype is not None else q.dtype
    if Sq == 0 or k.shape[1] == 0:
        # Nothing attended: no gradient flows (still a kernel check, so a bad configuration raises anyway).
        select_backward_kernel(q, k, v, causal, kernels)
        return (torch.zeros(q.shape, dtype=gdt, device=q.device), torch.zeros(k.shape, dtype=gdt, device=q.device),
                torch.zeros(v.shape, dtype=gdt, device=q.device))
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    if out.dtype != q.dtype:
        out = out.to(q.dtype)
    kern = select_backward_kernel(q, k, v, causal, kernels)
    dq, dk, dv = kern.run(q, k, v, out, lse, dout, scale, causal)
    return dq.to(gdt), dk.to(gdt), dv.to(gdt)


class BackwardUnsupportedError(NotImplementedError):
    """A backward through a path that has none (e.g. the allowed block kernels are forward-only),
    raised at the first backward with the backend and the kernels named."""


def unsupported(backend: str, err: NoBackwardKernelError) -> BackwardUnsupportedError:
    return BackwardUnsupportedError(f"attention backward (backend {backend!r}): {err}")


class BlockAttention(torch.autograd.Function):
    """``block_attention`` with a backward through ``block_attention_backward`` (returns out only)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, kernels, backend):  # type: ignore[override]
        out, lse = _fwd.block_attention(q, k, v, softmax_scale=scale, causal=causal, kernels=kernels)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal, ctx.kernels, ctx.backend = scale, causal, kernels, backend
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        try:
            dq, dk, dv = block_attention_backward(
                q, k, v, out, lse, dout, scale=ctx.scale, causal=ctx.causal, kernels=ctx.kernels
            )
        except NoBackwardKernelError as e:
            raise unsupported(ctx.backend, e) from e
        return dq, dk, dv, None, None, None, None


def block_attention_grad(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    causal: bool = False,
    kernels: Sequence[str] | None = None,
    backend: str = "local",
) -> Tensor:
    """Differentiable block attention (out only): forward ``block_attention``, backward the dispatcher
    above; ``backend`` names the caller in the error of a backward that has no kernel."""
    return BlockAttention.apply(q, k, v, scale, causal, None if kernels is None else tuple(kernels), backend)
