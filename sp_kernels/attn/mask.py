"""Attention masks: validate and normalize them, put them in the full frame, slice them per block.

Semantics are those of ``torch.nn.functional.scaled_dot_product_attention``: ``attn_mask`` is bool
(True = attend) or additive float, broadcastable to ``[B, Hq, Q, K]``; ``key_padding_mask`` is bool
``[B, K]`` (True = attend), i.e. ``attn_mask[:, None, None, :]``. Both may be given (they combine).
One difference: a query row that attends to no key at all gets zeros (SDPA gives NaN).

Internally every mask becomes one additive bias ``[Bm, Hm, Qm, K]`` (``Bm`` 1 or B, ``Hm`` 1 or Hq,
``Qm`` 1 or Q; -inf = excluded) in the accumulation dtype (fp32, fp64 for fp64 inputs).

Frames (the key axis; the query axis, when the mask has one, follows the same rule):

* **full frame**: the full key sequence of the call, joint tokens included, in strategy order over
  the *global* (unsharded, unpadded) sequence: ``[joint | S]`` for "front", ``[S | joint]`` for "rear".
  Every rank passes the same mask (checked through the agreement exchange by a checksum).
* **local frame**: this rank's keys only, ``[joint | local rows]`` (``[local rows | joint]`` for
  "rear"), local rows including any auto_pad rows; what a diffusers processor builds from its shard.
  It is all-gathered into the full frame (one all-gather of the mask over the SP group).

Which frame a mask is in is decided after the agreement exchange, on every rank alike. Per block
(the Ulysses head-sharded full sequence, the joint block, each ring block) the slice of the full
mask is classified: nothing excluded (the maskless kernels), an end cut per sample (per-sample key
lengths: the maskless kernels on each sample's valid prefix), or general (a masked kernel).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NEG_INF = float("-inf")


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_mask(
    attn_mask: object,
    key_padding_mask: object,
    *,
    batch: int,
    heads: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """The additive bias ``[Bm, Hm, Qm, K]`` of the masks given (None when none is given).

    Checks dtype, rank, batch, heads and device here; the query and key lengths are checked where the
    frame is known (``check_local_frame`` / ``full_frame``). Raises TypeError / ValueError naming the argument.
    """
    bias = None
    if attn_mask is not None:
        bias = _attn_mask_bias(attn_mask, batch=batch, heads=heads, dtype=dtype, device=device)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if not isinstance(kpm, torch.Tensor):
            raise TypeError(f"attention: key_padding_mask must be a bool torch.Tensor [B, K], got {type(kpm).__name__}")
        if kpm.dtype != torch.bool:
            raise TypeError(
                f"attention: key_padding_mask must be bool [B, K] (True = attend), got dtype {kpm.dtype} with shape "
                f"{_shape(kpm)}; for an additive mask use attn_mask"
            )
        if kpm.dim() != 2 or kpm.shape[0] != batch:
            raise ValueError(
                f"attention: key_padding_mask has shape {_shape(kpm)}; expected [batch, keys] = [{batch}, K]"
            )
        if kpm.device != device:
            raise ValueError(f"attention: key_padding_mask is on {kpm.device}; expected {device} like query")
        kbias = torch.zeros(kpm.shape, dtype=acc_dtype(dtype), device=device).masked_fill_(~kpm, NEG_INF)
        kbias = kbias[:, None, None, :]
        if bias is not None and bias.shape[-1] != kbias.shape[-1]:
            raise ValueError(
                f"attention: key_padding_mask has {kbias.shape[-1]} keys but attn_mask has {bias.shape[-1]} "
                f"(shapes {_shape(kpm)} and {_shape(attn_mask)}); expected the same key length"  # type: ignore[arg-type]
            )
        bias = kbias if bias is None else bias + kbias
    return bias


def _attn_mask_bias(mask: object, *, batch: int, heads: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention: attn_mask must be a torch.Tensor (bool or additive float), got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
        raise TypeError(
            f"attention: attn_mask has dtype {mask.dtype} (shape {_shape(mask)}); expected bool (True = attend) or an "
            "additive float mask (0 = attend, -inf = excluded); convert an integer 0/1 mask with .bool()"
        )
    if mask.device != device:
        raise ValueError(f"attention: attn_mask is on {mask.device}; expected {device} like query")
    if not 2 <= mask.dim() <= 4:
        raise ValueError(
            f"attention: attn_mask has shape {_shape(mask)}; expected 2 to 4 dims broadcastable to "
            "[batch, heads, queries, keys] ([B, K] is key_padding_mask)"
        )
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[0] not in (1, batch):
        raise ValueError(f"attention: attn_mask has shape {_shape(mask)}: its batch dim must be 1 or {batch}")
    if m.shape[1] not in (1, heads):
        raise ValueError(f"attention: attn_mask has shape {_shape(mask)}: its head dim must be 1 or {heads}")
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=acc_dtype(dtype), device=device).masked_fill_(~m, NEG_INF)
    if bool(torch.isnan(m).any()) or bool((m == float("inf")).any()):
        raise ValueError(
            f"attention: attn_mask (float, shape {_shape(mask)}) holds NaN or +inf; an additive mask holds finite "
            "values and -inf (excluded)"
        )
    ones = m == 1
    if bool(ones.any()) and bool((ones | (m == 0)).all()):
        raise ValueError(
            f"attention: attn_mask (float, shape {_shape(mask)}) holds only 0 and 1, which looks like a keep-mask; "
            "a float mask is additive (0 = attend, -inf = excluded): pass mask.bool() for a keep-mask"
        )
    return m.to(acc_dtype(dtype))


def checksum(bias: Tensor) -> int:
    """A cheap content hash of a bias (int64 bits of a float64), equal on ranks holding equal masks.

    A weighted sum with a pseudo-random weight per position (Knuth's multiplicative hash of the index),
    so that masks differing by a moved hole or a shifted cut do not collide."""
    flat = bias.detach().reshape(-1).to(torch.float64)
    dead = torch.isneginf(flat)
    vals = torch.where(dead, torch.full_like(flat, -7.25), flat)
    idx = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
    w = ((idx * 2654435761) % 4294967296).to(torch.float64) / 4294967296.0 + 0.5
    h = float((vals * w).sum()) + 0.5 * float((dead.to(torch.float64) * w.sqrt()).sum()) + 1e-3 * flat.numel()
    return struct.unpack("<q", struct.pack("<d", h))[0]


def describe(bias: Tensor | None) -> list[int]:
    """(present, Bm, Hm, Qm, K) for the agreement exchange."""
    if bias is None:
        return [0, 0, 0, 0, 0]
    return [1, *bias.shape]


@dataclass(frozen=True)
class BlockMask:
    """The mask of one (query block, key block): per-sample key lengths (an end cut) or a bias."""

    lengths: list[int] | None = None  # one per sample (or one for all when the mask has batch 1)
    bias: Tensor | None = None  # [Bm, Hm, Qm, Kb] additive


@dataclass(frozen=True)
class FullMask:
    """A bias in the full frame of a call: rows/cols ``[joint | seq]`` ("front") or ``[seq | joint]``.
    Block classifications are kept (``blocks``): models hand every layer the same mask."""

    bias: Tensor  # [Bm, Hm, Qm, J + S]
    joint: int
    front: bool
    seq: int
    blocks: dict = field(default_factory=dict, compare=False, repr=False)

    def joint_span(self) -> tuple[int, int]:
        return (0, self.joint) if self.front else (self.seq, self.seq + self.joint)

    def seq_span(self, start: int, n: int) -> tuple[int, int]:
        off = self.joint if self.front else 0
        return off + start, off + start + n

    def block(self, rows: tuple[int, int] | None, cols: tuple[int, int]) -> BlockMask | None:
        """The mask of query rows ``rows`` (None: all) over key columns ``cols``; None when it excludes nothing."""
        key = (rows if self.bias.shape[2] > 1 else None, cols)
        if key not in self.blocks:
            b = self.bias[..., cols[0] : cols[1]]
            if b.shape[2] > 1 and rows is not None:
                b = b[:, :, rows[0] : rows[1]]
            self.blocks[key] = classify(b)
        return self.blocks[key]


def classify(b: Tensor) -> BlockMask | None:
    """None (excludes nothing), per-sample lengths (an end cut of every sample's keys), or the bias."""
    if b.shape[-1] == 0 or b.shape[2] == 0:
        return None
    attend = b == 0
    if bool(attend.all()):
        return None
    if b.shape[1] == 1 and b.shape[2] == 1 and bool((attend | torch.isneginf(b)).all()):
        a = attend[:, 0, 0, :]
        n = a.sum(dim=1)
        prefix = torch.arange(a.shape[1], device=a.device)[None, :] < n[:, None]
        if bool((prefix == a).all()):
            return BlockMask(lengths=[int(x) for x in n.tolist()])
    return BlockMask(bias=b)


def dead_rows(bias: Tensor) -> Tensor:
    """``[Bm, Hm, Qm]``: rows of a bias that exclude every key."""
    return torch.isneginf(bias).all(dim=-1)


def attend_block(
    q: Tensor, k: Tensor, v: Tensor, scale: float, mask: BlockMask | None, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """``block_attention`` of one block under its ``BlockMask``: no mask -> the maskless kernels; per-sample
    lengths -> the maskless kernels on each sample's valid key prefix (one call when the lengths agree);
    a bias -> a kernel that takes masks."""
    from .local import block_attention

    if mask is None:
        return block_attention(q, k, v, softmax_scale=scale, causal=causal)
    if mask.bias is not None:
        return block_attention(q, k, v, softmax_scale=scale, bias=mask.bias)
    lengths = mask.lengths
    assert lengths is not None
    if len(set(lengths)) == 1:
        n = lengths[0]
        return block_attention(q, k[:, :n], v[:, :n], softmax_scale=scale)
    parts = [block_attention(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], softmax_scale=scale)
             for b, n in enumerate(lengths)]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def full_frame(
    bias: Tensor,
    rows: list[tuple[int, ...]],
    *,
    joint: int,
    front: bool,
    gather: object,
) -> FullMask | None:
    """This rank's bias in the full frame of the call, decided from every rank's exchanged fields.

    ``rows``: per rank ``(local rows, valid rows, present, Bm, Hm, Qm, K, checksum)`` from the agreement
    exchange; ``gather(t, dim, valid)`` all-gathers a local-frame part along ``dim`` (every rank calls it
    alike: the decision below is taken on exchanged data only). Returns None when the mask excludes nothing.
    Raises ValueError on every rank when the masks are of different shapes or frames.
    """
    local = [r[0] for r in rows]
    valid = [r[1] for r in rows]
    fields = [r[2:8] for r in rows]
    S = sum(valid)
    shapes = [list(f[1:5]) for f in fields]
    per = ", ".join(f"rank {i}: {s}" for i, s in enumerate(shapes))
    if len({(f[1], f[2]) for f in fields}) > 1:
        raise ValueError(f"attention: the ranks passed masks of different batch or head dims ({per})")
    if fields[0][2] > 1:
        raise ValueError(
            f"attention: a mask with a head dim ({shapes[0]}) runs only with backend='local'; the sequence-parallel "
            "backends take masks broadcast over heads ([B or 1, 1, Q or 1, K] or key_padding_mask [B, K])"
        )
    full_k = joint + S
    k_full = all(f[4] == full_k for f in fields)
    k_local = all(f[4] == joint + n for f, n in zip(fields, local))
    q_one = all(f[3] == 1 for f in fields)
    q_full = all(f[3] == full_k for f in fields)
    q_local = all(f[3] == joint + n for f, n in zip(fields, local))
    same = len({f[5] for f in fields}) == 1
    if len({f[3] == 1 for f in fields}) > 1:
        raise ValueError(f"attention: the ranks passed masks with and without a query dim ({per})")
    expect_local = ", ".join(f"rank {i}: {joint + n}" for i, n in enumerate(local))
    if k_full and (same or not k_local):
        if q_one or (q_full and (same or not q_local)):
            if not same:
                raise ValueError(
                    f"attention: the ranks passed different full-frame masks (shapes {per}, checksums differ); a mask "
                    f"over the full key sequence ({full_k} keys: {joint} joint + {S}) must be the same on every rank"
                )
            full = bias
        elif q_local:  # this rank's query rows over every key: the rows are gathered
            full = _gather_local(bias, 2, valid, joint=joint, front=front, gather=gather, pad_to=max(local))
        else:
            raise ValueError(
                f"attention: mask query length does not fit the call ({per}); with {full_k} keys the query dim must "
                f"be 1, {full_k} (every query) or this rank's rows ({expect_local})"
            )
    elif k_local:
        if not q_one:
            raise ValueError(
                f"attention: a mask over this rank's keys only (local frame, {per}) cannot have a query dim: the "
                "blocks of other ranks' keys would be missing; pass it over the full key sequence "
                f"({full_k} keys) or without a query dim"
            )
        full = _gather_local(bias, 3, valid, joint=joint, front=front, gather=gather, pad_to=max(local))
    else:
        raise ValueError(
            f"attention: mask key length does not fit the call ({per}); expected the full frame "
            f"(K = {joint} joint + {S} sequence = {full_k} keys on every rank) or the local frame (K = joint + local rows: "
            f"{expect_local})"
        )
    if bool((full == 0).all()):
        return None
    return FullMask(full, joint, front, S)


def _gather_local(
    t: Tensor, dim: int, valid: list[int], *, joint: int, front: bool, gather: object, pad_to: int
) -> Tensor:
    """The full frame along ``dim`` of a local-frame ``t``: joint part kept, the sequence parts of every rank
    all-gathered (padded to ``pad_to`` rows for the collective) and their auto_pad rows dropped."""
    n = t.shape[dim] - joint
    jpart = t.narrow(dim, 0, joint) if front else t.narrow(dim, n, joint)
    spart = t.narrow(dim, joint if front else 0, n)
    if n < pad_to:
        shape = list(spart.shape)
        shape[dim] = pad_to - n
        spart = torch.cat([spart, spart.new_zeros(shape)], dim=dim)
    allseq = gather(spart.contiguous(), dim)  # type: ignore[operator]
    seq = torch.cat([allseq.narrow(dim, r * pad_to, valid[r]) for r in range(len(valid))], dim=dim)
    return torch.cat([jpart, seq] if front else [seq, jpart], dim=dim)
