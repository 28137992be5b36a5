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
    # InterpretedFunction.__call__ would do this, but it patches triton.language for the callee and never
    # undoes it: a callee from triton's own library (tl.max's combine function, whose module sees
    # ``triton.language.core``) leaves tl.core's builtins interpreted for the rest of the process, and
    # a later ahead-of-time compile then fails ("'block_argument' object has no attribute 'dtype'").
    # Same steps, with the patches undone when the call returns.
    from triton.runtime import interpreter

    function = _interpreted_function(self.fn)
    # Older tritons return no scope to undo with: then a snapshot of what the interpreter patches.
    snapshot = None if hasattr(interpreter, "_LangPatchScope") else _language_snapshot()
    scope = interpreter._patch_lang(function.fn)
    try:
        return function.rewrite()(*args, **kwargs)
    except Exception as exc:
        raise interpreter.InterpreterError(repr(exc)) from exc
    finally:
        if snapshot is None:
            scope.restore()
        else:
            _restore_language(snapshot)


def _language_objects() -> list:
    """What the interpreter patches: the language modules and the tensor classes."""
    import triton.language as tl

    return [tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", tl.core.tensor)]


def _language_snapshot() -> list[tuple[object, dict]]:
    return [(obj, dict(vars(obj))) for obj in _language_objects()]


def _restore_language(snapshot: list[tuple[object, dict]]) -> None:
    for obj, saved in snapshot:
        for name in [n for n in vars(obj) if n not in saved]:
            delattr(obj, name)
        for name, value in saved.items():
            if vars(obj).get(name, _MISSING) is not value:
                setattr(obj, name, value)


_MISSING = object()


def language_changes(snapshot: list[tuple[object, dict]]) -> list[str]:
    """What the interpreter left patched in triton.language since ``snapshot`` (tests: nothing may).

    A name replaced since, or added by the interpreter (its lambdas and properties); restoring an
    inherited attribute into the class (``__repr__``) or a lazily filled one is no change."""
    changed = []
    for obj, saved in snapshot:
        for name, value in vars(obj).items():
            if name in saved:
                moved = saved[name] is not value
            else:
                moved = getattr(getattr(value, "fget", value), "__module__", "") == "triton.runtime.interpreter"
            if moved:
                changed.append(f"{getattr(obj, '__name__', obj)}.{name}")
    return sorted(changed)
