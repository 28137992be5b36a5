"""Ulysses pack/unpack: the all-to-all send/receive layouts of q/k/v and of the attention output,
each written in one pass (each output byte once; each input byte once, KV heads replicated for
GQA/MQA read once per destination that needs them).

Shapes (P = Ulysses group size, hq = ceil(Hq / P) query heads per rank, nkv KV heads per rank,
W = hq + 2 * nkv):

* ``pack_qkv(q, k, v, world_size, kv_index)``: q ``[B, S_loc, Hq, D]``, k/v ``[B, S_loc, Hkv, D]`` ->
  ONE send buffer ``[P, B, S_loc, W, D]``; chunk r holds rank r's query heads (zero padding heads
  past Hq) then its KV heads ``kv_index[r*nkv:(r+1)*nkv]`` of k, then of v.
* ``unpack_qkv(recv, seq_len, joint_q, joint_k, joint_v, joint_front)``: received
  ``[P, B, S_loc, W, D]`` -> ``[B, seq_len (+ J), W, D]``: the first ``seq_len`` rows of the
  rank-ordered concatenation (padding is at the end of the sequence, so the dropped rows are exactly
  the auto_pad rows), plus the J joint rows (``joint_q [B, J, hq, D]``, ``joint_k/v [B, J, nkv, D]``)
  before ("front") or after ("rear") them.
* ``pack_out(out_seq, out_joint, world_size, local_len, joint_front)``: ``[B, S, hq, D]`` (+ joint
  ``[B, J, hq, D]``) -> ``[P, B, J + local_len, hq, D]``; chunk r holds sequence rows
  ``[r*local_len, (r+1)*local_len)`` (zero past S) and every joint row, in strategy order.
* ``unpack_out(recv, heads)``: ``[P, B, rows, hq, D]`` -> ``[B, rows, heads, D]``, padding heads dropped.

Inputs of type ``[B, rows, heads, D]`` may have any batch/row strides (slices of a bigger buffer)
but need contiguous ``[heads, D]`` rows; ``recv`` buffers must be contiguous. Dtypes: float32,
float64, float16, bfloat16 (a pure copy: bits are moved, never converted).

Implementations: ``native`` (C++ CPU / CUDA kernels in csrc/, schema in csrc/ops.cpp), ``triton``
(sp_kernels/ops/triton/pack.py; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``torch``
(the reference below, a few strided copies). Each op is declared once in
this module (sp_kernels/ops/_registry.py). The native ops have fake impls for torch.compile and
autograd formulas (torch.library.register_autograd): the backward of each op is the reverse layout
change, through the other ops (pack_qkv <-> unpack_out-shaped, unpack_qkv <-> pack_out), padding
rows and heads getting zero gradient. Triton has no backward: a call that needs gradients takes the
native op when that is the choice, else the (differentiable) torch implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from ._checks import Converter, at_least, flag, int_list, integer, optional_tensor, same_device, tensor, typed
from ._registry import Autograd, Op, candidates, impl_for, register_native

Tensor = torch.Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_KV_INDEX = 256  # kMaxKvIndex in pack_index.h: the table travels as a CUDA kernel parameter


# ---- argument checks (messages as csrc/pack/pack_prepare.cpp's, in Python's spelling) -----------


def _check_dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"{op}: unsupported dtype {t.dtype} for {name} (supported: {names}); {name} has shape {tuple(t.shape)}")


def _check_bshd(op: str, name: str, t: Tensor) -> None:
    _check_dtype(op, name, t)
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be [batch, seq, heads, head_dim] (4 dims), got shape {tuple(t.shape)}")
    D = t.shape[3]
    if (t.shape[3] > 1 and t.stride(3) != 1) or (t.shape[2] > 1 and t.stride(2) != D):
        raise ValueError(
            f"{op}: {name} must have contiguous [heads, head_dim] rows (strides (*, *, {D}, 1)), got strides "
            f"{t.stride()} for shape {tuple(t.shape)}; call .contiguous() first"
        )


def _check_recv(op: str, t: Tensor) -> None:
    _check_dtype(op, "recv", t)
    if t.dim() != 5:
        raise ValueError(f"{op}: recv must have 5 dims [P, B, rows, heads, head_dim], got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: recv must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_like(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    same_device(op, name, t, ref, ref_name)
    if t.dtype != ref.dtype:
        raise ValueError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def _pack_qkv_check(q: Tensor, k: Tensor, v: Tensor, world_size: int, kv_index: list[int]) -> None:
    op = "pack_qkv"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_bshd(op, name, t)
    _check_like(op, "k", k, q, "q")
    _check_like(op, "v", v, q, "q")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"{op}: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch, seq and head_dim")
    if q.shape[2] < 1:
        raise ValueError(f"{op}: q must have at least one head, got shape {tuple(q.shape)}")
    P = world_size
    at_least(op, "world_size", P, 1)
    n = len(kv_index)
    if n < P or n % P:
        raise ValueError(f"{op}: kv_index must hold world_size * nkv >= {P} entries, got {n}")
    if n > MAX_KV_INDEX:
        raise ValueError(f"{op}: kv_index holds {n} entries, more than the supported {MAX_KV_INDEX}")
    for i, head in enumerate(kv_index):
        if not 0 <= head < k.shape[2]:
            raise ValueError(f"{op}: kv_index[{i}] = {head} is out of range for {k.shape[2]} key/value heads")


def _unpack_qkv_check(recv, seq_len, joint_q, joint_k, joint_v, joint_front) -> None:
    op = "unpack_qkv"
    _check_recv(op, recv)
    P, B, S_loc, W, D = recv.shape
    if not 0 <= seq_len <= P * S_loc:
        raise ValueError(f"{op}: seq_len must be in [0, P * S_loc] = [0, {P * S_loc}], got {seq_len}")
    if joint_q is None and joint_k is None and joint_v is None:
        return
    if joint_q is None or joint_k is None or joint_v is None:
        raise ValueError(f"{op}: joint_q, joint_k and joint_v must be given together")
    joints = {"joint_q": joint_q, "joint_k": joint_k, "joint_v": joint_v}
    for name, t in joints.items():
        _check_bshd(op, name, t)
    for name, t in joints.items():
        _check_like(op, name, t, recv, "recv")
    jq, jk, jv = joint_q, joint_k, joint_v
    if jk.shape != jv.shape:
        raise ValueError(f"{op}: joint_k {tuple(jk.shape)} and joint_v {tuple(jv.shape)} must have the same shape")
    if jq.shape[0] != B or jk.shape[0] != B or jq.shape[1] != jk.shape[1] or jq.shape[3] != D or jk.shape[3] != D:
        raise ValueError(
            f"{op}: joint_q {tuple(jq.shape)} and joint_k {tuple(jk.shape)} must be [B={B}, J, heads, D={D}] "
            "with the same J"
        )
    if jq.shape[2] + 2 * jk.shape[2] != W:
        raise ValueError(f"{op}: joint heads (q {jq.shape[2]} + 2 * kv {jk.shape[2]}) must equal recv's head slots {W}")


def _pack_out_check(out_seq, out_joint, world_size, local_len, joint_front) -> None:
    op = "pack_out"
    _check_bshd(op, "out_seq", out_seq)
    P, L = world_size, local_len
    at_least(op, "world_size", P, 1)
    at_least(op, "local_len", L, 0)
    if out_seq.shape[1] > P * L:
        raise ValueError(
            f"{op}: out_seq has {out_seq.shape[1]} rows, more than world_size * local_len = {P * L}"
        )
    if out_joint is not None:
        j = out_joint
        _check_bshd(op, "out_joint", j)
        _check_like(op, "out_joint", j, out_seq, "out_seq")
        if (j.shape[0], j.shape[2], j.shape[3]) != (out_seq.shape[0], out_seq.shape[2], out_seq.shape[3]):
            raise ValueError(
                f"{op}: out_joint {tuple(j.shape)} must match out_seq {tuple(out_seq.shape)} in batch, heads and head_dim"
            )


def _unpack_out_check(recv: Tensor, heads: int) -> None:
    op = "unpack_out"
    _check_recv(op, recv)
    P, hq = recv.shape[0], recv.shape[3]
    at_least(op, "heads", heads, 1)
    if -(-heads // P) != hq:
        raise ValueError(f"{op}: heads must satisfy ceil(heads / P) == hq (P = {P}, hq = {hq}), got heads = {heads}")


# ---- torch implementation (the reference; also the differentiable path) -----------------------


def pack_qkv_torch(q: Tensor, k: Tensor, v: Tensor, world_size: int, kv_index: list[int]) -> Tensor:
    B, S, Hq, D = q.shape
    P = world_size
    hq, nkv = -(-Hq // P), len(kv_index) // P
    send = q.new_empty((P, B, S, hq + 2 * nkv, D))
    if Hq == P * hq:
        send[..., :hq, :].copy_(q.view(B, S, P, hq, D).permute(2, 0, 1, 3, 4))
    else:
        for r in range(P):
            lo, hi = min(Hq, r * hq), min(Hq, (r + 1) * hq)
            send[r, :, :, : hi - lo].copy_(q[:, :, lo:hi])
            send[r, :, :, hi - lo : hq].zero_()
    identity = kv_index == list(range(k.shape[2]))
    for slot, src in ((hq, k), (hq + nkv, v)):
        picked = src if identity else src[:, :, kv_index]
        send[..., slot : slot + nkv, :].copy_(picked.view(B, S, P, nkv, D).permute(2, 0, 1, 3, 4))
    return send


def unpack_qkv_torch(
    recv: Tensor,
    seq_len: int,
    joint_q: Tensor | None,
    joint_k: Tensor | None,
    joint_v: Tensor | None,
    joint_front: bool,
) -> Tensor:
    P, B, S_loc, W, D = recv.shape
    J = 0 if joint_q is None else joint_q.shape[1]
    out = recv.new_empty((B, seq_len + J, W, D))
    seq0, j0 = (J, 0) if joint_front else (0, seq_len)
    seq = recv.transpose(0, 1).reshape(B, P * S_loc, W, D)[:, :seq_len]
    out[:, seq0 : seq0 + seq_len].copy_(seq)
    if J:
        hq, nkv = joint_q.shape[2], joint_k.shape[2]
        out[:, j0 : j0 + J, :hq].copy_(joint_q)
        out[:, j0 : j0 + J, hq : hq + nkv].copy_(joint_k)
        out[:, j0 : j0 + J, hq + nkv :].copy_(joint_v)
    return out


def pack_out_torch(
    out_seq: Tensor, out_joint: Tensor | None, world_size: int, local_len: int, joint_front: bool
) -> Tensor:
    B, S, hq, D = out_seq.shape
    P, L = world_size, local_len
    J = 0 if out_joint is None else out_joint.shape[1]
    send = out_seq.new_empty((P, B, J + L, hq, D))
    seq0, j0 = (J, 0) if joint_front else (0, L)
    if S == P * L:
        send[:, :, seq0 : seq0 + L].copy_(out_seq.view(B, P, L, hq, D).transpose(0, 1))
    else:
        for r in range(P):
            n = max(0, min(L, S - r * L))
            send[r, :, seq0 : seq0 + n].copy_(out_seq[:, r * L : r * L + n])
            send[r, :, seq0 + n : seq0 + L].zero_()
    if J:
        send[:, :, j0 : j0 + J].copy_(out_joint.unsqueeze(0).expand(P, *out_joint.shape))
    return send


def unpack_out_torch(recv: Tensor, heads: int) -> Tensor:
    P, B, R, hq, D = recv.shape
    out = recv.new_empty((B, R, heads, D))
    if heads == P * hq:
        out.view(B, R, P, hq, D).copy_(recv.permute(1, 2, 0, 3, 4))
        return out
    for r in range(P):
        lo, hi = min(heads, r * hq), min(heads, (r + 1) * hq)
        if hi > lo:
            out[:, :, lo:hi].copy_(recv[r, :, :, : hi - lo])
    return out


# ---- Triton glue and fake impls -----------------------------------------------------------------


def _triton():
    from .triton import pack as triton_pack

    return triton_pack


@functools.lru_cache(maxsize=64)
def _kv_index_tensor(index: tuple[int, ...], device: torch.device) -> Tensor:
    # The triton kernel reads the KV table from device memory: built once per (table, device).
    return torch.tensor(index, dtype=torch.int32, device=device)


def _pack_qkv_triton(q: Tensor, k: Tensor, v: Tensor, world_size: int, kv_index: list[int]) -> Tensor:
    return _triton().pack_qkv(q, k, v, world_size, _kv_index_tensor(tuple(kv_index), q.device))


def _pack_qkv_fake(q: Tensor, k: Tensor, v: Tensor, world_size: int, kv_index: list[int]) -> Tensor:
    B, S, Hq, D = q.shape
    hq = (Hq + world_size - 1) // world_size
    return q.new_empty((world_size, B, S, hq + 2 * (len(kv_index) // world_size), D))


def _unpack_qkv_fake(recv, seq_len, joint_q, joint_k, joint_v, joint_front) -> Tensor:
    P, B, S_loc, W, D = recv.shape
    J = 0 if joint_q is None else joint_q.shape[1]
    return recv.new_empty((B, seq_len + J, W, D))


def _pack_out_fake(out_seq, out_joint, world_size, local_len, joint_front) -> Tensor:
    B, S, hq, D = out_seq.shape
    J = 0 if out_joint is None else out_joint.shape[1]
    return out_seq.new_empty((world_size, B, J + local_len, hq, D))


def _unpack_out_fake(recv, heads) -> Tensor:
    P, B, R, hq, D = recv.shape
    return recv.new_empty((B, R, heads, D))


# ---- autograd: each op's backward is the reverse layout change (padding rows/heads get zero grad) ----
#
# The backward of a pack is the matching unpack-shaped gather and vice versa, through the public faces
# where one fits (so the native kernels run there too, and a double backward differentiates them again).


def _rows_of(t: Tensor) -> Tensor:
    D = t.shape[-1]
    if (t.shape[-1] <= 1 or t.stride(-1) == 1) and (t.shape[-2] <= 1 or t.stride(-2) == D):
        return t
    return t.contiguous()


def _pack_qkv_setup(ctx, inputs, output) -> None:
    q, k, v, world_size, kv_index = inputs
    ctx.heads, ctx.kv_heads, ctx.P, ctx.kv_index = q.shape[2], k.shape[2], world_size, list(kv_index)


def _pack_qkv_backward(ctx, grad: Tensor):
    P, Hq, Hkv, index = ctx.P, ctx.heads, ctx.kv_heads, ctx.kv_index
    _, B, S, W, D = grad.shape
    hq, nkv = -(-Hq // P), len(index) // P
    dq = unpack_out(grad[..., :hq, :].contiguous(), Hq)  # padding heads dropped: they get no gradient

    def kv_grad(slot: int) -> Tensor:
        g = grad[..., slot : slot + nkv, :].permute(1, 2, 0, 3, 4).reshape(B, S, P * nkv, D)
        if index == list(range(Hkv)):
            return g.contiguous()
        # A KV head replicated into several chunks (MQA / narrow GQA) sums the gradients of its copies.
        idx = torch.tensor(index, dtype=torch.long, device=grad.device)
        return grad.new_zeros((B, S, Hkv, D)).index_add_(2, idx, g)

    return dq, kv_grad(hq), kv_grad(hq + nkv), None, None


def _unpack_qkv_setup(ctx, inputs, output) -> None:
    recv, seq_len, joint_q, joint_k, joint_v, joint_front = inputs
    ctx.P, ctx.S_loc = recv.shape[0], recv.shape[2]
    ctx.seq_len, ctx.front = seq_len, joint_front
    ctx.J = 0 if joint_q is None else joint_q.shape[1]
    ctx.hq = 0 if joint_q is None else joint_q.shape[2]
    ctx.nkv = 0 if joint_k is None else joint_k.shape[2]


def _unpack_qkv_backward(ctx, grad: Tensor):
    S, J = ctx.seq_len, ctx.J
    seq0, j0 = (J, 0) if ctx.front else (0, S)
    # The received chunks' gradient is the send layout of the sequence rows' gradient: pack_out's
    # layout (zero rows where a rank held padding).
    drecv = pack_out(_rows_of(grad[:, seq0 : seq0 + S]), None, ctx.P, ctx.S_loc, True)
    if not J:
        return drecv, None, None, None, None, None
    hq, nkv = ctx.hq, ctx.nkv
    gj = grad[:, j0 : j0 + J]
    return drecv, None, gj[:, :, :hq], gj[:, :, hq : hq + nkv], gj[:, :, hq + nkv :], None


def _pack_out_setup(ctx, inputs, output) -> None:
    out_seq, out_joint, world_size, local_len, joint_front = inputs
    ctx.S, ctx.L, ctx.front = out_seq.shape[1], local_len, joint_front
    ctx.J = 0 if out_joint is None else out_joint.shape[1]


def _pack_out_backward(ctx, grad: Tensor):
    S, L, J = ctx.S, ctx.L, ctx.J
    seq0, j0 = (J, 0) if ctx.front else (0, L)
    # Rows past S were zero padding: unpack_qkv keeps the first S rows of the rank-ordered chunks.
    d_seq = unpack_qkv(grad[:, :, seq0 : seq0 + L].contiguous(), S)
    # Every chunk carried a copy of the joint rows: their gradients add up.
    d_joint = grad[:, :, j0 : j0 + J].sum(0) if J else None
    return d_seq, d_joint, None, None, None


def _unpack_out_setup(ctx, inputs, output) -> None:
    recv, heads = inputs
    ctx.P, ctx.hq, ctx.heads = recv.shape[0], recv.shape[3], heads


def _unpack_out_backward(ctx, grad: Tensor):
    P, hq, H = ctx.P, ctx.hq, ctx.heads
    B, R, _, D = grad.shape
    if H == P * hq:
        return grad.reshape(B, R, P, hq, D).permute(2, 0, 1, 3, 4).contiguous(), None
    full = grad.new_zeros((B, R, P * hq, D))  # padding heads: zero gradient
    full[:, :, :H].copy_(grad)
    return full.view(B, R, P, hq, D).permute(2, 0, 1, 3, 4).contiguous(), None


# ---- the ops and their public faces -----------------------------------------------------------


def _declare(name: str, reference, check, fake, triton=None, autograd=None, **arg_types: Converter) -> Op:
    # Every pack op differentiates through its autograd formula when native, else takes the
    # differentiable torch path (Triton has no backward); by default the Triton launcher of its own name.
    if triton is None:
        triton = lambda *args: getattr(_triton(), name)(*args)  # noqa: E731 -- triton imported on first use
    return Op(
        name,
        types=typed(name, **arg_types),
        check=check,
        reference=reference,
        triton=triton,
        fake=fake,
        autograd=autograd,
        grad_takes_torch=True,
    )


PACK_QKV = _declare(
    "pack_qkv", pack_qkv_torch, _pack_qkv_check, _pack_qkv_fake, _pack_qkv_triton,
    autograd=Autograd(_pack_qkv_backward, _pack_qkv_setup),
    q=tensor, k=tensor, v=tensor, world_size=integer, kv_index=int_list,
)  # fmt: skip
UNPACK_QKV = _declare(
    "unpack_qkv", unpack_qkv_torch, _unpack_qkv_check, _unpack_qkv_fake,
    autograd=Autograd(_unpack_qkv_backward, _unpack_qkv_setup),
    recv=tensor, seq_len=integer, joint_q=optional_tensor, joint_k=optional_tensor, joint_v=optional_tensor,
    joint_front=flag,
)  # fmt: skip
PACK_OUT = _declare(
    "pack_out", pack_out_torch, _pack_out_check, _pack_out_fake,
    autograd=Autograd(_pack_out_backward, _pack_out_setup),
    out_seq=tensor, out_joint=optional_tensor, world_size=integer, local_len=integer, joint_front=flag,
)  # fmt: skip
UNPACK_OUT = _declare(
    "unpack_out", unpack_out_torch, _unpack_out_check, _unpack_out_fake,
    autograd=Autograd(_unpack_out_backward, _unpack_out_setup), recv=tensor, heads=integer,
)  # fmt: skip
OPS = ("pack_qkv", "unpack_qkv", "pack_out", "unpack_out")

# Benchmarks ask these of one op by name (benchmarks/bench_pack.py).
_candidates = candidates
_impl_for = impl_for


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, world_size: int, kv_index: Iterable[int]) -> Tensor:
    """q ``[B, S_loc, Hq, D]``, k/v ``[B, S_loc, Hkv, D]`` -> send ``[P, B, S_loc, hq + 2*nkv, D]``.

    ``kv_index``: the ``P * nkv`` global KV heads in chunk order (``HeadAssignment.kv_index``, or
    ``range(Hkv)`` when each rank takes ``Hkv / P`` consecutive heads).
    """
    return PACK_QKV(q, k, v, world_size, kv_index)


def unpack_qkv(
    recv: Tensor,
    seq_len: int,
    joint_q: Tensor | None = None,
    joint_k: Tensor | None = None,
    joint_v: Tensor | None = None,
    joint_front: bool = True,
) -> Tensor:
    """Received ``[P, B, S_loc, W, D]`` -> ``[B, seq_len (+ J), W, D]``, padding rows dropped,
    joint rows (if given) before ("front") or after the sequence rows."""
    return UNPACK_QKV(recv, seq_len, joint_q, joint_k, joint_v, joint_front)


def pack_out(
    out_seq: Tensor, out_joint: Tensor | None, world_size: int, local_len: int, joint_front: bool = True
) -> Tensor:
    """Attention output ``[B, S, hq, D]`` (+ joint ``[B, J, hq, D]``) -> send ``[P, B, J + local_len, hq, D]``,
    zero rows where a rank holds padding."""
    return PACK_OUT(out_seq, out_joint, world_size, local_len, joint_front)


def unpack_out(recv: Tensor, heads: int) -> Tensor:
    """Received ``[P, B, rows, hq, D]`` -> ``[B, rows, heads, D]`` (padding heads dropped)."""
    return UNPACK_OUT(recv, heads)


NATIVE_OPS_REGISTERED = register_native(PACK_QKV, UNPACK_QKV, PACK_OUT, UNPACK_OUT)
