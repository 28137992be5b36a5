"""Triton kernels of the LSE merge (same semantics as the native ops; see sp_kernels/ops/merge.py).

Each program merges ``BLOCK_R`` whole rows (one row = one (b, s, h) head vector of ``D`` elements),
so the in-place pair merge reads a row's old lse and writes its new one inside one program: no other
program touches that row. Inside the program, though, the warps that read a row's old lse are not
only the warp that writes its new one, so the pair kernel has a CTA barrier between all its loads
and its stores (see merge_pair_kernel; the CUDA kernel's ``__syncthreads`` does the same). Math in
fp32 (inputs are cast after loading, which is also what the interpreter needs for bf16). With
``BLOCK_D == D`` the column mask is dropped, so a row's mask is constant along it and, when the
strides are multiples of 16 elements (Triton specialises such integer arguments), loads and stores
are 16-byte vectors. Row indices stay int32 (divisions); byte offsets are formed in int64.

The W-way kernel takes the W parts as a tuple of pointers (W is a compile-time constant), so a list
of separately allocated partial outputs is merged without stacking them first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

_ELEMENTS_PER_PROGRAM = 4096


def _meta(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_R): the row padded to a power of two, and rows per program (about 4k elements)."""
    block_d = triton.next_power_of_2(max(d, 1))
    return block_d, max(1, _ELEMENTS_PER_PROGRAM // block_d)


@triton.jit
def _log1p(x):
    # log1p without libdevice (which the interpreter lacks): exact for tiny x, where log(1 + x) would
    # round 1 + x to 1 (Goldberg's trick: the rounding error of u = 1 + x cancels in x / (u - 1)).
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _row_coords(pid, rows, S, H, BLOCK_R: tl.constexpr):
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    h = r % H
    bs = r // H
    return rmask, (bs // S).to(tl.int64), (bs % S).to(tl.int64), h.to(tl.int64)


@triton.jit
def _tile_mask(rmask, d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == D:
        return rmask[:, None] & (d[None, :] >= 0)
    return rmask[:, None] & (d[None, :] < D)


@triton.jit
def merge_pair_kernel(
    acc_ptr,
    acc_lse_ptr,
    blk_ptr,
    blk_lse_ptr,
    dst_ptr,
    dst_lse_ptr,
    rows,
    S,
    H,
    acc_sb,
    acc_ss,
    acc_sh,
    blk_sb,
    blk_ss,
    blk_sh,
    dst_sb,
    dst_ss,
    dst_sh,
    al_sb,
    al_ss,
    al_sh,
    bl_sb,
    bl_ss,
    bl_sh,
    dl_sb,
    dl_ss,
    dl_sh,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rmask, b, s, h = _row_coords(tl.program_id(0), rows, S, H, BLOCK_R)
    la = tl.load(acc_lse_ptr + b * al_sb + s * al_ss + h * al_sh, mask=rmask, other=float("-inf"))
    lb = tl.load(blk_lse_ptr + b * bl_sb + s * bl_ss + h * bl_sh, mask=rmask, other=float("-inf"))
    hi = tl.maximum(la, lb)
    lo = tl.minimum(la, lb)
    empty = hi == float("-inf")
    hi_safe = tl.where(empty, 0.0, hi)
    lse = tl.where(empty, float("-inf"), hi + _log1p(tl.exp(lo - hi_safe)))
    lse_safe = tl.where(empty, 0.0, lse)
    wa = tl.where(empty, 0.0, tl.exp(la - lse_safe))
    wb = tl.where(empty, 0.0, tl.exp(lb - lse_safe))

    d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rmask, d, D, BLOCK_D)
    x = tl.load(acc_ptr + (b * acc_sb + s * acc_ss + h * acc_sh)[:, None] + d[None, :], mask=mask, other=0.0)
    y = tl.load(blk_ptr + (b * blk_sb + s * blk_ss + h * blk_sh)[:, None] + d[None, :], mask=mask, other=0.0)
    o = x.to(tl.float32) * wa[:, None] + y.to(tl.float32) * wb[:, None]
    # In place (lse_merge_), dst_lse is acc_lse and dst is acc. The compiler gives la several layouts
    # and loads it once per layout rather than exchanging registers: one warp-replicated copy feeds
    # the lse store (issued by warp 0 only), a row-per-warp copy feeds wa (sm_90 TTGIR for D = 128,
    # 4 warps: la loaded as slice<blocked> and as blocked2, lse stored from blocked2). So another
    # warp's load of a row's old lse can come after the store of its new one, and "load once" in the
    # source cannot prevent that: the layouts are the compiler's choice, and even one replicated copy
    # is read by several warps. A CTA barrier after the last load of every input and before the first
    # store is race-free whatever the layouts (bar.sync orders the loads before it for all threads of
    # the CTA), and cheapest placed here: the lse and row loads are all issued before it, so it adds
    # one barrier and no extra round trip to memory, and it also orders the in-place row store after
    # every warp's row loads without relying on the layout conversion's own barrier.
    tl.debug_barrier()
    dst = dst_ptr + (b * dst_sb + s * dst_ss + h * dst_sh)[:, None] + d[None, :]
    tl.store(dst, o.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_lse_ptr + b * dl_sb + s * dl_ss + h * dl_sh, lse, mask=rmask)


@triton.jit
def merge_ways_kernel(
    srcs,
    lses,
    dst_ptr,
    dst_lse_ptr,
    rows,
    S,
    H,
    in_sb,
    in_ss,
    in_sh,
    il_sb,
    il_ss,
    il_sh,
    dst_sb,
    dst_ss,
    dst_sh,
    dl_sb,
    dl_ss,
    dl_sh,
    W: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rmask, b, s, h = _row_coords(tl.program_id(0), rows, S, H, BLOCK_R)
    lse_off = b * il_sb + s * il_ss + h * il_sh
    # Max over W first; then the sum of the other terms goes through log1p, so the largest term's
    # exact 1 never absorbs a tiny remainder (the first maximal part is "the" max, as in merge_math.h).
    m = tl.load(lses[0] + lse_off, mask=rmask, other=float("-inf"))
    for i in tl.static_range(1, W):
        m = tl.maximum(m, tl.load(lses[i] + lse_off, mask=rmask, other=float("-inf")))
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)
    rest = tl.zeros([BLOCK_R], dtype=tl.float32)
    taken = rmask & (m != m)  # all False, shaped like the rows
    for i in tl.static_range(W):
        li = tl.load(lses[i] + lse_off, mask=rmask, other=float("-inf"))
        is_max = (li == m) & (taken == 0)
        taken = taken | is_max
        rest += tl.where(is_max, 0.0, tl.exp(li - m_safe))
    lse = tl.where(empty, float("-inf"), m + _log1p(rest))
    lse_safe = tl.where(empty, 0.0, lse)
    tl.store(dst_lse_ptr + b * dl_sb + s * dl_ss + h * dl_sh, lse, mask=rmask)

    d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(rmask, d, D, BLOCK_D)
    in_off = (b * in_sb + s * in_ss + h * in_sh)[:, None] + d[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(W):
        li = tl.load(lses[i] + lse_off, mask=rmask, other=float("-inf"))
        wi = tl.where(empty, 0.0, tl.exp(li - lse_safe))
        x = tl.load(srcs[i] + in_off, mask=mask, other=0.0)
        acc += x.to(tl.float32) * wi[:, None]
    dst = dst_ptr + (b * dst_sb + s * dst_ss + h * dst_sh)[:, None] + d[None, :]
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=mask)


# Largest W one launch merges (a tuple argument per part: compile time grows with W); larger W is
# folded in groups into fp32 partials, as the CUDA kernel does.
MAX_WAYS = 8


def _out_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(t: torch.Tensor) -> tuple[int, int, int]:
    # [B, H, S] in the (b, s, h) order the kernels use.
    return t.stride(0), t.stride(2), t.stride(1)


def merge_pair(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    block_out: torch.Tensor,
    block_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> None:
    """``(out, lse) <- merge((acc_out, acc_lse), (block_out, block_lse))``; out may be acc_out (in place).

    Arguments are validated by the caller (sp_kernels/ops/merge.py).
    """
    B, S, H, D = acc_out.shape
    rows = B * S * H
    if rows == 0 or D == 0:
        return
    block_d, block_r = _meta(D)
    grid = (triton.cdiv(rows, block_r),)
    merge_pair_kernel[grid](
        acc_out,
        acc_lse,
        block_out,
        block_lse,
        out,
        lse,
        rows,
        S,
        H,
        *_out_strides(acc_out),
        *_out_strides(block_out),
        *_out_strides(out),
        *_lse_strides(acc_lse),
        *_lse_strides(block_lse),
        *_lse_strides(lse),
        D=D,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )


def _common_layout(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if all(t.stride() == ts[0].stride() for t in ts):
        return list(ts)
    return [t.contiguous() for t in ts]


def _launch_ways(outs: list[torch.Tensor], lses: list[torch.Tensor], out: torch.Tensor, lse: torch.Tensor) -> None:
    B, S, H, D = out.shape
    rows = B * S * H
    block_d, block_r = _meta(D)
    grid = (triton.cdiv(rows, block_r),)
    merge_ways_kernel[grid](
        tuple(outs),
        tuple(lses),
        out,
        lse,
        rows,
        S,
        H,
        *_out_strides(outs[0]),
        *_lse_strides(lses[0]),
        *_out_strides(out),
        *_lse_strides(lse),
        W=len(outs),
        D=D,
        BLOCK_D=block_d,
        BLOCK_R=block_r,
    )


def merge_ways(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor
) -> None:
    """W-way merge of ``outs``/``lses`` into ``out`` (any value dtype) and ``lse``; validated by the caller."""
    B, S, H, D = out.shape
    if B * S * H == 0 or D == 0:
        return
    parts, part_lses = _common_layout(outs), _common_layout(lses)
    while len(parts) > MAX_WAYS:
        next_parts, next_lses = [], []
        for i in range(0, len(parts), MAX_WAYS):
            p = out.new_empty((B, S, H, D), dtype=torch.float32)
            pl = lse.new_empty((B, H, S))
            _launch_ways(parts[i : i + MAX_WAYS], part_lses[i : i + MAX_WAYS], p, pl)
            next_parts.append(p)
            next_lses.append(pl)
        parts, part_lses = next_parts, next_lses
    _launch_ways(parts, part_lses, out, lse)
