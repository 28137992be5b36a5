"""Attention masks (issue 15) under every backend, against a float64 single-process reference.

Distributed cases run in batches, one rank-pool call per world size (tests/mask_cases.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from sp_kernels.attn import attention
from sp_kernels.attn.local import block_attention
from sp_kernels.attn.mask import classify, normalize_mask
from tests.attention_reference import random_qkv
from tests.mask_cases import bad_input, describe, failures, reference, run_cases

KINDS = {
    "holes": ("kpm", "bool", "additive"),
    "endcut": ("kpm", "bool"),
    "text_endcut": ("kpm", "additive"),
    "dead_sample": ("kpm", "both"),
    "query": ("bool", "additive"),
    "dead_row": ("bool",),
}


def _backends(P: int) -> list[tuple[str, tuple[int, int]]]:
    out = [("ulysses", (P, 1)), ("ring", (1, P)), ("fused_ring", (1, P)), ("usp", (1, P))]
    if P == 4:
        out.append(("usp", (2, 2)))
    if P == 2:
        out.append(("usp", (2, 1)))
    return out


@functools.cache
def mask_cases(P: int) -> list[dict]:
    cases: list[dict] = []
    seed = 7000 * P
    for bi, (backend, deg) in enumerate(_backends(P)):
        for ki, (kind, forms) in enumerate(KINDS.items()):
            for fi, form in enumerate(forms):
                seed += 10
                i = bi + ki + fi
                batch = 1 + i % 3
                joint = (0, 3, 2)[i % 3]
                case = dict(backend=backend, degrees=deg, batch=batch, seq=4 * P + 1 + i % 2, heads=4,
                            kv_heads=(4, 2, 1)[i % 3], head_dim=8, dtype="float64" if i % 2 else "float32",
                            mode="pad", seed=seed, kind=kind, form=form, frame=("full", "local")[(i // 2) % 2],
                            joint=joint, strategy=("front", "rear")[i % 2])
                if kind == "text_endcut" and not joint:
                    case["joint"] = 3
                cases.append(case)
        for kind, form, frame in (("holes", "kpm", "local"), ("query", "bool", "full"), ("dead_sample", "kpm", "full")):
            seed += 10  # S < P: whole shards of padding
            cases.append(dict(backend=backend, degrees=deg, batch=2, seq=max(1, P - 1), heads=4, kv_heads=2,
                              head_dim=8, dtype="float64", mode="pad", seed=seed, kind=kind, form=form, frame=frame,
                              joint=2, strategy="rear"))
        for kind, form in (("holes", "additive"), ("text_endcut", "kpm")):  # bf16: within 3x of one process
            seed += 10
            cases.append(dict(backend=backend, degrees=deg, batch=2, seq=4 * P + 3, heads=4, kv_heads=2, head_dim=16,
                              dtype="bfloat16", mode="pad", seed=seed, kind=kind, form=form, frame="local", joint=3,
                              strategy="front" if kind == "holes" else "rear"))
        if deg[0] == 1:  # ring-only: unequal shard lengths without padding, an empty shard
            lengths = [3 + 2 * r for r in range(P)]
            lengths[0] = 0
            for frame in ("full", "local"):
                seed += 10
                cases.append(dict(backend=backend, degrees=deg, batch=2, seq=sum(lengths), heads=2, kv_heads=2,
                                  head_dim=8, dtype="float64", mode="uneven", lengths=lengths, seed=seed,
                                  kind="holes", form="kpm", frame=frame, joint=2, strategy="front"))
    return cases


@pytest.mark.parametrize(
    "world_size,index",
    [
        pytest.param(P, i, id=f"P{P}-{i}-" + describe(c).replace(", ", "/").replace(" ", ","))
        for P in (2, 3, 4)
        for i, c in enumerate(mask_cases(P))
    ],
)
def test_masks_match_reference(rank_batch, world_size, index):
    cases = mask_cases(world_size)
    per_rank = rank_batch(run_cases, world_size, cases)
    bad = failures(cases[index : index + 1], [results[index : index + 1] for results in per_rank])
    assert not bad, bad[0]


BAD = {
    "int_mask": ("TypeError", "attn_mask has dtype torch.int32"),
    "float_keep": ("ValueError", "looks like a keep-mask"),
    "nan_mask": ("ValueError", "NaN or +inf"),
    "kpm_float": ("TypeError", "key_padding_mask must be bool"),
    "kpm_shape": ("ValueError", "mask key length does not fit"),
    "kpm_batch": ("ValueError", "key_padding_mask has shape [1, 8]"),
    "mask_batch": ("ValueError", "its batch dim must be 1 or 2"),
    "mask_device": ("ValueError", "attn_mask is on meta"),
    "key_len": ("ValueError", "mask key length does not fit"),
    "heads": ("ValueError", "runs only with backend='local'"),
    "causal": ("ValueError", "causal=True is not supported"),
    "one_rank_bad": (None, "key_padding_mask must be bool"),
    "one_rank_other": ("ValueError", "different full-frame masks"),
    "one_rank_none": ("ValueError", "passed an attention mask and rank(s) [0] did not"),
}


def test_bad_masks_raise_on_every_rank(rank_pool):
    cases = [dict(kind=kind, backend=b, degrees=d) for kind in BAD for b, d in (("ulysses", (2, 1)), ("ring", (1, 2)))]
    per_rank = rank_pool(2).run(bad_input, cases)
    bad = []
    for i, case in enumerate(cases):
        typ, text = BAD[case["kind"]]
        for rank, res in enumerate(r[i] for r in per_rank):
            if res["type"] is None:
                bad.append(f"{case}: rank {rank} did not raise")
            elif case["kind"] == "one_rank_bad":
                # The rank with the bad mask raises its own error; the other raises that a rank could not run it.
                want = text if rank == 0 else "cannot run this call"
                if want not in res["msg"]:
                    bad.append(f"{case}: rank {rank}: {res['type']}: {res['msg']}")
            elif res["type"] != typ or text not in res["msg"]:
                bad.append(f"{case}: rank {rank}: {res['type']}: {res['msg']} (expected {typ} with {text!r})")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------
# One process: the local path, the masked kernels, the classification


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_kernels_match_sdpa(kernel, dtype):
    q, k, v = random_qkv(3, 3, 11, 4, 2, 16, dtype)
    gen = torch.Generator().manual_seed(4)
    keep = torch.rand(3, 1, 11, 11, generator=gen) < 0.5
    keep[0, 0, 2] = False  # a row with no key
    bias = normalize_mask(keep, None, batch=3, heads=4, dtype=dtype, device=q.device)
    out, lse = block_attention(q, k, v, softmax_scale=0.4, bias=bias, kernels=[kernel])
    want = reference(q, k, v, bias[:, 0], 0.4, None, "front")
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert (out.double() - want).abs().max() <= tol
    assert torch.isneginf(lse[0, :, 2]).all() and (out[0, 2] == 0).all()
    kk, vv = (t.repeat_interleave(2, dim=2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * 0.4 + bias.double()
    live = ~torch.isneginf(s).all(-1)
    assert (lse.double() - torch.logsumexp(s, -1))[live].abs().max() <= tol * 10


def test_local_attention_with_masks_matches_sdpa():
    q, k, v = random_qkv(5, 2, 9, 4, 4, 8, torch.float64)
    keep = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) < 0.6
    keep[:, 0] = True
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                          attn_mask=keep[:, None, None]).transpose(1, 2)
    for kw in (dict(key_padding_mask=keep), dict(attn_mask=keep[:, None, None]),
               dict(attn_mask=torch.zeros(2, 1, 1, 9, dtype=torch.float64).masked_fill(~keep[:, None, None], -1e30))):
        out = attention(q, k, v, **kw)
        assert (out - want).abs().max() < 1e-12, kw
    from sp_kernels.attn import Attention

    assert (Attention()(q, k, v, key_padding_mask=keep) - want).abs().max() < 1e-12
    # Per-head masks run on the local path.
    per_head = torch.rand(2, 4, 9, 9, generator=torch.Generator().manual_seed(2)) < 0.7
    per_head[..., 0] = True
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=per_head).transpose(1, 2)
    assert (attention(q, k, v, attn_mask=per_head) - want).abs().max() < 1e-12
    # A row with no key: zeros (SDPA: NaN).
    dead = keep.clone()
    dead[1] = False
    out = attention(q, k, v, key_padding_mask=dead)
    assert (out[1] == 0).all() and torch.isfinite(out).all()


def test_classify_kinds():
    def bias(keep):
        return torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))

    assert classify(bias(torch.ones(2, 1, 1, 5, dtype=torch.bool))) is None
    cut = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    cut[0, ..., 3:] = False
    cut[1, ..., 1:] = False
    assert classify(bias(cut)).lengths == [3, 1]
    holes = cut.clone()
    holes[0, ..., 1] = False
    assert classify(bias(holes)).bias is not None
    additive = torch.zeros(1, 1, 1, 5, dtype=torch.float64)
    additive[..., 0] = 0.5
    assert classify(additive).bias is not None


def test_end_cut_takes_maskless_kernel(monkeypatch):
    """An end cut runs the maskless kernels on each sample's prefix, never a masked kernel."""
    from sp_kernels.attn import local

    def refuse(*a, **k):
        raise AssertionError("a masked kernel ran for an end-cut mask")

    monkeypatch.setattr(local, "_run_cpu_flash_masked", refuse)
    monkeypatch.setattr(local, "_run_math_masked", refuse)
    kernels = [local.BlockKernel(kern.name, kern.decline, kern.run, refuse if kern.run_masked else None)
               for kern in local._KERNELS]
    monkeypatch.setattr(local, "_KERNELS", kernels)
    q, k, v = random_qkv(8, 2, 7, 2, 2, 8, torch.float64)
    keep = torch.zeros(2, 7, dtype=torch.bool)
    keep[0, :5] = True
    keep[1, :2] = True
    out = attention(q, k, v, key_padding_mask=keep)
    bias = torch.zeros(2, 1, 1, 7, dtype=torch.float64).masked_fill(~keep[:, None, None], float("-inf"))
    assert (out - reference(q, k, v, bias[:, 0], 8**-0.5, None, "front")).abs().max() < 1e-12


