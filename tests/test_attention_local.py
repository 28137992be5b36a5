"""The local block-attention adapter: kernels against the reference, selection, and declines.

GPU candidates cannot run here. Their selection/decline logic runs with faked availability (a fake
flash-attn module, a faked CUDA capability, faked ``torch.backends.cuda.can_use_*_attention``
checks), their flash-attn call conventions run against fakes that compute the reference, and the
aten cuDNN/flash/memory-efficient calls run on ``meta`` tensors (real schema, shape-only kernels).
The GPU tests at the end compare those candidates with an fp64 reference; they skip without CUDA.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from sp_kernels.attn import local
from sp_kernels.attn.local import BlockKernel, NoKernelError, block_attention, select_block_kernel
from tests.attention_reference import random_qkv, reference_attention, reference_lse
from tests.poison import poisoned


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_cpu_kernels_match_reference(kernel, dtype, causal, heads, kv_heads):
    q, k, v = random_qkv(7, 2, 37, heads, kv_heads, 64, dtype)
    scale = 0.3
    out, lse = block_attention(q, k, v, softmax_scale=scale, causal=causal, kernels=[kernel])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lse.shape == (2, heads, 37)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=scale, causal=causal), atol=tol, rtol=0)
    torch.testing.assert_close(lse.double(), reference_lse(q, k, scale=scale, causal=causal), atol=tol, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_kernels_accept_strided_views_and_cross_lengths(kernel):
    # Ulysses hands kernels views into one [B, S, hq + 2*nkv, D] buffer.
    buf = torch.randn(2, 19, 4 + 2 + 2, 16, dtype=torch.float64)
    q, k, v = buf[:, :, :4], buf[:, :, 4:6], buf[:, :, 6:]
    out, _ = block_attention(q, k, v, kernels=[kernel])
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.25), atol=1e-12, rtol=0)
    kq = torch.randn(2, 5, 4, 16, dtype=torch.float64)  # Sq != Sk (non-causal)
    out, lse = block_attention(kq, k, v, kernels=[kernel])
    torch.testing.assert_close(out, reference_attention(kq, k, v, scale=0.25), atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, reference_lse(kq, k, scale=0.25), atol=1e-12, rtol=0)


def test_math_is_chunked_over_queries(monkeypatch):
    """No score matrix larger than the chunk budget is ever built, and chunking changes nothing."""
    q, k, v = random_qkv(3, 1, 3000, 2, 1, 16, torch.float32)
    whole, whole_lse = block_attention(q[:, :300], k, v, kernels=["math"])
    sizes = []
    real_matmul = torch.matmul

    def recording(a, b):
        res = real_matmul(a, b)
        sizes.append(res.numel())
        return res

    monkeypatch.setattr(torch, "matmul", recording)
    out, _ = block_attention(q, k, v, kernels=["math"])
    monkeypatch.undo()
    assert 2 * 3000 * 3000 > local.MATH_CHUNK_ELEMENTS  # the full score matrix would exceed the budget
    assert max(sizes) <= local.MATH_CHUNK_ELEMENTS and len(sizes) > 2
    ref = reference_attention(q, k, v, scale=0.25)
    assert (out.double() - ref).abs().max().item() < 1e-5
    torch.testing.assert_close(out[:, :300], whole)  # row results do not depend on the chunking
    monkeypatch.setattr(local, "MATH_CHUNK_ELEMENTS", 1000)
    small, small_lse = block_attention(q[:, :300], k, v, kernels=["math"])
    torch.testing.assert_close(small, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(small_lse, whole_lse, atol=1e-6, rtol=0)


def test_bf16_accumulates_in_fp32():
    q, k, v = random_qkv(5, 1, 300, 2, 2, 64, torch.bfloat16)
    ref = reference_attention(q, k, v, scale=0.125)
    for kernel in ("cpu_flash", "math"):
        out, lse = block_attention(q, k, v, kernels=[kernel])
        assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
        # One bf16 rounding of the output (~2^-9 relative) dominates; fp16-style accumulation would not fit.
        assert (out.double() - ref).abs().max().item() <= 2 * 2**-8 * ref.abs().max().item()


def test_empty_blocks_give_identity_of_merge():
    q = torch.randn(1, 3, 2, 8)
    out, lse = block_attention(q, torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8))
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all() and lse.shape == (1, 2, 3)
    out, lse = block_attention(torch.randn(1, 0, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 2, 0)


def test_poisoned_outputs_are_fully_written(monkeypatch):
    q, k, v = random_qkv(9, 2, 33, 6, 3, 16, torch.float32)
    monkeypatch.setattr(local, "MATH_CHUNK_ELEMENTS", 500)  # many chunks, each must land
    with poisoned():
        out, lse = block_attention(q, k, v, kernels=["math"], causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize(
    "shapes,causal,match",
    [
        (((1, 4, 2, 8), (1, 4, 2), (1, 4, 2, 8)), False, "4 dims"),
        (((1, 4, 2, 8), (1, 4, 2, 8), (1, 5, 2, 8)), False, "same shape"),
        (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), False, "multiple of key/value heads"),
        (((2, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), False, "batch and head_dim"),
        (((1, 4, 2, 8), (1, 5, 2, 8), (1, 5, 2, 8)), True, "causal=True needs Sq == Sk"),
    ],
)
def test_block_input_errors(shapes, causal, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        block_attention(q, k, v, causal=causal)


def test_block_dtype_device_errors():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share dtype"):
        block_attention(q, q.double(), q)


# ---------------------------------------------------------------------------------------------
# Selection with faked environments


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors look like tensors on a GPU of the requested capability; fake flash-attn modules."""
    calls: list[tuple[str, dict]] = []

    def ref_out_lse(q, k, v, scale, causal):
        out = reference_attention(q, k, v, scale=scale, causal=causal).to(q.dtype)
        return out, reference_lse(q, k, scale=scale, causal=causal).float()

    def fa2_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append(("flash2", dict(dropout_p=dropout_p, scale=softmax_scale, causal=causal, probs=return_attn_probs)))
        out, lse = ref_out_lse(q, k, v, softmax_scale, causal)
        return (out, lse, None) if return_attn_probs else out

    def fa3_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                 v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                 pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        calls.append(("flash3", dict(scale=softmax_scale, causal=causal, probs=return_attn_probs)))
        out, lse = ref_out_lse(q, k, v, softmax_scale, causal)
        return (out, lse) if return_attn_probs else out

    def fa3_beta_func(q, k, v, softmax_scale=None, causal=False):
        calls.append(("flash3-beta", dict(scale=softmax_scale, causal=causal)))
        return ref_out_lse(q, k, v, softmax_scale, causal)

    # checks: torch.backends.cuda.can_use_*_attention stand-ins by name; absent = a torch without them.
    state = {"cap": (9, 0), "checks": {}}

    def install(fa2: bool = True, fa3: str | None = "current"):
        local.reset_import_cache()
        for name in ("flash_attn", "flash_attn_interface"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        if fa2:
            monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fa2_func))
        else:
            monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
        if fa3 is not None:
            fn = fa3_func if fa3 == "current" else fa3_beta_func
            monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=fn))
        else:
            monkeypatch.setitem(sys.modules, "flash_attn_interface", None)

    monkeypatch.setattr(local, "_cuda_capability", lambda t: state["cap"])
    monkeypatch.setattr(local, "_sdpa_checker", lambda name: state["checks"].get(name))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    yield types.SimpleNamespace(install=install, calls=calls, state=state)
    local.reset_import_cache()


