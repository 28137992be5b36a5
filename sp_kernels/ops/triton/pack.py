"""Triton kernels of the Ulysses pack/unpack ops (same semantics as the native ops; see
csrc/pack/pack_index.h for the layouts).

Every kernel is a pure copy, so tensors are reinterpreted as same-width integers (bf16/fp16 ->
int16, fp32 -> int32, fp64 -> int64): one kernel per element width, no float arithmetic, and no
bf16 under the interpreter. Each program copies ``BLOCK_R`` rows of ONE head slot: the source of a
head row is then a scalar decision per program (which tensor, which head), and every row of the tile
is ``D`` contiguous elements at an offset divisible by ``D`` in units of 16-element-aligned strides,
which lets Triton emit 16-byte global loads and stores (``ld.global.v4.b32``/``st.global.v4.b32``).
Offsets are formed in int64 (no division in 64 bits: divisions stay on int32 row indices).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _meta(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_R): the head row padded to a power of two, and rows per program (about 4k elements)."""
    block_d = triton.next_power_of_2(d)
    return block_d, max(1, 4096 // block_d)


@triton.jit
def _row_mask(rmask, d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    # With BLOCK_D == D the column mask is dropped so the mask is constant along a row: the
    # condition for vectorised (16-byte) accesses.
    if BLOCK_D == D:
        return rmask[:, None] & (d[None, :] >= 0)
    return rmask[:, None] & (d[None, :] < D)


@triton.jit
def pack_qkv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    kv_ptr,
    out_ptr,
    BS,
    S,
    Hq,
    hq,
    nkv,
    W,
    q_sb,
    q_ss,
    k_sb,
    k_ss,
    v_sb,
    v_ss,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out [P, B, S, W, D] <- q/k/v; grid (cdiv(B*S, BLOCK_R), W, P)."""
    h = tl.program_id(1)
    p = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < BS
    mask = _row_mask(rmask, d, D, BLOCK_D)
    b = (rows // S).to(tl.int64)
    s = (rows % S).to(tl.int64)
    if h < hq:
        head = (p * hq + h).to(tl.int64)
        src = q_ptr + (b * q_sb + s * q_ss + head * D)[:, None] + d[None, :]
        x = tl.load(src, mask=mask & (head < Hq), other=0)  # heads past Hq: zero padding
    elif h < hq + nkv:
        head = tl.load(kv_ptr + p * nkv + (h - hq)).to(tl.int64)
        src = k_ptr + (b * k_sb + s * k_ss + head * D)[:, None] + d[None, :]
        x = tl.load(src, mask=mask, other=0)
    else:
        head = tl.load(kv_ptr + p * nkv + (h - hq - nkv)).to(tl.int64)
        src = v_ptr + (b * v_sb + s * v_ss + head * D)[:, None] + d[None, :]
        x = tl.load(src, mask=mask, other=0)
    dst = out_ptr + ((p * BS + rows).to(tl.int64) * W + h)[:, None] * D + d[None, :]
    tl.store(dst, x, mask=mask)


@triton.jit
def unpack_qkv_kernel(
    recv_ptr,
    jq_ptr,
    jk_ptr,
    jv_ptr,
    out_ptr,
    B,
    S_loc,
    rows_out,
    J,
    seq0,
    j0,
    W,
    hq,
    nkv,
    jq_sb,
    jq_ss,
    jk_sb,
    jk_ss,
    jv_sb,
    jv_ss,
    n_rows,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out [B, rows_out, W, D] <- recv [P, B, S_loc, W, D] (+ joint rows); grid (cdiv(B*rows_out, BLOCK_R), W)."""
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = _row_mask(r < n_rows, d, D, BLOCK_D)
    b = r // rows_out
    t = r % rows_out
    is_joint = (t >= j0) & (t < j0 + J)
    i = t - seq0  # row of the exact sequence (padding rows never addressed: i < S)
    p = i // S_loc
    s = i % S_loc
    seq_off = ((p * B + b).to(tl.int64) * S_loc + s) * W * D + h * D
    x = tl.load(recv_ptr + seq_off[:, None] + d[None, :], mask=mask & ~is_joint[:, None], other=0)
    if J > 0:
        j = (t - j0).to(tl.int64)
        b64 = b.to(tl.int64)
        jmask = mask & is_joint[:, None]
        if h < hq:
            src = jq_ptr + (b64 * jq_sb + j * jq_ss + h * D)[:, None] + d[None, :]
        elif h < hq + nkv:
            src = jk_ptr + (b64 * jk_sb + j * jk_ss + (h - hq) * D)[:, None] + d[None, :]
        else:
            src = jv_ptr + (b64 * jv_sb + j * jv_ss + (h - hq - nkv) * D)[:, None] + d[None, :]
        x = tl.where(is_joint[:, None], tl.load(src, mask=jmask, other=0), x)
    dst = out_ptr + (r.to(tl.int64) * W + h)[:, None] * D + d[None, :]
    tl.store(dst, x, mask=mask)


@triton.jit
def pack_out_kernel(
    seq_ptr,
    joint_ptr,
    out_ptr,
    B,
    L,
    S,
    J,
    seq0,
    j0,
    rows_out,
    hq,
    o_sb,
    o_ss,
    j_sb,
    j_ss,
    n_rows,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out [P, B, J + L, hq, D] <- out_seq [B, S, hq, D] (+ joint); grid (cdiv(P*B*(J+L), BLOCK_R), hq)."""
    h = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = _row_mask(r < n_rows, d, D, BLOCK_D)
    pb = r // rows_out
    t = r % rows_out
    p = pb // B
    b = (pb % B).to(tl.int64)
    is_joint = (t >= j0) & (t < j0 + J)
    i = p * L + (t - seq0)  # row of the exact global sequence; >= S: padding of rank p -> zero
    valid = ~is_joint & (i < S)
    src = seq_ptr + (b * o_sb + i.to(tl.int64) * o_ss + h * D)[:, None] + d[None, :]
    x = tl.load(src, mask=mask & valid[:, None], other=0)
    if J > 0:
        jsrc = joint_ptr + (b * j_sb + (t - j0).to(tl.int64) * j_ss + h * D)[:, None] + d[None, :]
        x = tl.where(is_joint[:, None], tl.load(jsrc, mask=mask & is_joint[:, None], other=0), x)
    dst = out_ptr + (r.to(tl.int64) * hq + h)[:, None] * D + d[None, :]
    tl.store(dst, x, mask=mask)


@triton.jit
def unpack_out_kernel(
    recv_ptr,
    out_ptr,
    B,
    R,
    hq,
    Hq,
    n_rows,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out [B, R, Hq, D] <- recv [P, B, R, hq, D]; grid (cdiv(B*R, BLOCK_R), Hq)."""
    h = tl.program_id(1)
    p = h // hq
    hl = h % hq
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = _row_mask(r < n_rows, d, D, BLOCK_D)
    b = r // R
    t = r % R
    src = recv_ptr + ((((p * B + b).to(tl.int64) * R + t) * hq + hl) * D)[:, None] + d[None, :]
    x = tl.load(src, mask=mask, other=0)
    dst = out_ptr + (r.to(tl.int64) * Hq + h)[:, None] * D + d[None, :]
    tl.store(dst, x, mask=mask)


# ---- launchers (arguments already validated by sp_kernels.ops.pack) ---------------------------


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world_size: int, kv_index: torch.Tensor) -> torch.Tensor:
    """``kv_index``: int32 tensor of P * nkv global KV heads on q's device."""
    B, S, Hq, D = q.shape
    P = world_size
    hq = -(-Hq // P)
    nkv = kv_index.numel() // P
    W = hq + 2 * nkv
    out = torch.empty((P, B, S, W, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d, block_r = _meta(D)
    grid = (triton.cdiv(B * S, block_r), W, P)
    pack_qkv_kernel[grid](
        _bits(q), _bits(k), _bits(v), kv_index, _bits(out),
        B * S, S, Hq, hq, nkv, W,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        D=D, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def unpack_qkv(
    recv: torch.Tensor,
    seq_len: int,
    joint_q: torch.Tensor | None,
    joint_k: torch.Tensor | None,
    joint_v: torch.Tensor | None,
    joint_front: bool,
) -> torch.Tensor:
    P, B, S_loc, W, D = recv.shape
    J = 0 if joint_q is None else joint_q.shape[1]
    hq = W if joint_q is None else joint_q.shape[2]
    nkv = 0 if joint_k is None else joint_k.shape[2]
    rows_out = seq_len + J
    out = torch.empty((B, rows_out, W, D), dtype=recv.dtype, device=recv.device)
    if out.numel() == 0:
        return out
    seq0, j0 = (J, 0) if joint_front else (0, seq_len)
    jq, jk, jv = (recv, recv, recv) if joint_q is None else (joint_q, joint_k, joint_v)
    block_d, block_r = _meta(D)
    grid = (triton.cdiv(B * rows_out, block_r), W)
    unpack_qkv_kernel[grid](
        _bits(recv), _bits(jq), _bits(jk), _bits(jv), _bits(out),
        B, max(S_loc, 1), rows_out, J, seq0, j0, W, hq, nkv,
        jq.stride(0), jq.stride(1), jk.stride(0), jk.stride(1), jv.stride(0), jv.stride(1),
        B * rows_out,
        D=D, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def pack_out(
    out_seq: torch.Tensor, out_joint: torch.Tensor | None, world_size: int, local_len: int, joint_front: bool
) -> torch.Tensor:
    B, S, hq, D = out_seq.shape
    P, L = world_size, local_len
    J = 0 if out_joint is None else out_joint.shape[1]
    rows_out = J + L
    out = torch.empty((P, B, rows_out, hq, D), dtype=out_seq.dtype, device=out_seq.device)
    if out.numel() == 0:
        return out
    seq0, j0 = (J, 0) if joint_front else (0, L)
    joint = out_seq if out_joint is None else out_joint
    block_d, block_r = _meta(D)
    n_rows = P * B * rows_out
    grid = (triton.cdiv(n_rows, block_r), hq)
    pack_out_kernel[grid](
        _bits(out_seq), _bits(joint), _bits(out),
        B, L, S, J, seq0, j0, rows_out, hq,
        out_seq.stride(0), out_seq.stride(1), joint.stride(0), joint.stride(1),
        n_rows,
        D=D, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


def unpack_out(recv: torch.Tensor, heads: int) -> torch.Tensor:
    P, B, R, hq, D = recv.shape
    out = torch.empty((B, R, heads, D), dtype=recv.dtype, device=recv.device)
    if out.numel() == 0:
        return out
    block_d, block_r = _meta(D)
    grid = (triton.cdiv(B * R, block_r), heads)
    unpack_out_kernel[grid](
        _bits(recv), _bits(out), B, R, hq, heads, B * R,
        D=D, BLOCK_D=block_d, BLOCK_R=block_r,
    )  # fmt: skip
    return out


KERNELS = {
    "pack_qkv": pack_qkv_kernel,
    "unpack_qkv": unpack_qkv_kernel,
    "pack_out": pack_out_kernel,
    "unpack_out": unpack_out_kernel,
}
