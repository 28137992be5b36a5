"""Triton kernels on CPU tensors, in this process, under Triton's interpreter.

Triton fixes at decoration time whether a ``@triton.jit`` kernel is compiled or interpreted (it reads
``TRITON_INTERPRET`` then). ``use_interpreter`` loads a second copy of ``sp_kernels.ops.triton.<name>``
with the interpreter on, puts it where sp_kernels.ops looks the module up, and for the test sets
``TRITON_INTERPRET=1`` (so the dispatcher lets Triton take CPU tensors) and ``SP_KERNELS_IMPL=triton``.
Triton's own library functions (``tl.zeros``, ``tl.max``'s combine function, ...) were decorated
compiled when triton was imported; a call to one from interpreted code runs it interpreted too, as a
process started under ``TRITON_INTERPRET=1`` would. The monkeypatch undoes all of it; the compiled
module, its kernels and their caches are untouched, so interpreter and ahead-of-time tests share one
pytest process.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@functools.cache
def interpreted_module(name: str) -> ModuleType:
    """A private copy of ``sp_kernels.ops.triton.<name>`` whose kernels run in the interpreter."""
    full = f"sp_kernels.ops.triton.{name}"
    spec = importlib.util.find_spec(full)
    assert spec is not None and spec.loader is not None, full
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def use_interpreter(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """Route the ``triton`` implementation of the ops in ``name`` to the interpreted kernels."""
    package = importlib.import_module("sp_kernels.ops.triton")
    module = interpreted_module(name)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(package, name, module, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SP_KERNELS_IMPL", "triton")
    from triton.runtime.jit import JITFunction

    # A compiled JITFunction called from Python only ever raises ("outside of the scope of a kernel"),
    # so while the interpreter runs, such a call can only be a device call from interpreted code.
    monkeypatch.setattr(JITFunction, "__call__", _device_call, raising=True)
    return module


@functools.cache
def _interpreted_function(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _device_call(self, *args, **kwargs):
    return _interpreted_function(self.fn)(*args, **kwargs)
