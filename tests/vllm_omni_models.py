"""Small torch models with the ``_sp_plan`` shapes of vLLM-Omni's models (no vLLM-Omni import).

Written for sp_kernels' distributed tests; see docs/vllm_omni_semantics.md for the vLLM-Omni plans
they reproduce. Each class carries an ``_sp_plan`` written with sp_kernels' types exactly as a
vLLM-Omni model spells it (only the import prefix changed), calls ``sp_kernels.attention`` on
``[batch, seq, heads, head_dim]`` tensors, and runs unchanged on one process. Every layer other than
attention is per-token, so a sharded run must match the single-process run.

Kinds (``build(kind)`` / ``make_inputs(kind, seq_len, text_len)``):

``"av"``: ``AudioVideoModel``, the LTX-2 shape. Two sequences (video, audio), each split at the root
  (``hidden_states``, ``audio_hidden_states``, per-token ``timestep``), each with its own RoPE module
  whose outputs are split (``rope``, ``audio_rope``), and each gathered by its own output
  (``proj_out``, ``audio_proj_out``): two gathers in one forward. Self-attention per modality,
  LTX-2's audio-to-video / video-to-audio cross-attention between the two sharded sequences, and
  cross-attention to a replicated text with ``backend="local"`` (vLLM-Omni: an ``Attention`` with
  ``skip_sequence_parallel=True``, as Wan2.2's ``attn2``). No padding: the lengths must divide the
  SP size, as in LTX-2.
``"av_padded"``: ``AudioVideoModelPadded``, the same model with vLLM-Omni's newer fields:
  ``auto_pad=True`` and a ``shard_group`` per sequence (``"video"``, ``"audio"``), each gather
  trimming to its own group. Any lengths.
``"txt_ids"``: ``TxtIdsPartialModel``, the Flux/LongCat single-stream shape. ``pos_embed(txt_ids,
  img_ids)`` returns a ``[T + N, head_dim]`` RoPE table for ``[text | image]``; its outputs are split
  by ``SequenceParallelPartialInput(split_dim=0, text_len_source="txt_ids", ...)`` with ``txt_ids``
  a ``[T, 3]`` tensor (vLLM-Omni reads ``txt_ids.shape[0]``). The image ``hidden_states`` is split at
  the root; each block attends over ``[text | local image]`` (text replicated).
``"text_sharded"``: ``TextShardedCrossAttnModel``, the LTX-2 / Wan text path with the text sharded:
  ``encoder_hidden_states`` is split in the plan like ``hidden_states`` and used as cross-attention
  K/V by the sharded video query, after a self-attention. Lengths must divide the SP size.
``"text_sharded_padded"``: ``TextShardedCrossAttnModelPadded``, with ``auto_pad=True`` and shard
  groups ``"video"`` / ``"text"``. Any lengths.

Inputs are float64; ``build(kind, seed)`` seeds parameter initialisation, ``make_inputs(...,
seed=...)`` the inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import sp_kernels
from sp_kernels import SequenceParallelInput, SequenceParallelOutput, SequenceParallelPartialInput

DIM = 32
HEADS = 4
HEAD_DIM = DIM // HEADS
AUDIO_DIM = 24
AUDIO_HEADS = 3
TEXT_DIM = 20
IN_CHANNELS = 6
AUDIO_IN_CHANNELS = 5
DTYPE = torch.float64


# ---------------------------------------------------------------------------------------------
# Shared pieces


def rope_table(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape ``positions.shape + (head_dim,)``; the two halves share frequencies."""
    half = head_dim // 2
    inv = 1.0 / (100.0 ** (torch.arange(half, dtype=DTYPE, device=positions.device) / half))
    angles = positions.to(DTYPE)[..., None] * inv
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos/sin: [B, S, D] or [S, D] (broadcast over batch and heads)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class SelfAttention(nn.Module):
    """Self-attention over the (sharded) sequence: sp_kernels communicates inside a sharded region."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, S, 3, self.heads, C // self.heads).unbind(2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.out(sp_kernels.attention(q, k, v).reshape(B, S, C))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys/values from ``context``.

    ``local=True``: the context is replicated on every rank, so attention runs locally (vLLM-Omni:
    ``Attention(..., role="cross", skip_sequence_parallel=True)``). ``local=False``: the context is
    sharded too (LTX-2's text and its audio/video cross-attention), and sp_kernels gathers its K/V.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, *, local: bool) -> None:
        super().__init__()
        self.heads = heads
        self.backend = "local" if local else None
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q = self.q(self.norm(x)).view(B, S, self.heads, C // self.heads)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, C // self.heads).unbind(2)
        return self.out(sp_kernels.attention(q, k, v, backend=self.backend).reshape(B, S, C))


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


class CoordsRope(nn.Module):
    """RoPE from per-token coordinates ``[B, S]`` -> (cos, sin) ``[B, S, head_dim]`` (LTX-2's
    interleaved layout: rank 3, sequence on dim 1)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_table(coords, self.head_dim)