def test_selection_priority_with_fakes(fake_gpu):
    q, k, v = random_qkv(1, 1, 8, 4, 2, 64, torch.bfloat16)
    fake_gpu.install(fa2=True, fa3="current")
    assert select_block_kernel(q, k, v).name == "flash3"
    fake_gpu.state["cap"] = (8, 0)  # Ampere: no FA3
    assert select_block_kernel(q, k, v).name == "flash2"
    fake_gpu.install(fa2=False, fa3=None)
    assert select_block_kernel(q, k, v).name == "cudnn"
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        assert select_block_kernel(q, k, v).name == "torch_flash"
        q8, k8, v8 = random_qkv(1, 1, 8, 4, 2, 200, torch.bfloat16)  # head_dim 200: too big for cuDNN anyway
        assert select_block_kernel(q8, k8, v8).name == "torch_flash"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    qf, kf, vf = random_qkv(1, 1, 8, 4, 2, 64, torch.float32)  # fp32: no GPU fused kernel takes it
    fake_gpu.install(fa2=True, fa3="current")
    fake_gpu.state["cap"] = (9, 0)
    with pytest.raises(NoKernelError) as err:
        select_block_kernel(qf, kf, vf, kernels=["flash3", "flash2", "cudnn", "torch_flash"])
    assert set(err.value.reasons) == {"flash3", "flash2", "cudnn", "torch_flash"}
    assert all("dtype torch.float32" in why for why in err.value.reasons.values())


