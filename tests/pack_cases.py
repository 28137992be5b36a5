"""Independent plain-torch references and shape cases for the Ulysses pack/unpack ops.

The references are written from the layout definitions (cat / index_select / split per rank), not
from the view/permute formulation of sp_kernels.ops.pack's torch implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sp_kernels.attn.ulysses import assign_heads


def expected_pack_qkv(q, k, v, P: int, kv_index: list[int]) -> torch.Tensor:
    B, S, Hq, D = q.shape
    hq = -(-Hq // P)
    nkv = len(kv_index) // P
    chunks = []
    for r in range(P):
        heads = [h for h in range(r * hq, (r + 1) * hq) if h < Hq]
        zeros = torch.zeros(B, S, hq - len(heads), D, dtype=q.dtype)
        idx = torch.tensor(kv_index[r * nkv : (r + 1) * nkv], dtype=torch.long)
        qpart = q[:, :, heads] if heads else q[:, :, :0]
        chunks.append(torch.cat([qpart, zeros, k.index_select(2, idx), v.index_select(2, idx)], dim=2))
    return torch.stack(chunks)


def expected_unpack_qkv(recv, seq_len: int, jq=None, jk=None, jv=None, front: bool = True) -> torch.Tensor:
    P = recv.shape[0]
    seq = torch.cat([recv[r] for r in range(P)], dim=1)[:, :seq_len]
    if jq is None:
        return seq.clone()
    joint = torch.cat([jq, jk, jv], dim=2)
    return torch.cat([joint, seq] if front else [seq, joint], dim=1)


def expected_pack_out(out_seq, out_joint, P: int, L: int, front: bool = True) -> torch.Tensor:
    B, S, hq, D = out_seq.shape
    padded = torch.cat([out_seq, torch.zeros(B, P * L - S, hq, D, dtype=out_seq.dtype)], dim=1)
    chunks = []
    for r in range(P):
        part = padded[:, r * L : (r + 1) * L]
        if out_joint is not None:
            part = torch.cat([out_joint, part] if front else [part, out_joint], dim=1)
        chunks.append(part)
    return torch.stack(chunks)


def expected_unpack_out(recv, heads: int) -> torch.Tensor:
    P = recv.shape[0]
    return torch.cat([recv[r] for r in range(P)], dim=2)[:, :, :heads].clone()


def rand(shape, dtype, generator=None) -> torch.Tensor:
    """Random values offset away from zero: never confused with zero padding or zeroed memory."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) + 5.0
    return x.to(dtype)


@dataclass(frozen=True)
class QkvCase:
    B: int
    S_loc: int
    Hq: int
    Hkv: int
    D: int
    P: int

    @property
    def kv_index(self) -> list[int]:
        plan = assign_heads(self.Hq, self.Hkv, self.P)
        return list(plan.kv_index) if plan.kv_index is not None else list(range(self.P * plan.kv_local))

    def __str__(self) -> str:
        return f"B{self.B}-S{self.S_loc}-H{self.Hq}kv{self.Hkv}-D{self.D}-P{self.P}"


QKV_CASES = [
    QkvCase(1, 5, 4, 4, 64, 2),  # even heads, MHA
    QkvCase(2, 3, 5, 5, 80, 2),  # Hq not divisible by P: one zero padding head
    QkvCase(1, 4, 6, 2, 128, 4),  # GQA, heads padded (hq=2 on 4 ranks for 6 heads)
    QkvCase(2, 3, 8, 1, 64, 8),  # MQA: one KV head replicated to all 8 ranks
    QkvCase(1, 2, 3, 3, 64, 4),  # fewer query heads than ranks: a rank of padding heads only
    QkvCase(2, 4, 12, 4, 64, 8),  # GQA with fewer KV heads than ranks (replication)
    QkvCase(1, 1, 24, 24, 128, 8),
]

# (B, S, P, L, hq, D, J): S exact rows over P shards of L rows (the last ones partly or wholly padding).
OUT_CASES = [
    (1, 8, 2, 4, 2, 64, 0),  # even
    (2, 7, 2, 4, 3, 80, 0),  # one padding row
    (1, 5, 4, 2, 2, 128, 0),  # valid rows [2, 2, 1, 0]: a whole-padding shard
    (2, 9, 4, 3, 1, 64, 3),  # with joint rows
    (1, 1, 4, 1, 2, 64, 2),  # three whole-padding shards, joint rows
    (2, 12, 3, 4, 2, 64, 1),
]
