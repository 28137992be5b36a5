"""Small models with ``_sp_plan``s for the hook tests.

Every layer is per-token (norms, MLPs, rope-style modulation), so a sharded run must equal the
single-process run; a ``Probe`` inside records what attention would see (the sharded flag and
the recorded layouts) so the tests can check the region bookkeeping too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sp_kernels import (
    SequenceParallelInput,
    SequenceParallelOutput,
    SequenceParallelPartialInput,
    is_sequence_parallel,
    sp_gather,
    sp_shard,
)
from sp_kernels.plan.context import current_context

SPI, SPO, SPP = SequenceParallelInput, SequenceParallelOutput, SequenceParallelPartialInput

DIM = 16
ROPE_D = 8


class Probe(nn.Module):
    """Where attention would sit: records (sharded?, local rows, layouts) of the context."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = current_context()
        if ctx is None:
            self.records.append((False, x.shape[1], ()))
        else:
            self.records.append((ctx.sharded, x.shape[1], tuple(ctx.layouts)))
        return x


class Rope(nn.Module):
    """Returns (cos, sin) of shape [1, S, 1, ROPE_D] for the positions 0..S-1 (rank 4, like Wan)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(x.shape[1], dtype=torch.float64)
        freqs = pos[:, None] / (10.0 ** torch.arange(ROPE_D, dtype=torch.float64) / ROPE_D)
        return freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        self.mod = nn.Linear(DIM, DIM)
        self.probe = Probe()

    def forward(self, hidden_states, cos, sin, temb=None):
        h = self.probe(self.norm(hidden_states))
        rot = h[..., :ROPE_D] * cos[:, :, 0] - h[..., ROPE_D : 2 * ROPE_D] * sin[:, :, 0]
        h = torch.cat([rot, h[..., ROPE_D:]], dim=-1)
        if temb is not None:
            h = h * (1 + self.mod(temb)[:, None])
        return hidden_states + self.mlp(h)


@dataclass
class ModelOut:
    sample: torch.Tensor
    aux: torch.Tensor | None = None


class TinyDiT(nn.Module):
    """Wan-like plan: rope outputs split, blocks.0 input split, proj_out gathered."""

    _sp_plan = {
        "rope": {
            0: SPI(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
            1: SPI(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
        },
        "blocks.0": {"hidden_states": SPI(split_dim=1, expected_dims=3, auto_pad=True)},
        "proj_out": SPO(gather_dim=1, expected_dims=3),
    }

    def __init__(self, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.rope = Rope()
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.proj_out = nn.Linear(DIM, 4)

    def forward(self, x, temb, return_dict: bool = False):
        h = self.embed(x)
        cos, sin = self.rope(h)
        for block in self.blocks:
            h = block(h, cos, sin, temb=temb)
        out = self.proj_out(h)
        return ModelOut(sample=out, aux=temb) if return_dict else (out,)


class RootSplitDiT(TinyDiT):
    """diffusers style: the root input is split and the root output (tuple or dataclass) gathered.

    Rope sits inside every block ("blocks.*.rope" split per block) to exercise the wildcard.
    """

    _sp_plan = {
        "": {"x": SPI(split_dim=1, expected_dims=3, auto_pad=True)},
        "blocks.*.rope": {
            0: SPI(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
            1: SPI(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
        },
        "heads.main": SPO(gather_dim=1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        for b in self.blocks:
            b.rope = Rope()
            b.full_len = None
        self.heads = nn.ModuleDict({"main": nn.Linear(4, 4)})

    def forward(self, x, temb, full_len: int = 0, return_dict: bool = False):
        h = self.embed(x)
        for block in self.blocks:
            # Rope over the full length (the model knows it from its latent shape), then split.
            cos, sin = block.rope(torch.empty(1, full_len, 1))
            h = block(h, cos, sin, temb=temb)
        out = self.heads["main"](self.proj_out(h))
        return ModelOut(sample=out) if return_dict else (out,)


class UnifiedPrepare(nn.Module):
    def forward(self, img, text, txt_ids):
        return (torch.cat([text, img], dim=1),)


class PartialDiT(nn.Module):
    """A unified [text | image] sequence: only the image part is sharded (SequenceParallelPartialInput)."""

    _sp_plan = {
        # vLLM-Omni's form: the prefix length is dim 0 of a [T, 3] position-id tensor.
        "unified": {0: SPP(split_dim=1, text_len_source="txt_ids", expected_dims=3, split_output=True)},
        "proj_out": SPO(gather_dim=1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.unified = UnifiedPrepare()
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())
        self.probe = Probe()
        self.proj_out = nn.Linear(DIM, 4)

    def forward(self, img, text, txt_ids):
        (h,) = self.unified(self.embed(img), text, txt_ids)
        h = self.probe(h + self.mlp(h))
        return self.proj_out(h)


class IntrusiveDiT(TinyDiT):
    """Plan for the sequence, plus sp_shard/sp_gather called inside forward for a per-token input."""

    _sp_plan = {
        "rope": TinyDiT._sp_plan["rope"],
        "blocks.0": TinyDiT._sp_plan["blocks.0"],
    }

    def forward(self, x, temb, token_bias, return_dict: bool = False):
        h = self.embed(x)
        cos, sin = self.rope(h)
        sp = is_sequence_parallel(self)  # the model decides, as intrusive code does
        bias = sp_shard(token_bias, dim=1, auto_pad=True) if sp else token_bias
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, temb=temb)
            if i == 0:
                h = h + bias
        out = self.proj_out(h)
        return (sp_gather(out, dim=1) if sp else out,)


def make_inputs(kind: str, seq: int, batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 4, generator=g, dtype=torch.float64)
    temb = torch.randn(batch, DIM, generator=g, dtype=torch.float64)
    if kind == "root":
        return {"x": x, "temb": temb, "full_len": seq}
    if kind == "partial":
        text = torch.randn(batch, 3, DIM, generator=g, dtype=torch.float64)
        return {"img": x, "text": text, "txt_ids": torch.randn(3, 3, generator=g, dtype=torch.float64)}
    if kind == "intrusive":
        return {"x": x, "temb": temb, "token_bias": torch.randn(batch, seq, DIM, generator=g, dtype=torch.float64)}
    return {"x": x, "temb": temb}


MODELS = {"dit": TinyDiT, "root": RootSplitDiT, "partial": PartialDiT, "intrusive": IntrusiveDiT}


def build(kind: str, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().double()


class WrappedDiT(nn.Module):
    """The root output (a dataclass, a dict or a tuple) is what the plan gathers (key "")."""

    _sp_plan = {
        "inner.rope": TinyDiT._sp_plan["rope"],
        "inner.blocks.0": TinyDiT._sp_plan["blocks.0"],
        "": SPO(gather_dim=1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyDiT()

    def forward(self, x, temb, return_dict: str = "tuple"):
        (out,) = self.inner(x, temb)
        if return_dict == "dataclass":
            return ModelOut(sample=out, aux=None)
        if return_dict == "dict":
            return {"sample": out, "nothing": None}
        return (out,)


MODELS["wrapped"] = WrappedDiT