# ---------------------------------------------------------------------------------------------
# (i) LTX-2 shape: video and audio, both split and both gathered in one forward


class AVBlock(nn.Module):
    def __init__(self, cross_modal: bool) -> None:
        super().__init__()
        self.attn1 = SelfAttention(DIM, HEADS)
        self.audio_attn1 = SelfAttention(AUDIO_DIM, AUDIO_HEADS)
        self.attn2 = CrossAttention(DIM, TEXT_DIM, HEADS, local=True)
        self.audio_attn2 = CrossAttention(AUDIO_DIM, TEXT_DIM, AUDIO_HEADS, local=True)
        self.cross_modal = cross_modal
        if cross_modal:
            self.audio_to_video_attn = CrossAttention(DIM, AUDIO_DIM, HEADS, local=False)
            self.video_to_audio_attn = CrossAttention(AUDIO_DIM, DIM, AUDIO_HEADS, local=False)
        self.ff = MLP(DIM)
        self.audio_ff = MLP(AUDIO_DIM)

    def forward(self, hidden_states, audio_hidden_states, encoder_hidden_states, temb, video_rope, audio_rope):
        x, a = hidden_states, audio_hidden_states
        x = x + self.attn1(x, *video_rope)
        a = a + self.audio_attn1(a, *audio_rope)
        x = x + self.attn2(x, encoder_hidden_states)
        a = a + self.audio_attn2(a, encoder_hidden_states)
        if self.cross_modal:
            x, a = x + self.audio_to_video_attn(x, a), a + self.video_to_audio_attn(a, x)
        x = x + self.ff(x) * (1 + temb)
        a = a + self.audio_ff(a)
        return x, a


class AudioVideoModel(nn.Module):
    """LTX-2's plan shape (``LTX2VideoTransformer3DModel._build_sp_plan`` with interleaved RoPE), minus
    the text split (replicated here; see ``TextShardedCrossAttnModel`` for the sharded text)."""

    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "audio_hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, split_output=False),
            # Per-token video timestep [B, N]; a [B] timestep has 1 dim and is left alone.
            "timestep": SequenceParallelInput(split_dim=1, expected_dims=2, split_output=False),
        },
        "rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
        },
        "audio_rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
        "audio_proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self, depth: int = 2, cross_modal: bool = True) -> None:
        super().__init__()
        self.proj_in = nn.Linear(IN_CHANNELS, DIM)
        self.audio_proj_in = nn.Linear(AUDIO_IN_CHANNELS, AUDIO_DIM)
        self.time_embed = nn.Sequential(nn.Linear(1, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.rope = CoordsRope(HEAD_DIM)
        self.audio_rope = CoordsRope(AUDIO_DIM // AUDIO_HEADS)
        self.transformer_blocks = nn.ModuleList(AVBlock(cross_modal) for _ in range(depth))
        self.norm_out = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, IN_CHANNELS)
        self.audio_norm_out = nn.LayerNorm(AUDIO_DIM)
        self.audio_proj_out = nn.Linear(AUDIO_DIM, AUDIO_IN_CHANNELS)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, IN_CHANNELS]
        audio_hidden_states: torch.Tensor,  # [B, M, AUDIO_IN_CHANNELS]
        encoder_hidden_states: torch.Tensor,  # [B, T, TEXT_DIM], replicated
        timestep: torch.Tensor,  # [B, N] per video token (or [B])
        video_coords: torch.Tensor,  # [B, N], not split: the rope outputs are
        audio_coords: torch.Tensor,  # [B, M]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        video_rope = self.rope(video_coords)
        audio_rope = self.audio_rope(audio_coords)
        x = self.proj_in(hidden_states)
        a = self.audio_proj_in(audio_hidden_states)
        t = timestep if timestep.dim() == 2 else timestep[:, None].expand(-1, x.shape[1])
        temb = self.time_embed(t[..., None].to(x.dtype))
        for block in self.transformer_blocks:
            x, a = block(x, a, encoder_hidden_states, temb, video_rope, audio_rope)
        return self.proj_out(self.norm_out(x)), self.audio_proj_out(self.audio_norm_out(a))


class AudioVideoModelPadded(AudioVideoModel):
    """``AudioVideoModel`` with vLLM-Omni's newer fields: padded splits, one ``shard_group`` per
    sequence, each gather trimming to its own group's true length (any lengths work)."""

    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True, shard_group="video"),
            "audio_hidden_states": SequenceParallelInput(
                split_dim=1, expected_dims=3, auto_pad=True, shard_group="audio"
            ),
            "timestep": SequenceParallelInput(split_dim=1, expected_dims=2, auto_pad=True, shard_group="video"),
        },
        # A group belongs to one split boundary (plan key): the rope tables are padded the same way
        # (same lengths) but recorded without a group.
        "rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True),
        },
        "audio_rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True, clone_shard=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True, clone_shard=True),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3, shard_group="video"),
        "audio_proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3, shard_group="audio"),
    }