def test_unsupported_head_dim_lists_every_reason(fake_gpu, monkeypatch):
    fake_gpu.install(fa2=True, fa3="current")
    q, k, v = random_qkv(1, 1, 8, 2, 2, 512, torch.bfloat16)
    monkeypatch.setenv("SP_KERNELS_BLOCK_KERNELS", "flash3,flash2,cudnn,torch_flash")
    with pytest.raises(NoKernelError) as err:
        block_attention(q, k, v)
    msg = str(err.value)
    assert "head_dim 512" in msg and "q (1, 8, 2, 512)" in msg
    for name in ("flash3", "flash2", "cudnn", "torch_flash"):
        assert f"{name}: head_dim 512 not supported" in msg
    monkeypatch.delenv("SP_KERNELS_BLOCK_KERNELS")
    # The memory-efficient kernel has no head_dim ceiling (a multiple of 8 for bf16).
    assert select_block_kernel(q, k, v).name == "torch_efficient"
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        assert select_block_kernel(q, k, v).name == "cpu_flash"  # the real device is the CPU after all
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(True)


def test_declines_without_gpu_or_packages():
    local.reset_import_cache()
    q, k, v = random_qkv(1, 1, 8, 2, 2, 64, torch.float16)
    with pytest.raises(NoKernelError) as err:
        select_block_kernel(q, k, v, kernels=["flash3", "flash2", "cudnn", "torch_flash"])
    reasons = err.value.reasons
    for name in ("flash3", "flash2"):
        assert "not installed" in reasons[name] or "needs a CUDA tensor" in reasons[name]
    assert "needs a CUDA tensor" in reasons["torch_flash"]
    with pytest.raises(NoKernelError, match="torch_efficient: needs a CUDA tensor, got device cpu"):
        select_block_kernel(q, k, v, kernels=["torch_efficient"])
    qi = torch.zeros(1, 4, 2, 8, dtype=torch.int32)
    with pytest.raises(NoKernelError, match="math: dtype torch.int32 not supported"):
        block_attention(qi, qi, qi)
    with pytest.raises(ValueError, match="unknown block kernel"):
        select_block_kernel(q, k, v, kernels=["nope"])


