"""A small DiT-style transformer with random weights: the demo's and the tests' model.

MM-DiT flavoured (Flux / SD3 / Wan-like): a latent ``[B, C, T, H, W]`` (or a token sequence
``[B, S, C]``) is patch-embedded into image tokens; text embeddings are projected into a separate
text stream whose tokens are the *joint* tokens of every attention (``joint_strategy="front"``);
each block has adaLN modulation from the timestep, self-attention with 3-D RoPE on the image
tokens through ``sp_kernels.attention``, and an MLP; ``proj_out`` and an unpatchify end it.

``_sp_plan`` shards the RoPE tables and the image tokens entering ``blocks.0`` (auto_pad, so any
length works on any SP size) and gathers ``proj_out``. The text stream stays replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attn import Attention
from ...plan.specs import SequenceParallelInput, SequenceParallelOutput

Tensor = torch.Tensor


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None  # default: in_channels
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); token input uses none
    num_heads: int = 4
    num_kv_heads: int | None = None  # < num_heads: GQA / MQA
    head_dim: int = 32
    num_layers: int = 2
    mlp_ratio: float = 2.0
    text_dim: int = 32
    freq_dim: int = 64
    rope_theta: float = 10000.0

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


class PatchEmbed(nn.Module):
    """Latent ``[B, C, T, H, W]`` -> ``[B, T'*H'*W', hidden]``; a token input ``[B, S, C]`` -> ``[B, S, hidden]``."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.patch = nn.Conv3d(cfg.in_channels, cfg.hidden_dim, cfg.patch_size, stride=cfg.patch_size)
        self.tokens = nn.Linear(cfg.in_channels, cfg.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 5:
            return self.patch(x).flatten(2).transpose(1, 2)
        return self.tokens(x)


class RotaryEmbedding(nn.Module):
    """RoPE tables for a (t, h, w) grid (or a 1-D sequence): ``(cos, sin)``, each ``[1, S, 1, head_dim]``."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def _axis(self, n: int, dim: int) -> Tensor:
        freqs = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.outer(torch.arange(n, dtype=torch.float64), freqs)  # [n, dim / 2]

    def forward(self, grid: tuple[int, ...], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        half = self.head_dim // 2
        # Split the rotary pairs over the axes, the first axis taking the remainder.
        per_axis = [half // len(grid)] * len(grid)
        per_axis[0] += half - sum(per_axis)
        mesh = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        angles = torch.cat(
            [self._axis(n, 2 * d)[idx.reshape(-1)] for n, d, idx in zip(grid, per_axis, mesh) if d],
            dim=-1,
        )  # [S, half]
        angles = torch.cat([angles, angles], dim=-1)[None, :, None, :]
        return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x ``[B, S, H, D]``; the rotate-half convention, computed in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Stream(nn.Module):
    """The per-stream weights of a block (image or text): modulation, qkv, output, MLP."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.modulation = nn.Linear(d, 6 * d)
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(d, cfg.num_heads * cfg.head_dim)
        self.to_k = nn.Linear(d, cfg.kv_heads * cfg.head_dim)
        self.to_v = nn.Linear(d, cfg.kv_heads * cfg.head_dim)
        self.norm_q = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.to_out = nn.Linear(cfg.num_heads * cfg.head_dim, d)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))

    def qkv(self, x: Tensor, shift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        h = self.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        q = self.norm_q(self.to_q(h).view(B, S, self.cfg.num_heads, self.cfg.head_dim))
        k = self.norm_k(self.to_k(h).view(B, S, self.cfg.kv_heads, self.cfg.head_dim))
        v = self.to_v(h).view(B, S, self.cfg.kv_heads, self.cfg.head_dim)
        return q, k, v

    def finish(self, x: Tensor, attn: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        _, _, gate, shift2, scale2, gate2 = mods
        x = x + gate[:, None] * self.to_out(attn.flatten(2))
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.mlp(h)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.image = Stream(cfg)
        self.text = Stream(cfg)
        self.attn = Attention(joint_strategy="front")

    def forward(
        self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor, rotary_emb: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        cos, sin = rotary_emb
        act = F.silu(temb)
        img_mods = self.image.modulation(act).chunk(6, dim=-1)
        txt_mods = self.text.modulation(act).chunk(6, dim=-1)
        q, k, v = self.image.qkv(hidden_states, img_mods[0], img_mods[1])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        tq, tk, tv = self.text.qkv(encoder_hidden_states, txt_mods[0], txt_mods[1])
        out = self.attn(q, k, v, tq, tk, tv)  # [B, L + S_local, H, D]: text rows first
        L = encoder_hidden_states.shape[1]
        hidden_states = self.image.finish(hidden_states, out[:, L:], img_mods)
        encoder_hidden_states = self.text.finish(encoder_hidden_states, out[:, :L], txt_mods)
        return hidden_states, encoder_hidden_states


class DiT(nn.Module):
    """``forward(latent [B, C, T, H, W] or tokens [B, S, C], timestep [B], text [B, L, text_dim])``."""

    _sp_plan = {
        "rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=4, split_output=True, auto_pad=True),
        },
        "blocks.0": {"hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True)},
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self, cfg: DiTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DiTConfig()
        self.cfg = cfg
        d = cfg.hidden_dim
        out_ch = cfg.out_channels or cfg.in_channels
        self.patch_embed = PatchEmbed(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, out_ch * math.prod(cfg.patch_size))
        self.tokens_out = nn.Linear(out_ch * math.prod(cfg.patch_size), out_ch)

    def forward(self, latent: Tensor, timestep: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        cfg = self.cfg
        if latent.dim() == 5:
            B, _, T, H, W = latent.shape
            pt, ph, pw = cfg.patch_size
            grid: tuple[int, ...] = (T // pt, H // ph, W // pw)
        elif latent.dim() == 3:
            grid = (latent.shape[1],)
        else:
            raise ValueError(f"DiT expects a latent [B, C, T, H, W] or tokens [B, S, C], got shape {tuple(latent.shape)}")
        x = self.patch_embed(latent)
        cos, sin = self.rope(grid, device=x.device)
        rotary = (cos.to(x.dtype), sin.to(x.dtype))
        temb = self.time_embed(timestep_embedding(timestep, cfg.freq_dim).to(x.dtype))
        text = self.text_embed(encoder_hidden_states)
        for block in self.blocks:
            x, text = block(x, text, temb, rotary)
        shift, scale = self.out_modulation(F.silu(temb)).chunk(2, dim=-1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out(x)  # gathered here under SP
        if latent.dim() == 3:
            return self.tokens_out(x)
        return self._unpatchify(x, grid)

    def _unpatchify(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        B = x.shape[0]
        pt, ph, pw = self.cfg.patch_size
        c = x.shape[-1] // (pt * ph * pw)
        t, h, w = grid
        x = x.view(B, t, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c, t * pt, h * ph, w * pw)