# ---------------------------------------------------------------------------------------------
# (ii) Flux / LongCat shape: SequenceParallelPartialInput(text_len_source="txt_ids"), txt_ids [T, 3]


class IdsRopePrepare(nn.Module):
    """RoPE for ``cat(txt_ids, img_ids)`` -> (cos, sin) of shape ``[T + N, head_dim]``: text rows first.

    Takes ``txt_ids`` itself, so the plan's ``text_len_source="txt_ids"`` names a parameter of this
    module (vLLM-Omni resolves it among the forward arguments of the hooked module)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def forward(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.cat([txt_ids, img_ids], dim=0).to(DTYPE)  # [T + N, 3]
        positions = ids[:, 0] * 0.5 + ids[:, 1] * 3.0 + ids[:, 2]
        return rope_table(positions, self.head_dim)


class SingleStreamBlock(nn.Module):
    """Flux single-stream block: attention over ``[text | image]`` rows (image rows sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = SelfAttention(DIM, HEADS)
        self.ff = MLP(DIM)

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        x = x + self.attn(x, *image_rotary_emb)
        x = x + self.ff(x) * (1 + temb[:, None])
        return x[:, :text_len], x[:, text_len:]


class TxtIdsPartialModel(nn.Module):
    """vLLM-Omni's ``SequenceParallelPartialInput`` docstring example as a model: the RoPE table of
    ``[text | image]`` keeps its first ``txt_ids.shape[0]`` rows on every rank and splits the rest."""

    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True),
        },
        "pos_embed": {
            0: SequenceParallelPartialInput(split_dim=0, text_len_source="txt_ids", expected_dims=2, split_output=True),
            1: SequenceParallelPartialInput(split_dim=0, text_len_source="txt_ids", expected_dims=2, split_output=True),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(IN_CHANNELS, DIM)
        self.context_embedder = nn.Linear(TEXT_DIM, DIM)
        self.time_embed = nn.Sequential(nn.Linear(1, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.pos_embed = IdsRopePrepare(HEAD_DIM)
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock() for _ in range(depth))
        self.norm_out = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, IN_CHANNELS)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, IN_CHANNELS] image tokens
        encoder_hidden_states: torch.Tensor,  # [B, T, TEXT_DIM], replicated
        timestep: torch.Tensor,  # [B]
        img_ids: torch.Tensor,  # [N, 3]
        txt_ids: torch.Tensor,  # [T, 3]
    ) -> torch.Tensor:
        x = self.x_embedder(hidden_states)
        text = self.context_embedder(encoder_hidden_states)
        temb = self.time_embed(timestep[:, None].to(x.dtype))
        rotary = self.pos_embed(txt_ids, img_ids)
        for block in self.single_transformer_blocks:
            text, x = block(x, text, temb, rotary)
        return self.proj_out(self.norm_out(x))


# ---------------------------------------------------------------------------------------------
# (iii) Sharded text as cross-attention K/V of a sharded query, plus self-attention


class TextCrossBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = SelfAttention(DIM, HEADS)
        self.attn2 = CrossAttention(DIM, DIM, HEADS, local=False)  # K/V from the sharded text
        self.ff = MLP(DIM)

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        x = hidden_states + self.attn1(hidden_states, *rotary_emb)
        x = x + self.attn2(x, encoder_hidden_states)
        return x + self.ff(x) * (1 + temb[:, None])