@pytest.mark.parametrize("variant", ["current", "beta"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_call_conventions(fake_gpu, variant, causal):
    """Our calls match flash_attn_func's documented signatures and return values (fakes compute the reference)."""
    q, k, v = random_qkv(2, 2, 16, 6, 3, 64, torch.bfloat16)
    fake_gpu.install(fa2=True, fa3=variant)
    out, lse = block_attention(q, k, v, softmax_scale=0.2, causal=causal)
    name, kwargs = fake_gpu.calls[-1]
    assert name == ("flash3" if variant == "current" else "flash3-beta")
    assert kwargs["scale"] == 0.2 and kwargs["causal"] is causal
    if variant == "current":
        assert kwargs["probs"] is True
    torch.testing.assert_close(lse, reference_lse(q, k, scale=0.2, causal=causal).float())
    fake_gpu.state["cap"] = (8, 6)
    out2, lse2 = block_attention(q, k, v, softmax_scale=0.2, causal=causal)
    assert fake_gpu.calls[-1] == ("flash2", dict(dropout_p=0.0, scale=0.2, causal=causal, probs=True))
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("runner", [local._run_cudnn, local._run_torch_flash, local._run_torch_efficient])
def test_aten_gpu_calls_on_meta_tensors(runner):
    """The real aten schemas accept our arguments and the outputs come back as [B,S,H,D] / [B,H,S]."""
    q = torch.empty(2, 40, 8, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 40, 2, 64, device="meta", dtype=torch.bfloat16)
    for causal in (False, True):
        out, lse = runner(q, kv, kv, 0.125, causal)
        assert out.shape == (2, 40, 8, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 8, 40) and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq", [40, 32, 1])
def test_efficient_call_on_meta_tensors_slices_padded_lse(dtype, sq):
    # torch's meta kernel pads the LSE along the sequence to a multiple of 32, as the CUDA one does.
    q = torch.empty(2, sq, 6, 40, device="meta", dtype=dtype)
    kv = torch.empty(2, 33, 3, 40, device="meta", dtype=dtype)
    raw = local._torch_efficient_op()(q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), None, True, 0.0)
    assert raw[1].shape[:2] == (2, 6) and raw[1].shape[2] >= sq
    out, lse = local._run_torch_efficient(q, kv, kv, 0.1, False)
    assert out.shape == (2, sq, 6, 40) and out.dtype == dtype
    assert lse.shape == (2, 6, sq) and lse.dtype == torch.float32


def test_efficient_call_convention(monkeypatch):
    """Arguments of the aten call (BHSD, K/V repeated to the query heads) and the LSE slice, with a fake op."""
    q, k, v = random_qkv(3, 2, 37, 6, 2, 16, torch.float32)
    seen = {}

    def fake_op(qb, kb, vb, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
        seen.update(q=qb, k=kb, v=vb, bias=attn_bias, lse=compute_log_sumexp, p=dropout_p, causal=is_causal)
        seen["scale"] = scale
        qs, ks, vs = (t.transpose(1, 2) for t in (qb, kb, vb))  # back to BSHD: same heads everywhere
        out = reference_attention(qs, ks, vs, scale=scale, causal=is_causal).to(qs.dtype).transpose(1, 2)
        lse = reference_lse(qs, ks, scale=scale, causal=is_causal).float()
        padded = torch.full((*lse.shape[:2], 64), float("nan"))  # pad to a multiple of 32 with garbage
        padded[..., : lse.shape[-1]] = lse
        return out, padded, torch.empty(()), torch.empty(())

    monkeypatch.setattr(local, "_torch_efficient_op", lambda: fake_op)
    for causal in (False, True):
        out, lse = local._run_torch_efficient(q, k, v, 0.3, causal)
        assert seen["q"].shape == (2, 6, 37, 16) and seen["k"].shape == seen["v"].shape == (2, 6, 37, 16)
        assert seen["bias"] is None and seen["lse"] is True and seen["p"] == 0.0
        assert seen["causal"] is causal and seen["scale"] == 0.3
        assert out.shape == q.shape and lse.shape == (2, 6, 37)
        torch.testing.assert_close(lse.double(), reference_lse(q, k, scale=0.3, causal=causal), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=0.3, causal=causal), atol=1e-5, rtol=0)
    # A strided view whose row stride is not a multiple of the GEMM alignment is made contiguous.
    buf = torch.randn(2, 37, 6 * 16 + 1)
    local._run_torch_efficient(buf[..., :96].unflatten(-1, (6, 16)), k, v, 0.3, False)
    assert seen["q"].is_contiguous() is False and seen["q"].transpose(1, 2).is_contiguous()


# ---------------------------------------------------------------------------------------------
# torch's own backend checks (torch.backends.cuda.can_use_*_attention)


def test_sdpa_params_describe_the_call_without_copies():
    q, k, v = random_qkv(6, 2, 9, 6, 2, 16, torch.bfloat16)
    k5 = torch.randn(2, 5, 2, 16).bfloat16()
    for causal, kk in ((True, k), (False, k5)):
        p = local._sdpa_params(q, kk, kk, causal)
        assert p.query.shape == (2, 6, 9, 16) and p.key.shape == p.value.shape == (2, 6, kk.shape[1], 16)
        assert p.is_causal is causal and p.attn_mask is None and p.dropout == 0.0
        assert p.key.stride(-1) == 1 and p.key.stride(1) == 0  # repeated KV head: a view, no copy
        assert p.key.data_ptr() == kk.data_ptr() and p.query.data_ptr() == q.data_ptr()
        assert getattr(p, "enable_gqa", False) is False  # heads already equal, as in the call
    p = local._sdpa_params(q, q, q, False)
    assert p.key.shape == (2, 6, 9, 16) and p.key.stride() == q.transpose(1, 2).stride()


def test_sdpa_params_on_torch_2_4_signature(monkeypatch):
    class Params24:  # torch 2.4: SDPAParams(query, key, value, attn_mask, dropout, is_causal)
        def __init__(self, query, key, value, attn_mask, dropout, is_causal):
            self.query, self.key, self.is_causal = query, key, is_causal

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", Params24)
    q, k, v = random_qkv(6, 1, 4, 4, 1, 8, torch.float16)
    p = local._sdpa_params(q, k, v, True)
    assert isinstance(p, Params24) and p.key.shape == (1, 4, 4, 8) and p.is_causal is True


def test_sdpa_checker_missing_on_older_torch(monkeypatch):
    assert local._sdpa_checker("can_use_efficient_attention") is torch.backends.cuda.can_use_efficient_attention
    monkeypatch.delattr(torch.backends.cuda, "can_use_cudnn_attention")
    assert local._sdpa_checker("can_use_cudnn_attention") is None
    monkeypatch.delattr(torch.backends.cuda, "SDPAParams")
    assert local._sdpa_checker("can_use_flash_attention") is None


@pytest.mark.parametrize(
    "name,check",
    [
        ("cudnn", "can_use_cudnn_attention"),
        ("torch_flash", "can_use_flash_attention"),
        ("torch_efficient", "can_use_efficient_attention"),
    ],
)
def test_torch_check_rejection_declines_to_next_candidate(fake_gpu, monkeypatch, name, check):
    """Issue 13: a shape the backend's own torch check rejects moves on to the next candidate with a reason."""
    fake_gpu.install(fa2=False, fa3=None)
    calls = []

    def rejecting(params, debug=False):
        calls.append((tuple(params.query.shape), tuple(params.key.shape), params.is_causal, debug))
        return False

    fake_gpu.state["checks"] = {c: (lambda p, d=False: True) for c in _CHECKS}
    fake_gpu.state["checks"][check] = rejecting
    q, k, v = random_qkv(2, 1, 12, 4, 2, 64, torch.bfloat16)
    names = ["cudnn", "torch_flash", "torch_efficient", "cpu_flash"]
    chosen = select_block_kernel(q, k, v, causal=True, kernels=names[names.index(name) :])
    assert chosen.name == names[names.index(name) + 1]
    assert calls == [((1, 4, 12, 64), (1, 4, 12, 64), True, False)]
    why = local._KERNELS[local.block_kernel_names().index(name)].decline(q, k, v, True)
    assert why == f"torch.backends.cuda.{check}() rejects these inputs (SP_KERNELS_SDPA_DEBUG=1 makes torch log why)"
    monkeypatch.setenv("SP_KERNELS_SDPA_DEBUG", "1")
    assert "torch logged why" in local._KERNELS[local.block_kernel_names().index(name)].decline(q, k, v, True)
    assert calls[-1][-1] is True
    with pytest.raises(NoKernelError, match=rf"{name}: torch.backends.cuda.{check}\(\) rejects"):
        select_block_kernel(q, k, v, kernels=[name])


_CHECKS = ("can_use_cudnn_attention", "can_use_flash_attention", "can_use_efficient_attention")


def test_torch_checks_replace_head_dim_rules(fake_gpu):
    # With torch's checks present they decide: head_dim 256 on cuDNN (newer cuDNN on Hopper) is theirs to allow.
    fake_gpu.install(fa2=False, fa3=None)
    q, k, v = random_qkv(2, 1, 8, 2, 2, 256, torch.bfloat16)
    assert "head_dim 256 not supported" in local._decline_cudnn(q, k, v, False)  # no checks: fixed rules
    fake_gpu.state["checks"] = {c: (lambda p, d=False: True) for c in _CHECKS}
    assert select_block_kernel(q, k, v).name == "cudnn"
    # The plain rules still come first, with their own reasons.
    qf, kf, vf = random_qkv(2, 1, 8, 2, 2, 64, torch.float32)
    for name in ("cudnn", "torch_flash"):
        assert "dtype torch.float32 not supported" in local._KERNELS[local.block_kernel_names().index(name)].decline(
            qf, kf, vf, False
        )
    assert local._decline_torch_efficient(qf, kf, vf, False) is None
    q64 = random_qkv(2, 1, 8, 2, 2, 64, torch.float64)[0]
    assert "dtype torch.float64 not supported" in local._decline_torch_efficient(q64, q64, q64, False)


def test_torch_check_that_raises_is_a_decline(fake_gpu):
    fake_gpu.install(fa2=False, fa3=None)

    def broken(params, debug=False):
        raise RuntimeError("CUDA driver version is insufficient")

    fake_gpu.state["checks"] = {"can_use_cudnn_attention": broken}
    q, k, v = random_qkv(2, 1, 8, 2, 2, 64, torch.float16)
    why = local._decline_cudnn(q, k, v, False)
    assert why == "torch.backends.cuda.can_use_cudnn_attention raised RuntimeError: CUDA driver version is insufficient"
    assert select_block_kernel(q, k, v, kernels=["cudnn", "torch_flash"]).name == "torch_flash"


def test_efficient_selection_and_declines(fake_gpu):
    """fp32 on a GPU takes the memory-efficient kernel, not the math reference; its declines say why."""
    fake_gpu.install(fa2=True, fa3="current")
    qf, kf, vf = random_qkv(1, 1, 8, 4, 2, 64, torch.float32)
    assert select_block_kernel(qf, kf, vf).name == "torch_efficient"
    fake_gpu.state["cap"] = (7, 5)
    assert select_block_kernel(qf, kf, vf).name == "torch_efficient"  # fp32 before sm80 too
    qb, kb, vb = random_qkv(1, 1, 8, 4, 2, 64, torch.bfloat16)
    assert "bfloat16 needs sm80 or newer, device is sm75" in local._decline_torch_efficient(qb, kb, vb, False)
    fake_gpu.state["cap"] = (9, 0)
    q6, k6, v6 = random_qkv(1, 1, 8, 4, 2, 6, torch.float32)
    assert "head_dim 6 not supported (a multiple of 4 for torch.float32)" in local._decline_torch_efficient(
        q6, k6, v6, False
    )
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    try:
        with pytest.raises(NoKernelError, match=r"torch_efficient: disabled by torch.backends.cuda.enable_mem_eff"):
            select_block_kernel(qf, kf, vf, kernels=["torch_efficient"])
        assert select_block_kernel(qf, kf, vf).name == "cpu_flash"
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(True)
    names = local.block_kernel_names()
    assert names.index("torch_flash") + 1 == names.index("torch_efficient") == names.index("cpu_flash") - 1


def test_register_block_kernel_order_and_replace(monkeypatch):
    monkeypatch.setattr(local, "_KERNELS", list(local._KERNELS))
    seen = []

    def run(q, k, v, scale, causal):
        seen.append(scale)
        return local._run_math(q, k, v, scale, causal)

    local.register_block_kernel(BlockKernel("mine", lambda q, k, v, c: None, run), before="cpu_flash")
    names = local.block_kernel_names()
    assert names.index("mine") == names.index("cpu_flash") - 1
    q, k, v = random_qkv(4, 1, 5, 2, 2, 8, torch.float64)
    out, _ = block_attention(q, k, v, softmax_scale=0.5)
    assert seen == [0.5]
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.5))
    local.register_block_kernel(BlockKernel("mine", lambda q, k, v, c: "never", run))
    assert local.block_kernel_names()[-1] == "mine" and local.block_kernel_names().count("mine") == 1
    with pytest.raises(ValueError, match="no kernel of that name"):
        local.register_block_kernel(BlockKernel("x", lambda *a: None, run), before="nope")


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = random_qkv(8, 1, 6, 2, 2, 32, torch.float64)
    out, _ = block_attention(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=1 / math.sqrt(32)))


