"""vLLM-Omni plan shapes (tests/vllm_omni_models.py) run exactly under sp_kernels' hooks: two gathered
outputs in one forward (LTX-2 video + audio, with and without shard_group/clone_shard),
``text_len_source`` read from a ``[T, 3]`` ids tensor, and a sharded text context used as
cross-attention K/V. Every backend, 2 and 3 gloo ranks, token counts the world size does not divide
(where the plan pads), against the same model on one process in float64."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import sp_kernels
from sp_kernels import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelOutput,
    apply_sequence_parallel,
    remove_sequence_parallel,
)
from tests import vllm_omni_models as vm
from tests.attention_cases import sp_degrees

BACKENDS = ("ulysses", "ring", "usp", "fused_ring")


def _cases(world: int) -> list[tuple[str, int, int, dict]]:
    even, odd = 4 * world, 4 * world + 1
    return [
        ("av", even, 5, {"audio_len": 2 * world}),
        ("av_padded", odd, 5, {"audio_len": 2 * world + 1}),
        ("txt_ids", odd, 5, {}),
        ("txt_ids", even + 2, 3, {}),
        ("text_sharded", even, 2 * world, {}),
        ("text_sharded_padded", odd, 2 * world + 1, {}),
    ]


def _sp_forward(model: nn.Module, backend: str, *args, **kwargs):
    """One forward of ``model`` with its own plan applied for ``backend``, removed again after."""
    u, r = sp_degrees(backend, dist.get_world_size())
    apply_sequence_parallel(model, SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=backend))
    try:
        with torch.no_grad():
            return model(*args, **kwargs)
    finally:
        remove_sequence_parallel(model)


class RopeListModel(nn.Module):
    """A list-valued spec: ``rotary_emb=(cos, sin)`` is one argument, split element-wise (vLLM-Omni)."""

    _sp_plan = {
        "": {
            "x": SequenceParallelInput(1, expected_dims=3, auto_pad=True),
            "rotary_emb": [SequenceParallelInput(0, expected_dims=2, auto_pad=True),
                           SequenceParallelInput(0, expected_dims=2, auto_pad=True)],
        },
        "proj_out": SequenceParallelOutput(1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.proj_out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = rotary_emb
        q, k, v = (t.view(*t.shape[:2], 2, 4) for t in self.qkv(x).chunk(3, dim=-1))
        q, k = (t * cos[None, :, None] + t.roll(1, dims=-1) * sin[None, :, None] for t in (q, k))
        return self.proj_out(x + sp_kernels.attention(q, k, v).flatten(2))


def run_rope_list() -> list[float]:
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = RopeListModel().double()
    errs = []
    for seq in (4 * world, 4 * world + 1):
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(2, seq, 8, generator=g, dtype=torch.float64)
        pos = torch.arange(seq, dtype=torch.float64)[:, None] / (1 + torch.arange(4, dtype=torch.float64))
        rope = (pos.cos(), pos.sin())
        with torch.no_grad():
            ref = model(x, rope)
        for backend in BACKENDS:
            errs.append((_sp_forward(model, backend, x, rope) - ref).abs().max().item())
    return errs


def test_list_valued_spec_splits_each_element(rank_pool):
    for errs in rank_pool(2).run(run_rope_list):
        assert len(errs) == 2 * len(BACKENDS) and max(errs) < 1e-10, errs


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def run_ports() -> list[dict]:
    world = dist.get_world_size()
    results = []
    for kind, seq, text, extra in _cases(world):
        model = vm.build(kind, seed=1)
        inputs = vm.make_inputs(kind, seq, text, seed=2, **extra)
        with torch.no_grad():
            ref = _flat(model(**inputs))
        for backend in BACKENDS:
            got = _flat(_sp_forward(model, backend, **inputs))
            errs = [(a - b).abs().max().item() if a.shape == b.shape else float("inf") for a, b in zip(got, ref)]
            results.append({"case": (kind, seq, text, backend), "outputs": len(got), "err": max(errs)})
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_vllm_omni_plan_shapes_exact(rank_pool, world):
    for results in rank_pool(world).run(run_ports):
        assert len(results) == len(_cases(world)) * len(BACKENDS)
        for res in results:
            assert res["err"] < 1e-10, res
            if res["case"][0].startswith("av"):
                assert res["outputs"] == 2, res  # video and audio, each gathered


class TextLensModel(nn.Module):
    """Z-Image / Ernie-Image style (issue 15): a batch of prompts of different lengths (``text_lens``), the
    text replicated as joint tokens, and a per-sample key mask the model builds from the lengths over the
    rows it sees: ``[text mask | ones(image rows)]`` (under SP: this rank's image rows, the local frame).
    ``hole`` also masks text token 1 of sample 0 (a mask that is not an end cut)."""

    _sp_plan = {
        "": {"x": SequenceParallelInput(1, expected_dims=3, auto_pad=True)},
        "proj_out": SequenceParallelOutput(1, expected_dims=3),
    }

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.txt_qkv = nn.Linear(8, 24)
        self.proj_out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_lens: torch.Tensor, hole: bool = False) -> torch.Tensor:
        B, S, _ = x.shape
        T = text.shape[1]
        q, k, v = (t.view(B, S, 2, 4) for t in self.qkv(x).chunk(3, dim=-1))
        jq, jk, jv = (t.view(B, T, 2, 4) for t in self.txt_qkv(text).chunk(3, dim=-1))
        keep = torch.arange(T)[None] < text_lens[:, None]
        if hole:
            keep[0, 1] = False
        keep = torch.cat([keep, torch.ones(B, S, dtype=torch.bool)], dim=1)
        out = sp_kernels.attention(q, k, v, joint_query=jq, joint_key=jk, joint_value=jv, key_padding_mask=keep)
        return self.proj_out(x + out[:, T:].flatten(2))


def run_text_lens() -> list[float]:
    world = dist.get_world_size()
    torch.manual_seed(0)
    model = TextLensModel().double()
    errs = []
    for seq, hole in ((4 * world, False), (4 * world + 1, True)):
        g = torch.Generator().manual_seed(seq)
        x = torch.randn(3, seq, 8, generator=g, dtype=torch.float64)
        text = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
        lens = torch.tensor([6, 4, 2])
        with torch.no_grad():
            ref = model(x, text, lens, hole)
        for backend in BACKENDS:
            errs.append((_sp_forward(model, backend, x, text, lens, hole) - ref).abs().max().item())
    return errs


def test_text_lengths_per_sample_as_key_mask(rank_pool):
    for errs in rank_pool(2).run(run_text_lens):
        assert len(errs) == 2 * len(BACKENDS) and max(errs) < 1e-10, errs
