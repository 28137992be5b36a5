"""sp_kernels::shard_pad: native op and pure-torch fallback against an independent reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sp_kernels.ops import _ext
from tests.op_utils import OpRecorder, force_impl

# The submodule, not the function sp_kernels.ops re-exports under the same name.
sp_mod = importlib.import_module("sp_kernels.ops.shard_pad")

NATIVE = sp_mod.NATIVE_OPS_REGISTERED
NATIVE_SKIP = f"native extension not built or not loadable: {_ext.native_error()}"
CUDA_READY = torch.cuda.is_available() and _ext.has_native_kernel("shard_pad", "cuda")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_DTYPES = FLOAT_DTYPES + [torch.int32, torch.int64, torch.int8, torch.uint8, torch.int16, torch.bool]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and CUDA kernels in the build"),
    ),
]

IMPLS = [
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)),
    "torch",
]


def expected_shard_pad(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> torch.Tensor:
    """Independent reference: cat of the in-range slice and a full block of padding."""
    dim = dim % x.dim()
    n = x.size(dim)
    take = max(0, min(n - start, length))
    pad_shape = list(x.shape)
    pad_shape[dim] = length - take
    pad = torch.full(pad_shape, pad_value, dtype=x.dtype, device=x.device)
    return torch.cat([x.narrow(dim, min(start, n), take), pad], dim=dim)


def random_tensor(shape, dtype: torch.dtype, device: str = "cpu", generator=None) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool().to(device)
    if dtype == torch.uint8:
        return torch.randint(1, 255, shape, generator=generator, dtype=torch.uint8).to(device)
    if not dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, generator=generator).to(dtype).to(device)
    # Offset away from zero so no element can be confused with a zero pad or zero-filled memory.
    return (torch.randn(shape, generator=generator, dtype=torch.float64) + 5.0).to(dtype).to(device)


def pad_for(dtype: torch.dtype) -> float:
    if dtype == torch.bool:
        return 1.0
    if dtype == torch.uint8:
        return 0.0  # random uint8 data is drawn from [1, 255), so 0 marks padding unambiguously
    return -7.0 if not dtype.is_floating_point else -3.25


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    monkeypatch.setenv("SP_KERNELS_IMPL", request.param)
    return request.param


def run_and_check(x: torch.Tensor, dim: int, start: int, length: int, pad_value: float) -> torch.Tensor:
    y = sp_mod.shard_pad(x, dim, start, length, pad_value)
    want = expected_shard_pad(x, dim, start, length, pad_value)
    assert y.shape == want.shape, (y.shape, want.shape)
    assert y.dtype == x.dtype and y.device == x.device
    assert y.is_contiguous()
    assert torch.equal(y, want), f"mismatch for shape={tuple(x.shape)} dim={dim} start={start} length={length}"
    if y.numel() and x.numel():
        assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), "output must be a new tensor"
    return y


# (shape, dim, start, length): inside, straddling the end, exactly at the end, past the end,
# length 0, whole sequence, whole + padding, first/middle/last/negative dims, B > 1.
CASES = [
    ((3, 10, 4), 1, 0, 4),
    ((3, 10, 4), 1, 2, 5),
    ((3, 10, 4), 1, 8, 4),
    ((3, 10, 4), 1, 10, 3),
    ((3, 10, 4), 1, 15, 2),
    ((3, 10, 4), 1, 3, 0),
    ((3, 10, 4), 1, 0, 10),
    ((3, 10, 4), 1, 0, 13),
    ((3, 10, 4), 0, 1, 3),
    ((3, 10, 4), 0, 2, 4),
    ((3, 10, 4), -1, 1, 6),
    ((3, 10, 4), 2, 3, 2),
    ((17,), 0, 12, 8),
    ((17,), -1, 0, 17),
    ((2, 13, 3, 8), 1, 9, 7),  # [B, S, H, D] with S not divisible by 2: the last rank's shard
    ((2, 13, 3, 8), -3, 0, 7),
    ((1, 5, 2, 3), 1, 7, 4),
    ((4, 6, 5), -2, 5, 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-s{c[2]}-l{c[3]}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_matches_reference(impl, device, case, dtype):
    shape, dim, start, length = case
    x = random_tensor(shape, dtype, device)
    run_and_check(x, dim, start, length, pad_for(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_all_dtypes(impl, device, dtype):
    x = random_tensor((2, 11, 3), dtype, device)
    run_and_check(x, 1, 6, 8, pad_for(dtype))
    run_and_check(x, -1, 1, 4, pad_for(dtype))


def _non_contiguous_inputs(device: str):
    base = random_tensor((4, 12, 6), torch.float32, device)
    yield "transposed", base.transpose(1, 2)
    yield "strided", base[:, ::2, :]
    yield "sliced_inner", base[..., 1:5]
    yield "expanded", random_tensor((1, 12, 1), torch.float32, device).expand(3, 12, 5)
    yield "channels_last", random_tensor((2, 3, 9, 5), torch.float32, device).to(memory_format=torch.channels_last)
    yield "offset_contiguous", base.flatten()[3:].view(-1, 3)  # contiguous, storage offset breaks 16B alignment


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_non_contiguous_inputs(impl, device, dim):
    for name, x in _non_contiguous_inputs(device):
        n = x.size(dim)
        for start, length in ((0, n), (n // 2, n), (1, max(n - 2, 0)), (n + 1, 2)):
            try:
                run_and_check(x, dim, start, length, 9.5)
            except AssertionError as exc:
                raise AssertionError(f"{name} input, start={start}, length={length}: {exc}") from exc


@pytest.mark.parametrize("dim", [1, -1])
def test_large_input_split_across_threads(impl, dim):
    # Far above the CPU kernel's 256 KiB grain: several tasks, whose boundaries fall inside copy runs,
    # inside padding runs and on the copy/pad edge.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(3)
        x = random_tensor((3, 50_000, 3), torch.float32, generator=g)
        n = x.size(dim)
        run_and_check(x, dim, n // 3, n // 2 + n // 3, -1.5)  # straddles the end: copy then pad
        run_and_check(x, dim, 0, n, -1.5)
    finally:
        torch.set_num_threads(threads)


def test_nan_and_inf_pad(impl):
    x = random_tensor((2, 5, 3), torch.float32)
    y = sp_mod.shard_pad(x, 1, 3, 4, float("nan"))
    assert torch.equal(y[:, :2], x[:, 3:])
    assert torch.isnan(y[:, 2:]).all()
    y = sp_mod.shard_pad(x.half(), 1, 3, 4, float("-inf"))
    assert torch.equal(y[:, :2], x[:, 3:].half())
    assert torch.isneginf(y[:, 2:]).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    data=st.data(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8]),
)
def test_random_geometry(impl, shape, data, dtype):
    x = random_tensor(tuple(shape), dtype)
    if len(shape) >= 2 and data.draw(st.booleans(), label="transpose"):
        x = x.transpose(0, -1)
    ndim = x.dim()
    dim = data.draw(st.integers(-ndim, ndim - 1), label="dim")
    start = data.draw(st.integers(0, x.size(dim) + 3), label="start")
    length = data.draw(st.integers(0, x.size(dim) + 3), label="length")
    run_and_check(x, dim, start, length, pad_for(dtype))


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("forced", [None, "native", "torch"])
def test_dispatch_choice(monkeypatch, forced):
    force_impl(monkeypatch, forced)
    x = random_tensor((2, 6, 3), torch.float32)
    with OpRecorder() as rec:
        sp_mod.shard_pad(x, 1, 4, 4)
    native_called = any("sp_kernels.shard_pad" in op for op in rec.ops)
    assert native_called == (forced != "torch"), rec.ops


def test_forced_impl_errors(monkeypatch):
    x = random_tensor((2, 6), torch.float32)
    monkeypatch.setenv("SP_KERNELS_IMPL", "triton")
    with pytest.raises(RuntimeError, match="shard_pad has no triton implementation"):
        sp_mod.shard_pad(x, 1, 0, 3)
    monkeypatch.setenv("SP_KERNELS_IMPL", "cuda")
    with pytest.raises(ValueError, match="SP_KERNELS_IMPL must be one of"):
        sp_mod.shard_pad(x, 1, 0, 3)


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_opcheck():
    op = torch.ops.sp_kernels.shard_pad.default
    samples = [
        (random_tensor((2, 7, 3), torch.float32).requires_grad_(), 1, 3, 6, 0.5),
        (random_tensor((2, 7, 3), torch.float64).requires_grad_(), -1, 1, 4, -1.0),
        (random_tensor((5, 4), torch.float32).t().requires_grad_(), 0, 2, 3, 0.0),
        (random_tensor((6, 2), torch.float32), 0, 9, 2, 1.0),
        (random_tensor((6, 2), torch.bfloat16), 0, 0, 0, 1.0),
        (random_tensor((3, 8), torch.int64), 1, 5, 5, 4.0),
    ]
    for args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dim,start,length", [(1, 3, 6), (1, 0, 4), (-1, 2, 5), (0, 1, 1), (1, 9, 3)])
def test_gradcheck(impl, dim, start, length):
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda t: sp_mod.shard_pad(t, dim, start, length, 0.75)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gradient_values(impl):
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, 3, dtype=torch.float64)
    sp_mod.shard_pad(x, 1, 4, 5, 2.0).backward(grad_y)
    want = torch.zeros_like(x)
    want[:, 4:] = grad_y[:, :2]
    assert torch.equal(x.grad, want)


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
def test_torch_compile_fullgraph(monkeypatch):
    # Inductor compiles C++ on CPU: about 20-40 s on two cores, which is why this is one test only.
    monkeypatch.delenv("SP_KERNELS_IMPL", raising=False)
    torch._dynamo.reset()

    def f(t: torch.Tensor) -> torch.Tensor:
        return (sp_mod.shard_pad(t * 2.0, 1, 3, 6, -1.0) + 1.0).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    x = random_tensor((2, 7, 5), torch.float32).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out_ref = f(x_ref)
    torch.testing.assert_close(out, out_ref)
    out.backward()
    out_ref.backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # Rows before start never reach the output; the shard's rows all do (x is offset away from zero).
    assert torch.equal(x.grad[:, :3], torch.zeros_like(x.grad[:, :3]))
    assert (x.grad[:, 3:] != 0).all()


BAD_INPUTS = [
    (
        lambda: (random_tensor((2, 5), torch.float32), 2, 0, 1, 0.0),
        ValueError,
        r"dim must be in \[-2, 2\) for x of shape \(2, 5\), got 2",
    ),
    (lambda: (random_tensor((2, 5), torch.float32), -3, 0, 1, 0.0), ValueError, r"dim must be in \[-2, 2\)"),
    (
        lambda: (random_tensor((2, 5), torch.float32), 1, -1, 1, 0.0),
        ValueError,
        r"start must be >= 0, got -1 \(x of shape \(2, 5\)",
    ),
    (lambda: (random_tensor((2, 5), torch.float32), 1, 0, -2, 0.0), ValueError, r"length must be >= 0, got -2"),
    (
        lambda: (torch.randn(2, 5, dtype=torch.complex64), 1, 0, 1, 0.0),
        ValueError,
        r"unsupported dtype torch.complex64 for x \(supported: .*\); x has shape \(2, 5\)",
    ),
    (lambda: (torch.tensor(3.0), 0, 0, 1, 0.0), ValueError, r"at least one dimension"),
    (lambda: (random_tensor((2, 5), torch.int32), 1, 0, 1, 0.5), ValueError, r"pad_value must be an integer in"),
    (
        lambda: (random_tensor((2, 5), torch.int8), 1, 0, 1, 300.0),
        ValueError,
        r"pad_value must be an integer in \[-128, 127\]",
    ),
    (lambda: (random_tensor((2, 5), torch.bool), 1, 0, 1, 2.0), ValueError, r"pad_value must be 0 or 1 for dtype bool"),
    (lambda: (random_tensor((2, 5), torch.float32), 1, 1.5, 1, 0.0), TypeError, r"start must be an int, got float"),
    (lambda: ([1.0, 2.0], 0, 0, 1, 0.0), TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,pattern", BAD_INPUTS)
def test_bad_inputs_python(impl, make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sp_mod.shard_pad(*make())


NATIVE_BAD_INPUTS = [
    ((2, 5), torch.float32, 1, -1, 1, 0.0, "shard_pad: start must be >= 0, got -1"),
    ((2, 5), torch.float32, 1, 0, -1, 0.0, "shard_pad: length must be >= 0, got -1"),
    ((2, 5), torch.float32, 2, 0, 1, 0.0, "shard_pad: dim must be in [-2, 2) for x of shape [2, 5], got 2"),
    ((2, 5), torch.complex64, 1, 0, 1, 0.0, "shard_pad: unsupported dtype ComplexFloat for x"),
    ((2, 5), torch.int32, 1, 0, 1, 0.5, "shard_pad: pad_value must be an integer in [-2147483648, 2147483647] for dtype Int, got 0.5"),
    ((2, 5), torch.int8, 1, 0, 1, 300.0, "shard_pad: pad_value must be an integer in [-128, 127] for dtype Char, got 300"),
    ((2, 5), torch.bool, 1, 0, 1, 2.0, "shard_pad: pad_value must be 0 or 1 for dtype bool, got 2"),
    ((), torch.float32, 0, 0, 1, 0.0, "shard_pad: x must have at least one dimension"),
]


@pytest.mark.skipif(not NATIVE, reason=NATIVE_SKIP)
@pytest.mark.parametrize("shape,dtype,dim,start,length,pad,message", NATIVE_BAD_INPUTS)
def test_bad_inputs_native(shape, dtype, dim, start, length, pad, message):
    x = torch.randn(shape, dtype=dtype) if dtype.is_complex else random_tensor(shape, dtype)
    with pytest.raises(RuntimeError) as info:
        torch.ops.sp_kernels.shard_pad(x, dim, start, length, pad)
    assert message in str(info.value)


@pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and CUDA kernels in the build")
def test_cuda_alignment_paths_and_stream():
    # Row sizes and offsets that select each copy unit (16, 8, 4, 2, 1 bytes) in the CUDA kernel.
    for dtype, inner, offset in [
        (torch.float32, 8, 0),
        (torch.float32, 8, 1),
        (torch.float16, 4, 0),
        (torch.float16, 3, 1),
        (torch.uint8, 5, 3),
        (torch.bfloat16, 1, 0),
        (torch.float64, 3, 1),
    ]:
        flat = random_tensor((offset + 3 * 41 * inner,), dtype, "cuda")
        x = flat[offset:].view(3, 41, inner)
        run_and_check(x, 1, 30, 16, pad_for(dtype))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = random_tensor((2, 1 << 16, 8), torch.float32, "cuda")
        y = sp_mod.shard_pad(x, 1, 40_000, 32_768, 1.0)
    stream.synchronize()
    assert torch.equal(y, expected_shard_pad(x, 1, 40_000, 32_768, 1.0))


def test_complex_tensors_shard_through_their_real_view():
    # Qwen-Image's rope table is complex64; sharding goes through view_as_real, padding with 0 + 0j.
    from sp_kernels.plan.sharding import _shard

    x = torch.randn(7, 4, dtype=torch.complex64)
    for rank in range(3):
        out, local = _shard(x, 0, 3, rank)
        ref = torch.zeros(3, 4, dtype=torch.complex64)
        rows = x[rank * 3 : rank * 3 + 3]
        ref[: rows.shape[0]] = rows
        assert local == 3 and out.dtype == torch.complex64 and torch.equal(out, ref)
