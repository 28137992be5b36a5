"""The local block-attention adapter: kernels against the reference, selection, and declines.

GPU candidates cannot run here. Their selection/decline logic runs with faked availability (a fake
flash-attn module, a faked CUDA capability), their flash-attn call conventions run against fakes
that compute the reference, and the aten cuDNN/flash calls run on ``meta`` tensors (real schema,
shape-only kernels).
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
    monkeypatch.setenv("SP_KERNELS_POISON", "1")
    q, k, v = random_qkv(9, 2, 33, 6, 3, 16, torch.float32)
    monkeypatch.setattr(local, "MATH_CHUNK_ELEMENTS", 500)  # many chunks, each must land
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

    state = {"cap": (9, 0)}

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
    assert select_block_kernel(q, k, v).name == "cpu_flash"  # the real device is the CPU after all


def test_declines_without_gpu_or_packages():
    local.reset_import_cache()
    q, k, v = random_qkv(1, 1, 8, 2, 2, 64, torch.float16)
    with pytest.raises(NoKernelError) as err:
        select_block_kernel(q, k, v, kernels=["flash3", "flash2", "cudnn", "torch_flash"])
    reasons = err.value.reasons
    for name in ("flash3", "flash2"):
        assert "not installed" in reasons[name] or "needs a CUDA tensor" in reasons[name]
    assert "needs a CUDA tensor" in reasons["torch_flash"]
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


@pytest.mark.parametrize("runner", [local._run_cudnn, local._run_torch_flash])
def test_aten_gpu_calls_on_meta_tensors(runner):
    """The real aten schemas accept our arguments and the outputs come back as [B,S,H,D] / [B,H,S]."""
    q = torch.empty(2, 40, 8, 64, device="meta", dtype=torch.bfloat16)
    kv = torch.empty(2, 40, 2, 64, device="meta", dtype=torch.bfloat16)
    for causal in (False, True):
        out, lse = runner(q, kv, kv, 0.125, causal)
        assert out.shape == (2, 40, 8, 64) and out.dtype == torch.bfloat16
        assert lse.shape == (2, 8, 40) and lse.dtype == torch.float32


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
