"""attention() front end: local path, input validation, backend resolution and registry, the module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sp_kernels
from sp_kernels.attn import Attention, attention, register_backend, registered_backends, resolve_backend
from sp_kernels.distributed.parallel_state import SequenceParallelConfig, SPState
from sp_kernels.plan.context import sp_forward_context
from tests.attention_reference import random_qkv, reference_attention


@pytest.mark.parametrize("strategy", ["front", "rear"])
@pytest.mark.parametrize("causal", [False, True])
def test_local_path_with_joint_tokens(strategy, causal):
    q, k, v = random_qkv(1, 2, 11, 6, 2, 16, torch.float64)
    jq, jk, jv = random_qkv(2, 2, 3, 6, 2, 16, torch.float64)
    out = attention(q, k, v, causal=causal, joint_query=jq, joint_key=jk, joint_value=jv, joint_strategy=strategy)
    ref = reference_attention(q, k, v, scale=0.25, causal=causal, joint=(jq, jk, jv), strategy=strategy)
    assert out.is_contiguous() and out.shape == (2, 14, 6, 16)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_local_cross_attention_and_top_level_export():
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64)
    _, k, v = random_qkv(3, 1, 9, 4, 2, 8, torch.float64)
    out = sp_kernels.attention(q, k, v, softmax_scale=0.7)
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.7), atol=1e-12, rtol=0)
    assert sp_kernels.Attention is Attention


@pytest.mark.parametrize(
    "code",
    [
        "import sp_kernels; sp_kernels.attention",
        "from sp_kernels import attention",
        "from sp_kernels import Attention",
        "import sp_kernels.attn; import sp_kernels; sp_kernels.attention",
    ],
)
def test_top_level_names_on_first_access(code):
    """docs/api.md: sp_kernels.attention / Attention, reached before anything imported the subpackage."""
    root = Path(__file__).resolve().parents[1]
    probe = code + "; import torch; q = torch.randn(1, 3, 2, 4); import sp_kernels as s; s.attention(q, q, q)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_outside_a_sharded_region_every_backend_is_local():
    state = SPState(config=SequenceParallelConfig(ulysses_degree=2))  # no process groups: never used here
    q, k, v = random_qkv(4, 1, 6, 2, 2, 8, torch.float64)
    ref = reference_attention(q, k, v, scale=8**-0.5)
    with sp_forward_context(state) as ctx:
        assert not ctx.sharded
        for backend in (None, "ulysses", "ring", "usp", "auto", "local"):
            torch.testing.assert_close(attention(q, k, v, backend=backend), ref, atol=1e-12, rtol=0)


def test_attention_module():
    q, k, v = random_qkv(5, 1, 6, 4, 2, 8, torch.float64)
    jq, jk, jv = random_qkv(6, 1, 2, 4, 2, 8, torch.float64)
    mod = Attention(softmax_scale=0.3, causal=True, joint_strategy="rear")
    assert "causal=True" in repr(mod) and "'rear'" in repr(mod)
    out = mod(q, k, v, jq, jk, jv)
    ref = reference_attention(q, k, v, scale=0.3, causal=True, joint=(jq, jk, jv), strategy="rear")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def _qkv(**shapes):
    base = dict(q=(1, 4, 4, 8), k=(1, 4, 2, 8), v=(1, 4, 2, 8))
    base.update(shapes)
    return [torch.randn(*base[n]) for n in ("q", "k", "v")]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=(1, 4, 2, 8), v=(1, 5, 2, 8)), r"key \[1, 4, 2, 8\] and value \[1, 5, 2, 8\]"),
        (dict(q=(2, 4, 4, 8)), r"batch of query \(2\) and key/value \(1\)"),
        (dict(q=(1, 4, 4, 16)), r"head_dim of query \(16\) and key/value \(8\)"),
        (dict(q=(1, 4, 3, 8)), r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
        (dict(q=(1, 4, 4)), r"query must be \[batch, seq, heads, head_dim\] \(4 dims\), got shape \[1, 4, 4\]"),
    ],
)
def test_shape_errors_name_given_and_expected(kwargs, match):
    q, k, v = _qkv(**kwargs)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_dtype_and_option_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"dtypes differ: torch.float32/torch.float64/torch.float32"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"joint_strategy='middle' is unknown; expected one of \['front', 'rear'\]"):
        attention(q, k, v, joint_strategy="middle")
    with pytest.raises(ValueError, match=r"backend='flash' is unknown; expected one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="softmax_scale must be a finite positive"):
        attention(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="key must be a torch.Tensor, got list"):
        attention(q, [1], v)


def test_joint_errors():
    q, k, v = _qkv()
    jq, jk, jv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"got \['joint_query', 'joint_key'\] but not \['joint_value'\]"):
        attention(q, k, v, joint_query=jq, joint_key=jk)
    with pytest.raises(ValueError, match=r"joint_query has shape \[1, 2, 3, 8\]; expected .* = \[1, 2, 4, 8\]"):
        attention(q, k, v, joint_query=torch.randn(1, 2, 3, 8), joint_key=jk, joint_value=jv)
    with pytest.raises(ValueError, match=r"joint_value has shape \[1, 3, 2, 8\]; expected \[1, 2, 2, 8\]"):
        attention(q, k, v, joint_query=jq, joint_key=jk, joint_value=torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match=r"joint_key is torch.float64 on cpu; expected torch.float32"):
        attention(q, k, v, joint_query=jq, joint_key=jk.double(), joint_value=jv)


def test_sharded_region_rejects_cross_attention():
    state = SPState(config=SequenceParallelConfig(ulysses_degree=2))
    q, k, v = _qkv()
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        with pytest.raises(ValueError, match="use backend='local'"):
            attention(q, k[:, :3], v[:, :3])


def test_resolve_backend_auto_and_registry():
    def state(u, r, backend="auto"):
        return SPState(config=SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=backend))

    assert resolve_backend(None, None) == "local"
    assert resolve_backend(None, state(1, 1)) == "local"
    assert resolve_backend(None, state(4, 1)) == "ulysses"
    assert resolve_backend(None, state(2, 2)) == "usp"
    assert resolve_backend("ring", state(2, 2)) == "ring"  # explicit names are not second-guessed here
    assert resolve_backend(None, state(1, 4, "usp")) == "usp"
    assert resolve_backend(None, state(1, 4)) == "fused_ring"
    assert set(registered_backends()) >= {"ulysses", "ring", "usp", "fused_ring"}
    with pytest.raises(ValueError, match="already registered"):
        register_backend("fused_ring", lambda call, valid: call.query)
    with pytest.raises(ValueError, match="not a backend name"):
        register_backend("mine", lambda call, valid: call.query)


def test_one_backend_table():
    """Config validation, "auto", the registry and the implementations all come from sp_kernels.attn.backends."""
    from sp_kernels.attn import backends, ring

    assert backends.BACKEND_NAMES == ("auto", "local", "ulysses", "ring", "usp", "fused_ring")
    assert registered_backends() == ("local", "ulysses", "ring", "usp", "fused_ring")
    for u, r in [(1, 1), (4, 1), (1, 4), (2, 2)]:
        for name, spec in backends.BACKENDS.items():
            fits = spec.unmet(u, r) is None
            try:
                SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=name)
                accepted = True
            except ValueError:
                accepted = False
            assert accepted == fits, (name, u, r)
        assert backends.BACKENDS[SequenceParallelConfig(ulysses_degree=u, ring_degree=r).resolved_backend()].unmet(
            u, r) is None
    assert backends.backend_function("fused_ring") is ring.fused_ring_attention
    assert backends.backend_function("ring") is ring.ring_attention

    def mine(call, valid):
        return call.query

    register_backend("usp", mine, replace=True)
    try:
        assert backends.backend_function("usp") is mine
    finally:
        backends.restore_backend("usp")
    assert backends.backend_function("usp") is not mine


def test_backend_table_imports_the_ring_module_on_first_use():
    code = (
        "import sys; from sp_kernels.attn.backends import backend_function; "
        "assert 'sp_kernels.attn.ring' not in sys.modules; "
        "assert backend_function('fused_ring').__name__ == 'fused_ring_attention'"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ambiguous_layouts_raise():
    from sp_kernels.plan.context import ShardLayout

    state = SPState(config=SequenceParallelConfig(ulysses_degree=2))
    q = torch.randn(1, 5, 2, 8)
    with sp_forward_context(state) as ctx:
        ctx.sharded = True
        ctx.record(ShardLayout(true_len=9, local_len=5, sp_size=2))
        ctx.record(ShardLayout(true_len=10, local_len=5, sp_size=2))
        with pytest.raises(ValueError, match=r"\(9, 0, 0\), \(10, 0, 0\)].*ambiguous"):
            attention(q, q, q)