@pytest.mark.parametrize("kernel", ["cpu_flash", "math"])
def test_local_kernels_are_differentiable(kernel):
    """The local path supports autograd (the SP backends do not, yet)."""
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 5, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: block_attention(*t, kernels=[kernel], causal=True), (q, k, v))


# ---------------------------------------------------------------------------------------------
# On a GPU: the aten candidates against the fp64 reference (skip without CUDA)

GPU = torch.cuda.is_available()
GPU_SKIP = "needs a CUDA GPU (the cudnn/torch_flash/torch_efficient candidates run only there)"
# Output error bound relative to max|ref|: one rounding of the output dtype plus accumulation (fp32
# inputs may go through TF32-class tensor-core math in the memory-efficient kernel).
_OUT_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3}
_LSE_TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 5e-3}


def _check_gpu_against_reference(q, k, v, scale, causal, kernel):
    why = local._KERNELS[local.block_kernel_names().index(kernel)].decline(q, k, v, causal)
    if why is not None:
        pytest.skip(f"{kernel} declines on this GPU: {why}")
    out, lse = block_attention(q, k, v, softmax_scale=scale, causal=causal, kernels=[kernel])
    torch.cuda.synchronize()
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    ref = reference_attention(qc, kc, vc, scale=scale, causal=causal)
    ref_lse = reference_lse(qc, kc, scale=scale, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= _OUT_TOL[q.dtype] * ref.abs().max().item(), (kernel, err)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=_LSE_TOL[q.dtype], rtol=0)


