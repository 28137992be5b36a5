"""Local block attention with log-sum-exp, through one adapter over whichever kernel is present.

Contract of every kernel (``block_attention`` enforces the shapes before any kernel runs):

* ``q`` ``[B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` (BSHD), ``Hq % Hkv == 0`` (GQA/MQA: query
  head ``h`` uses KV head ``h // (Hq // Hkv)``), last dim contiguous, other strides arbitrary.
* Returns ``(out, lse)``: ``out`` ``[B, Sq, Hq, D]`` in the input dtype; ``lse`` ``[B, Hq, Sq]``
  (BHS: the layout flash-attn and the aten ops produce, so no transpose sits on the hot path) in
  float32, or float64 when the inputs are float64, natural log, of the *scaled* scores.
* ``causal=True`` needs ``Sq == Sk`` (the only causal block SP produces is a diagonal one), so the
  top-left (torch) and bottom-right (flash-attn) conventions coincide.

Candidates in priority order: flash-attn 3 (``flash_attn_interface``), flash-attn 2 (``flash_attn``),
cuDNN (``aten._scaled_dot_product_cudnn_attention``), torch's flash op
(``aten._scaled_dot_product_flash_attention``), torch's memory-efficient op
(``aten._scaled_dot_product_efficient_attention``: the GPU kernel for fp32, and for fp16/bf16 shapes
the flash and cuDNN kernels reject), torch's CPU flash op, and a chunked math reference that runs on
any device. Each says why it declines; when none accepts, the error lists every reason.

The three aten GPU candidates first apply their own plain rules (SDPA toggle, CUDA tensor, compute
capability, dtype), then ask torch's own check, ``torch.backends.cuda.can_use_{cudnn,flash,
efficient}_attention(SDPAParams(...))``, about the exact call they would make (BHSD views, K/V at
the query head count, no mask, no dropout), so a shape the backend rejects (for cuDNN e.g. a key
length of 1, or head_dim above what this cuDNN and GPU support) declines to the next candidate
instead of failing inside the kernel. Torch's checks give no reason to Python (with ``debug=True``
they log it to stderr): set ``SP_KERNELS_SDPA_DEBUG=1`` to have them log. Where this torch lacks a
check (or ``SDPAParams``), that candidate falls back to fixed head_dim rules.

The GPU candidates were written from the documented APIs (flash-attn's ``flash_attn_func``
docstrings, the aten schemas of torch 2.14, torch's ``sdp_utils.cpp`` checks); which of them have run
where is in docs/status.md. tests/test_attention_local.py checks them against an fp64 reference on a
GPU (skipped without CUDA) and their selection/decline logic everywhere, with faked availability.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._alloc import new_buffer

Tensor = torch.Tensor
DeclineFn = Callable[[Tensor, Tensor, Tensor, bool], "str | None"]
RunFn = Callable[[Tensor, Tensor, Tensor, float, bool], "tuple[Tensor, Tensor]"]
# (q, k, v, scale, bias): bias is additive [Bm, Hm, Qm, Sk] (Bm 1 or B, Hm 1 or Hq, Qm 1 or Sq), -inf = excluded.
MaskedRunFn = Callable[[Tensor, Tensor, Tensor, float, Tensor], "tuple[Tensor, Tensor]"]

_HALF = (torch.float16, torch.bfloat16)
_EFFICIENT = (torch.float16, torch.bfloat16, torch.float32)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# "1": torch's SDPA checks run with debug=True and log why they reject (to stderr, from C++).
SDPA_DEBUG_ENV = "SP_KERNELS_SDPA_DEBUG"

# Score elements one math-reference chunk may hold: 16M fp32 = 64 MiB, so 16k tokens never build S x S.
MATH_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BlockKernel:
    """One candidate: ``decline`` returns a reason string or None (accepts); ``run`` computes.
    ``run_masked`` (None: the kernel takes no mask, and declines masked calls) computes with an additive bias."""

    name: str
    decline: DeclineFn
    run: RunFn
    run_masked: MaskedRunFn | None = None


class NoKernelError(ValueError):
    """No candidate accepts the inputs; ``reasons`` maps kernel name -> why it declined."""

    def __init__(self, what: str, reasons: dict[str, str]):
        self.reasons = reasons
        lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
        super().__init__(f"no local attention kernel accepts {what}:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Environment probes (module-level functions so CPU tests can fake a GPU or an installed package)


def _cuda_capability(t: Tensor) -> tuple[int, int] | None:
    if t.device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(t.device)


_IMPORTS: dict[str, tuple[object | None, str | None]] = {}


def _import(module: str, attr: str) -> tuple[object | None, str | None]:
    """Import ``module.attr`` once; (fn, None) or (None, reason). flash-attn stays optional."""
    key = f"{module}.{attr}"
    if key not in _IMPORTS:
        try:
            fn = getattr(importlib.import_module(module), attr)
            _IMPORTS[key] = (fn, None)
        except Exception as e:  # noqa: BLE001 - a broken wheel (ABI mismatch, missing .so) is "not usable", not fatal
            _IMPORTS[key] = (None, f"not installed ({type(e).__name__}: {e})")
    return _IMPORTS[key]


def reset_import_cache() -> None:
    """Forget import results (tests install fake modules; a long-lived process may install flash-attn)."""
    _IMPORTS.clear()


def _accepts_kwarg(fn: object, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _expand_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    # The aten fused ops are called with equal head counts: whether they broadcast GQA themselves
    # differs between torch versions and backends, and a copy of K/V is cheap next to attention.
    rep = heads // k.shape[2]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def _bhsd(t: Tensor) -> Tensor:
    return t.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# flash-attn 3 (Hopper build, module flash_attn_interface)


def _decline_flash3(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    fn, why = _import("flash_attn_interface", "flash_attn_func")
    if fn is None:
        return why
    cap = _cuda_capability(q)
    if cap is None:
        return f"needs a CUDA tensor, got device {q.device}"
    if cap[0] != 9:
        return f"built for Hopper (sm90), device is sm{cap[0]}{cap[1]}"
    if q.dtype not in _HALF:
        return f"dtype {q.dtype} not supported (float16/bfloat16)"
    d = q.shape[-1]
    if d > 256 or d % 8:
        return f"head_dim {d} not supported (a multiple of 8, at most 256)"
    return None


def _run_flash3(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    fn, _ = _import("flash_attn_interface", "flash_attn_func")
    kwargs: dict = {"softmax_scale": scale, "causal": causal}
    # Newer FA3 returns out alone unless return_attn_probs=True; the 2024 betas always returned (out, lse).
    if _accepts_kwarg(fn, "return_attn_probs"):
        kwargs["return_attn_probs"] = True
    res = fn(q, k, v, **kwargs)  # type: ignore[operator]
    if not isinstance(res, (tuple, list)) or len(res) < 2:
        raise RuntimeError("flash_attn_interface.flash_attn_func returned no softmax_lse; this version is not supported")
    out, lse = res[0], res[1]
    return out, lse[..., : q.shape[1]]


# ---------------------------------------------------------------------------------------------
# flash-attn 2 (module flash_attn)


def _decline_flash2(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    fn, why = _import("flash_attn", "flash_attn_func")
    if fn is None:
        return why
    cap = _cuda_capability(q)
    if cap is None:
        return f"needs a CUDA tensor, got device {q.device}"
    if cap < (8, 0):
        return f"needs sm80 or newer, device is sm{cap[0]}{cap[1]}"
    if q.dtype not in _HALF:
        return f"dtype {q.dtype} not supported (float16/bfloat16)"
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} not supported (at most 256)"
    return None


def _run_flash2(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    fn, _ = _import("flash_attn", "flash_attn_func")
    # return_attn_probs=True returns (out, softmax_lse [B, H, Sq] fp32, S_dmask); S_dmask is only
    # materialized with dropout > 0, so asking for the LSE costs nothing here.
    out, lse, _ = fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True)  # type: ignore[operator]
    return out, lse[..., : q.shape[1]]


# ---------------------------------------------------------------------------------------------
# torch's fused GPU ops (called through aten directly: SDPA's public function returns no LSE)


def _sdpa_checker(name: str) -> Callable | None:
    """``torch.backends.cuda.<name>`` (``can_use_cudnn_attention`` ...) when this torch has it and ``SDPAParams``."""
    if getattr(torch.backends.cuda, "SDPAParams", None) is None:
        return None
    return getattr(torch.backends.cuda, name, None)


def _sdpa_params(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> object:
    """``SDPAParams`` describing the aten call the candidates make: BHSD views, K/V at the query head count.

    The run repeats the KV heads (``_expand_kv``, a copy); here a view that repeats KV head 0 (head
    stride 0) stands in for the copy: same shape, dtype, device, last-dim stride and storage offset,
    nothing allocated. Torch's checks read metadata only (shapes, strides, offsets, dtype, device).
    """
    B, Sq, H, D = q.shape
    if k.shape[2] != H:
        k = k[:, :, :1].expand(B, k.shape[1], H, D)
        v = v[:, :, :1].expand(B, v.shape[1], H, D)
    args = (_bhsd(q), _bhsd(k), _bhsd(v), None, 0.0, causal)
    try:
        return torch.backends.cuda.SDPAParams(*args, False)  # torch >= 2.5: (..., is_causal, enable_gqa)
    except TypeError:
        return torch.backends.cuda.SDPAParams(*args)  # torch 2.4: no enable_gqa


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    # Torch's checks read the *current* device's properties: make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _sdpa_decline(check_name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    """Why ``torch.backends.cuda.<check_name>`` rejects the call (None: it accepts); the checker must exist."""
    check = _sdpa_checker(check_name)
    assert check is not None
    debug = os.environ.get(SDPA_DEBUG_ENV, "") == "1"
    try:
        with _on_device(q):
            ok = check(_sdpa_params(q, k, v, causal), debug)
    except Exception as e:  # noqa: BLE001 - a check that cannot run is a decline with its error, not a crash
        return f"torch.backends.cuda.{check_name} raised {type(e).__name__}: {e}"
    if ok:
        return None
    hint = "torch logged why above" if debug else f"{SDPA_DEBUG_ENV}=1 makes torch log why"
    return f"torch.backends.cuda.{check_name}() rejects these inputs ({hint})"


def _decline_torch_gpu(q: Tensor, enabled: bool, toggle: str) -> str | None:
    """The plain rules the cuDNN and flash aten ops share (each then asks torch's own check)."""
    if not enabled:
        return f"disabled by torch.backends.cuda.{toggle}(False)"
    cap = _cuda_capability(q)
    if cap is None:
        return f"needs a CUDA tensor, got device {q.device}"
    if cap < (8, 0):
        return f"needs sm80 or newer, device is sm{cap[0]}{cap[1]}"
    if q.dtype not in _HALF:
        return f"dtype {q.dtype} not supported (float16/bfloat16)"
    return None


def _decline_head_dim(q: Tensor, max_d: int, multiple: int = 8) -> str | None:
    # Fallback rules for a torch without the can_use_*_attention checks.
    d = q.shape[-1]
    if d > max_d or d % multiple:
        return f"head_dim {d} not supported (a multiple of {multiple}, at most {max_d})"
    return None


def _decline_cudnn(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    why = _decline_torch_gpu(q, torch.backends.cuda.cudnn_sdp_enabled(), "enable_cudnn_sdp")
    if why is not None:
        return why
    if _sdpa_checker("can_use_cudnn_attention") is not None:
        return _sdpa_decline("can_use_cudnn_attention", q, k, v, causal)
    # 128 is the head_dim every cuDNN 9 / sm80+ combination supports; larger needs newer cuDNN on Hopper.
    return _decline_head_dim(q, 128)


def _cudnn_op() -> Callable:
    return torch.ops.aten._scaled_dot_product_cudnn_attention


def _run_cudnn(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    B, Sq, H, _ = q.shape
    k, v = _expand_kv(k, v, H)
    # cuDNN is picky about strides; BSHD-contiguous (SDPA's usual layout) is what it is tested with.
    q, k, v = (t.contiguous() for t in (q, k, v))
    res = _cudnn_op()(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, False, scale=scale)
    # logsumexp is [B, H, Sq, 1] in torch >= 2.5 and [B, H, Sq] before; reshape covers both.
    return _bhsd(res[0]), res[1].reshape(B, H, Sq)


def _decline_torch_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    why = _decline_torch_gpu(q, torch.backends.cuda.flash_sdp_enabled(), "enable_flash_sdp")
    if why is not None:
        return why
    if _sdpa_checker("can_use_flash_attention") is not None:
        return _sdpa_decline("can_use_flash_attention", q, k, v, causal)
    return _decline_head_dim(q, 256)


def _torch_flash_op() -> Callable:
    return torch.ops.aten._scaled_dot_product_flash_attention


def _run_torch_flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    k, v = _expand_kv(k, v, q.shape[2])
    res = _torch_flash_op()(_bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), res[1]


# ---------------------------------------------------------------------------------------------
# torch's memory-efficient GPU op (CUTLASS, from xformers): fp32 as well as fp16/bf16, any head_dim
# that is a multiple of the GEMM alignment, strided inputs.


def _decline_torch_efficient(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if not torch.backends.cuda.mem_efficient_sdp_enabled():
        return "disabled by torch.backends.cuda.enable_mem_efficient_sdp(False)"
    cap = _cuda_capability(q)
    if cap is None:
        return f"needs a CUDA tensor, got device {q.device}"
    if q.dtype not in _EFFICIENT:
        return f"dtype {q.dtype} not supported (float16/bfloat16/float32)"
    if _sdpa_checker("can_use_efficient_attention") is not None:
        return _sdpa_decline("can_use_efficient_attention", q, k, v, causal)
    if cap < (5, 0):
        return f"needs sm50 or newer, device is sm{cap[0]}{cap[1]}"
    if q.dtype == torch.bfloat16 and cap < (8, 0):
        return f"bfloat16 needs sm80 or newer, device is sm{cap[0]}{cap[1]}"
    d = q.shape[-1]
    multiple = 8 if q.dtype in _HALF else 4
    if d % multiple:
        return f"head_dim {d} not supported (a multiple of {multiple} for {q.dtype})"
    return None


def _torch_efficient_op() -> Callable:
    return torch.ops.aten._scaled_dot_product_efficient_attention


def _run_torch_efficient(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    Sq = q.shape[1]
    k, v = _expand_kv(k, v, q.shape[2])
    # The CUTLASS kernel needs row strides that are multiples of its GEMM alignment (torch's check
    # looks at storage offsets only); views into a fused QKV buffer of aligned head_dim already are.
    align = 8 if q.dtype in _HALF else 4
    q, k, v = (t if all(st % align == 0 for st in t.stride()[:-1]) else t.contiguous() for t in (q, k, v))
    res = _torch_efficient_op()(_bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, scale=scale)
    # logsumexp is [B, H, Sq] padded along the sequence (to a multiple of 32 in torch 2.x on CUDA).
    return _bhsd(res[0]), res[1][..., :Sq]


def _fix_dead_rows(out: Tensor, lse: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Rows whose bias excludes every key: out 0, lse -inf (the kernels give 0 / NaN and a finite lse)."""
    dead = torch.isneginf(bias).all(dim=-1)  # [Bm, Hm, Qm]
    if not bool(dead.any()):
        return out, lse
    B, Sq, Hq, _ = out.shape
    dead = dead.expand(B, Hq, Sq)
    out = out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0)
    return out, lse.masked_fill(dead, float("-inf"))


def _run_torch_efficient_masked(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor) -> tuple[Tensor, Tensor]:
    # NOT RUN ON A GPU: attn_bias expanded to [B, H, Sq, Sk], its last dim padded to a multiple of 16
    # (the CUTLASS kernel's alignment) and sliced back, as torch's own SDPA does.
    B, Sq, H, _ = q.shape
    Sk = k.shape[1]
    k, v = _expand_kv(k, v, H)
    q, k, v = (t.contiguous() for t in (q, k, v))
    pad = (-Sk) % 16
    full = torch.zeros((B, H, Sq, Sk + pad), dtype=q.dtype, device=q.device)
    full[..., :Sk].copy_(bias.expand(B, H, Sq, Sk))
    res = _torch_efficient_op()(_bhsd(q), _bhsd(k), _bhsd(v), full[..., :Sk], True, 0.0, False, scale=scale)
    return _fix_dead_rows(_bhsd(res[0]), res[1][..., :Sq].float(), bias)


# ---------------------------------------------------------------------------------------------
# torch's CPU flash op: tiled, fp32 accumulation, GQA and strided inputs handled natively.


def _decline_cpu_flash(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if q.device.type != "cpu":
        return f"CPU only, got device {q.device}"
    if q.dtype not in _FLOATS:
        return f"dtype {q.dtype} not supported (float16/bfloat16/float32/float64)"
    return None


def _run_cpu_flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale
    )
    return _bhsd(out), lse


def _run_cpu_flash_masked(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, False, attn_mask=bias.to(q.dtype), scale=scale
    )
    return _fix_dead_rows(_bhsd(out), lse, bias)


# ---------------------------------------------------------------------------------------------
# Math reference: any device, fp32 accumulation (fp64 for fp64), chunked over queries.


def _decline_math(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str | None:
    if q.dtype not in _FLOATS:
        return f"dtype {q.dtype} not supported (float16/bfloat16/float32/float64)"
    return None


def _run_math(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, bias: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Query heads grouped under their KV head ([B, Hkv, g*rows, D]) make GQA a plain batched matmul.
    kt = k.permute(0, 2, 3, 1).to(acc)  # [B, Hkv, D, Sk]
    vh = v.permute(0, 2, 1, 3).to(acc)  # [B, Hkv, Sk, D]
    out = new_buffer((B, Sq, Hq, D), q.dtype, q.device)
    lse = new_buffer((B, Hq, Sq), acc, q.device)
    rows = max(1, min(Sq, MATH_CHUNK_ELEMENTS // max(1, B * Hq * Sk)))
    # In-place steps save a pass per op; with autograd recording they would clobber saved tensors.
    inplace = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    for s0 in range(0, Sq, rows):
        s1 = min(Sq, s0 + rows)
        c = s1 - s0
        qc = q[:, s0:s1].reshape(B, c, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, g * c, D).to(acc)
        s = (torch.matmul(qc, kt) * scale).view(B, Hkv, g, c, Sk)
        if causal:
            qpos = torch.arange(s0, s1, device=q.device).unsqueeze(1)
            masked = torch.arange(Sk, device=q.device).unsqueeze(0) > qpos
            s = s.masked_fill_(masked, float("-inf")) if inplace else s.masked_fill(masked, float("-inf"))
        if bias is not None:
            bc = bias[:, :, s0:s1] if bias.shape[2] > 1 else bias
            bc = bc.reshape(bc.shape[0], Hkv if bc.shape[1] > 1 else 1, g if bc.shape[1] > 1 else 1, bc.shape[2], Sk)
            s = s.add_(bc) if inplace else s + bc
            m = s.amax(dim=-1, keepdim=True)
            m = m.masked_fill(torch.isneginf(m), 0.0)  # a row with no key: p = 0, out 0, lse -inf
        else:
            m = s.amax(dim=-1, keepdim=True)
        p = s.sub_(m).exp_() if inplace else (s - m).exp()
        denom = p.sum(dim=-1, keepdim=True)
        safe = denom if bias is None else denom.masked_fill(denom == 0, 1.0)
        o = torch.matmul(p.view(B, Hkv, g * c, Sk), vh).view(B, Hkv, g, c, D) / safe
        out[:, s0:s1].view(B, c, Hkv, g, D).copy_(o.permute(0, 3, 1, 2, 4))
        lse[:, :, s0:s1].copy_((m + denom.log()).view(B, Hq, c))
    return out, lse


def _run_math_masked(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Tensor) -> tuple[Tensor, Tensor]:
    return _run_math(q, k, v, scale, False, bias)


# ---------------------------------------------------------------------------------------------
# Registry and dispatcher

_KERNELS: list[BlockKernel] = [
    BlockKernel("flash3", _decline_flash3, _run_flash3),
    BlockKernel("flash2", _decline_flash2, _run_flash2),
    BlockKernel("cudnn", _decline_cudnn, _run_cudnn),
    BlockKernel("torch_flash", _decline_torch_flash, _run_torch_flash),
    BlockKernel("torch_efficient", _decline_torch_efficient, _run_torch_efficient, _run_torch_efficient_masked),
    BlockKernel("cpu_flash", _decline_cpu_flash, _run_cpu_flash, _run_cpu_flash_masked),
    BlockKernel("math", _decline_math, _run_math, _run_math_masked),
]


def block_kernel_names() -> list[str]:
    return [kern.name for kern in _KERNELS]


def insert_by_name(registry: list, kernel, before: str | None, what: str) -> None:
    """Add (or replace, by name) ``kernel`` in a candidate list; ``before`` places it ahead of an existing one."""
    for i, existing in enumerate(registry):
        if existing.name == kernel.name:
            del registry[i]
            break
    if before is None:
        registry.append(kernel)
        return
    names = [k.name for k in registry]
    if before not in names:
        raise ValueError(f"{what}(before={before!r}): no kernel of that name; expected one of {names}")
    registry.insert(names.index(before), kernel)


def register_block_kernel(kernel: BlockKernel, *, before: str | None = None) -> None:
    """Add (or replace, by name) a candidate; ``before`` places it ahead of an existing one."""
    insert_by_name(_KERNELS, kernel, before, "register_block_kernel")


def _allowed(kernels: Sequence[str] | None) -> list[BlockKernel]:
    if kernels is None:
        env = os.environ.get("SP_KERNELS_BLOCK_KERNELS", "").strip()
        kernels = [s.strip() for s in env.split(",") if s.strip()] if env else None
    if kernels is None:
        return list(_KERNELS)
    unknown = [k for k in kernels if k not in block_kernel_names()]
    if unknown:
        raise ValueError(f"unknown block kernel name(s) {unknown}; expected names from {block_kernel_names()}")
    return [kern for kern in _KERNELS if kern.name in kernels]


def _describe(q: Tensor, k: Tensor, causal: bool, masked: bool = False) -> str:
    return (
        f"q {tuple(q.shape)} k/v {tuple(k.shape)} {q.dtype} on {q.device} "
        f"(head_dim {q.shape[-1]}, causal={causal}{', with an attention mask' if masked else ''})"
    )


def select_block_kernel(
    q: Tensor, k: Tensor, v: Tensor, causal: bool = False, kernels: Sequence[str] | None = None, masked: bool = False
) -> BlockKernel:
    """The first candidate (in priority order, restricted to ``kernels`` or $SP_KERNELS_BLOCK_KERNELS) that accepts;
    with ``masked`` only candidates that take an attention mask (``run_masked``)."""
    reasons: dict[str, str] = {}
    for kern in _allowed(kernels):
        if masked and kern.run_masked is None:
            reasons[kern.name] = "takes no attention mask"
            continue
        why = kern.decline(q, k, v, causal)
        if why is None:
            return kern
        reasons[kern.name] = why
    raise NoKernelError(_describe(q, k, causal, masked), reasons)


def _check_block_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"block_attention: {name} must be [B, S, H, D] (4 dims), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"block_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"block_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"block_attention: query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"block_attention: q/k/v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"block_attention: causal=True needs Sq == Sk, got {q.shape[1]} and {k.shape[1]}")


def _check_bias(q: Tensor, k: Tensor, causal: bool, bias: Tensor) -> None:
    B, Sq, Hq, _ = q.shape
    ok = (
        bias.dim() == 4 and bias.shape[0] in (1, B) and bias.shape[1] in (1, Hq) and bias.shape[2] in (1, Sq)
        and bias.shape[3] == k.shape[1] and bias.is_floating_point() and bias.device == q.device
    )
    if not ok:
        raise ValueError(
            f"block_attention: bias has shape {tuple(bias.shape)} ({bias.dtype} on {bias.device}); expected an additive "
            f"float mask [1 or {B}, 1 or {Hq}, 1 or {Sq}, {k.shape[1]}] on {q.device}"
        )
    if causal:
        raise ValueError("block_attention: causal=True with a bias is not supported; put the causal mask in the bias")


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    kernels: Sequence[str] | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, Sq, Hq, D], lse [B, Hq, Sq])`` of softmax(q k^T * scale + bias) v; see the module docstring.

    ``bias``: an additive mask ``[Bm, Hm, Qm, Sk]`` (Bm 1 or B, Hm 1 or Hq, Qm 1 or Sq; -inf = excluded,
    see attn/mask.py), run by a candidate that takes masks; a row that excludes every key gives out 0 and lse -inf.
    """
    _check_block_inputs(q, k, v, causal)
    if bias is not None:
        _check_bias(q, k, causal, bias)
    B, Sq, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if Sq == 0 or k.shape[1] == 0:
        # No keys: the softmax is empty. lse = -inf is the identity of the merge, out = 0 its value.
        out = torch.zeros((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return out, lse
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    kern = select_block_kernel(q, k, v, causal, kernels, masked=bias is not None)
    if bias is not None:
        out, lse = kern.run_masked(q, k, v, scale, bias)  # type: ignore[misc]
    else:
        out, lse = kern.run(q, k, v, scale, causal)
    return out, lse.to(lse_dtype(q.dtype))