class TextShardedCrossAttnModel(nn.Module):
    """LTX-2's text path: ``encoder_hidden_states`` split at the root like ``hidden_states`` (LTX-2
    plan: ``SequenceParallelInput(split_dim=1, expected_dims=3, split_output=False)``), then used as
    cross-attention K/V; the text is never gathered."""

    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3),
    }

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.proj_in = nn.Linear(IN_CHANNELS, DIM)
        self.caption_projection = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.time_embed = nn.Sequential(nn.Linear(1, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.rope = CoordsRope(HEAD_DIM)
        self.transformer_blocks = nn.ModuleList(TextCrossBlock() for _ in range(depth))
        self.norm_out = nn.LayerNorm(DIM)
        self.proj_out = nn.Linear(DIM, IN_CHANNELS)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [B, N, IN_CHANNELS]
        encoder_hidden_states: torch.Tensor,  # [B, T, TEXT_DIM], split by the plan
        timestep: torch.Tensor,  # [B]
        video_coords: torch.Tensor,  # [B, N]
    ) -> torch.Tensor:
        rotary = self.rope(video_coords)
        x = self.proj_in(hidden_states)
        text = self.caption_projection(encoder_hidden_states)  # per-token: fine on a shard
        temb = self.time_embed(timestep[:, None].to(x.dtype))
        for block in self.transformer_blocks:
            x = block(x, text, temb, rotary)
        return self.proj_out(self.norm_out(x))


class TextShardedCrossAttnModelPadded(TextShardedCrossAttnModel):
    """The same with padded splits and shard groups: any video and text lengths."""

    _sp_plan = {
        "": {
            "hidden_states": SequenceParallelInput(split_dim=1, expected_dims=3, auto_pad=True, shard_group="video"),
            "encoder_hidden_states": SequenceParallelInput(
                split_dim=1, expected_dims=3, auto_pad=True, shard_group="text"
            ),
        },
        "rope": {
            0: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True),
            1: SequenceParallelInput(split_dim=1, expected_dims=3, split_output=True, auto_pad=True),
        },
        "proj_out": SequenceParallelOutput(gather_dim=1, expected_dims=3, shard_group="video"),
    }


# ---------------------------------------------------------------------------------------------
# Helpers

MODELS: dict[str, type[nn.Module]] = {
    "av": AudioVideoModel,
    "av_padded": AudioVideoModelPadded,
    "txt_ids": TxtIdsPartialModel,
    "text_sharded": TextShardedCrossAttnModel,
    "text_sharded_padded": TextShardedCrossAttnModelPadded,
}


def build(kind: str, seed: int = 0, **kwargs) -> nn.Module:
    """The model of ``kind`` in float64, eval mode, parameters drawn from ``torch.manual_seed(seed)``."""
    if kind not in MODELS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[kind](**kwargs)
    return model.to(DTYPE).eval()


def make_inputs(
    kind: str,
    seq_len: int,
    text_len: int,
    *,
    audio_len: int | None = None,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Keyword inputs of ``kind``'s forward (float64 for every float tensor), the same for every seed.

    ``seq_len``: video/image tokens; ``text_len``: text tokens. ``"av"`` kinds also take
    ``audio_len`` (default ``seq_len // 2 + 1``, a different local length from the video's).
    ``"txt_ids"`` needs ``batch=1`` (vLLM-Omni's ``text_len_source`` reads ``txt_ids.shape[0]`` and
    its ids have no batch dim).
    """
    if kind not in MODELS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(MODELS)}")
    if seq_len < 1 or text_len < 1:
        raise ValueError(f"seq_len and text_len must be >= 1, got {seq_len}, {text_len}")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    def coords(n):
        return torch.arange(n, dtype=DTYPE)[None].expand(batch, n).contiguous()

    if kind in ("av", "av_padded"):
        m = audio_len if audio_len is not None else seq_len // 2 + 1
        return {
            "hidden_states": randn(batch, seq_len, IN_CHANNELS),
            "audio_hidden_states": randn(batch, m, AUDIO_IN_CHANNELS),
            "encoder_hidden_states": randn(batch, text_len, TEXT_DIM),
            "timestep": torch.rand(batch, seq_len, generator=g, dtype=DTYPE),
            "video_coords": coords(seq_len),
            "audio_coords": coords(m) * 0.75,
        }
    if kind == "txt_ids":
        if batch != 1:
            raise ValueError("the txt_ids model takes batch=1 (ids have no batch dim, as in Flux/LongCat)")
        side = max(1, int(seq_len**0.5))
        img_ids = torch.stack(
            [torch.zeros(seq_len), torch.arange(seq_len) // side, torch.arange(seq_len) % side], dim=1
        ).to(DTYPE)
        txt_ids = torch.zeros(text_len, 3, dtype=DTYPE)
        txt_ids[:, 0] = torch.arange(text_len, dtype=DTYPE)  # distinct text positions
        return {
            "hidden_states": randn(1, seq_len, IN_CHANNELS),
            "encoder_hidden_states": randn(1, text_len, TEXT_DIM),
            "timestep": torch.rand(1, generator=g, dtype=DTYPE),
            "img_ids": img_ids,
            "txt_ids": txt_ids,
        }
    return {
        "hidden_states": randn(batch, seq_len, IN_CHANNELS),
        "encoder_hidden_states": randn(batch, text_len, TEXT_DIM),
        "timestep": torch.rand(batch, generator=g, dtype=DTYPE),
        "video_coords": coords(seq_len),
    }


def reference(kind: str, seq_len: int, text_len: int, *, seed: int = 0, **input_kwargs):
    """Single-process output of ``build(kind, seed)`` on ``make_inputs(...)`` (no SP applied)."""
    model = build(kind, seed)
    with torch.no_grad():
        return model(**make_inputs(kind, seq_len, text_len, seed=seed, **input_kwargs))