@pytest.mark.skipif(not GPU, reason=GPU_SKIP)
@pytest.mark.parametrize("kernel", ["cudnn", "torch_flash", "torch_efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128)])
def test_gpu_aten_candidates_match_reference(kernel, dtype, causal, heads, kv_heads, head_dim):
    # Sq = 77 is not a multiple of 32: the memory-efficient op's padded LSE must be sliced.
    q, k, v = (t.cuda() for t in random_qkv(11, 2, 77, heads, kv_heads, head_dim, dtype))
    if kernel != "torch_efficient" and dtype == torch.float32:
        assert "dtype torch.float32 not supported" in local._KERNELS[local.block_kernel_names().index(kernel)].decline(
            q, k, v, causal
        )
        return
    _check_gpu_against_reference(q, k, v, 0.2, causal, kernel)


@pytest.mark.skipif(not GPU, reason=GPU_SKIP)
def test_gpu_fp32_takes_efficient_kernel_and_strided_views():
    # Issue 13: fp32 on a GPU fell to the Python-chunked math kernel.
    buf = torch.randn(2, 45, 8 + 2 + 2, 64, device="cuda")  # Ulysses-style views into one buffer
    q, k, v = buf[:, :, :8], buf[:, :, 8:10], buf[:, :, 10:]
    names = [n for n in local.block_kernel_names() if n not in ("flash3", "flash2")]
    assert select_block_kernel(q, k, v, kernels=names).name == "torch_efficient"
    _check_gpu_against_reference(q, k, v, 0.125, False, "torch_efficient")
    _check_gpu_against_reference(q[:, :, :2], k, v, 0.125, True, "torch_efficient")


@pytest.mark.skipif(not GPU, reason=GPU_SKIP)
def test_gpu_shape_cudnn_rejects_falls_through():
    # Issue 13: cuDNN was chosen on dtype and head_dim alone; a key length of 1 is one shape its own
    # check (torch 2.14) rejects. The adapter must decline it and still return the right answer.
    q = torch.randn(2, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert local._decline_cudnn(q, kv, kv, False) is not None
    names = [n for n in local.block_kernel_names() if n not in ("flash3", "flash2")]
    out, lse = block_attention(q, kv, kv, softmax_scale=0.125, kernels=names)
    ref = reference_attention(q.cpu(), kv.cpu(), kv.cpu(), scale=0.125)
    assert (out.cpu().double() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    torch.testing.assert_close(lse.cpu().double(), reference_lse(q.cpu(), kv.cpu(), scale=0.125), atol=1e-2, rtol=0)
