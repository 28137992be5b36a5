"""The native extension ``sp_kernels._C``, loaded lazily and never fatally.

Importing sp_kernels must work without the extension (not built, built for another torch, no CUDA
runtime, no GPU): every op has a pure-torch fallback, and the reason the extension is missing is kept
so that ``build_info()`` and errors from a forced native implementation can say why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import threading
from typing import Any

import torch

NAMESPACE = "sp_kernels"

_lock = threading.Lock()
_attempted = False
_loaded = False
_error: str | None = None
_native_info: dict[str, Any] | None = None


def load() -> bool:
    """Import ``sp_kernels._C`` once (registering its ops); True when it is loaded."""
    global _attempted, _loaded, _error, _native_info
    if _attempted:
        return _loaded
    with _lock:
        if _attempted:
            return _loaded
        try:
            importlib.import_module("sp_kernels._C")
            _native_info = json.loads(torch.ops.sp_kernels._build_info())
            _loaded = True
        except Exception as exc:  # any failure means "no native ops"; the reason is kept
            _error = f"{type(exc).__name__}: {exc}"
            _loaded = False
        _attempted = True
    return _loaded


def native_error() -> str | None:
    """Why the extension is not available (None when it is loaded)."""
    load()
    return _error


def has_native_kernel(op_name: str, device_type: str) -> bool:
    """Whether ``sp_kernels::<op_name>`` has a native kernel for ``device_type`` ("cpu", "cuda", ...)."""
    if not load():
        return False
    qualname = op_name if "::" in op_name else f"{NAMESPACE}::{op_name}"
    return _has_kernel(qualname, _dispatch_key(device_type))


@functools.lru_cache(maxsize=256)
def _has_kernel(qualname: str, key: str | None) -> bool:
    # Asked on every op call (implementation choice). The extension registers its kernels when it is
    # imported, before any query, and never after; the two dispatcher lookups cost 20 us per call
    # once a large copy has evicted the caches.
    if key is None or not torch._C._dispatch_has_kernel(qualname):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)


def _dispatch_key(device_type: str) -> str | None:
    keys = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta", "xpu": "XPU", "mps": "MPS", "hip": "HIP"}
    return keys.get(device_type)


def _package_version() -> str:
    try:
        return importlib.metadata.version("sp_kernels")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source tree that was never installed: the native build knows its version.
        return (_native_info or {}).get("version", "unknown")


def _module_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, Any]:
    """What this installation can run: the native build, optional libraries, and the runtime.

    Optional packages are located with ``importlib.util.find_spec``, never imported: importing
    flash-attn, for one, initialises CUDA and can take seconds.
    """
    native = load()
    info = _native_info or {}
    triton_available = importlib.util.find_spec("triton") is not None
    flash_attn_available = any(
        importlib.util.find_spec(name) is not None for name in ("flash_attn_interface", "flash_attn")
    )
    return {
        "version": _package_version(),
        "native_extension": native,
        "native_error": _error,
        "cpu_kernels": bool(native and info.get("cpu_kernels", False)),
        # False means every native CPU kernel runs on one thread (see setup.py's openmp_flags).
        "cpu_openmp": bool(native and info.get("cpu_openmp", False)),
        "cuda_kernels": bool(native and info.get("cuda_kernels", False)),
        "cuda_archs": list(info.get("cuda_archs", [])) if native else [],
        "built_with_torch": info.get("built_with_torch") if native else None,
        "built_with_cuda": info.get("built_with_cuda") if native else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_available": triton_available,
        "triton_version": _module_version("triton") if triton_available else None,
        "flash_attn_available": flash_attn_available,
        "gpu_available": torch.cuda.is_available(),
    }