def test_bench_masks_quick():
    """benchmarks/bench_masks.py --quick runs end to end (so the benchmark cannot rot)."""
    from tests.op_utils import run_quick_bench_lines

    lines = run_quick_bench_lines("bench_masks.py")
    assert "holes / none" in lines[-4] and lines[-2].startswith("ulysses") and lines[-1].startswith("ring"), lines


def test_kernel_without_mask_support_declines():
    from sp_kernels.attn.local import NoKernelError

    q, k, v = random_qkv(2, 1, 4, 2, 2, 8, torch.float32)
    bias = torch.zeros(1, 1, 1, 4)
    bias[..., 1] = float("-inf")
    with pytest.raises(NoKernelError, match=r"with an attention mask.*\n.*cudnn: takes no attention mask"):
        block_attention(q, k, v, bias=bias, kernels=["cudnn"])
    with pytest.raises(ValueError, match=r"bias has shape \(1, 1, 1, 3\)"):
        block_attention(q, k, v, bias=bias[..., :3])


def test_kernel_choice_per_mask_shape(rank_pool):
    """End cuts (and a padded prompt in joint attention) run the maskless kernels under every backend;
    only holes take a masked kernel."""
    from tests.mask_cases import kernel_choice

    base = dict(batch=2, seq=9, heads=2, kv_heads=2, head_dim=8, dtype="float64", mode="pad", form="kpm",
                frame="full", joint=3, strategy="front")
    cases = []
    for i, (backend, deg) in enumerate((("ulysses", (2, 1)), ("ring", (1, 2)), ("usp", (2, 1)))):
        for kind, masked in (("text_endcut", False), ("endcut", False), ("holes", True)):
            cases.append(dict(base, backend=backend, degrees=deg, kind=kind, seed=900 + 10 * i, expect=masked))
    per_rank = rank_pool(2).run(kernel_choice, cases)
    for i, case in enumerate(cases):
        for rank, res in enumerate(r[i] for r in per_rank):
            assert "error" not in res and res["err"] <= res["tol"], (case, res)
            assert (res["masked"] > 0) == case["expect"], (case, rank, res)
            if case["backend"] == "ulysses" and case["kind"] == "text_endcut":
                assert res["split"] == 1, (case, rank, res)


def test_local_frame_mask_gathered_once_per_forward(rank_pool):
    from tests.mask_cases import memo_check

    for res in rank_pool(2).run(memo_check):
        assert res["counts"] == [1, 0, 1] and res["err"] < 1e-12, res
