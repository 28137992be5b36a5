"""One set of argument checks, two spellings: every bad call that the native op rejects is rejected by
the Python checker (torch/Triton paths, fake impls) with the same message.

The Python message may add context after the native one (the tensor's shape and dtype, a hint), and
spells dtypes and shapes the C++ way once normalised (``torch.float16`` = ``Half``, ``(2, 3)`` =
``[2, 3]``); otherwise the two must agree word for word.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sp_kernels.ops import _ext

pk = importlib.import_module("sp_kernels.ops.pack")
sp = importlib.import_module("sp_kernels.ops.shard_pad")
mg = importlib.import_module("sp_kernels.ops.merge")

pytestmark = pytest.mark.skipif(
    not (pk.NATIVE_OPS_REGISTERED and mg.NATIVE_OPS_REGISTERED),
    reason=f"native extension not built or not loadable: {_ext.native_error()}",
)

_CPP_DTYPE = {
    "torch.float32": "Float", "torch.float64": "Double", "torch.float16": "Half", "torch.bfloat16": "BFloat16",
    "torch.int8": "Char", "torch.uint8": "Byte", "torch.int16": "Short", "torch.int32": "Int",
    "torch.int64": "Long", "torch.bool": "Bool",
}  # fmt: skip
_INT_TUPLE = re.compile(r"\((-?\d+(?:, -?\d+)*),?\)")


def normalise(message: str) -> str:
    for py, cpp in _CPP_DTYPE.items():
        message = message.replace(py, cpp)
    return _INT_TUPLE.sub(r"[\1]", message.splitlines()[0])


def _t(shape, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 3).to(dtype)


def _i8():
    return torch.ones(4, 3, dtype=torch.int8)


CASES = [
    ("pack_qkv", lambda: (_t((1, 2, 64, 2)).transpose(2, 3), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1])),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 5])),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 2, 2, 64), torch.float16), _t((1, 2, 2, 64)), 2, [0, 1])),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, list(range(2)) * 129)),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 0, [0, 1])),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 3, 2, 64)), _t((1, 2, 2, 64)), 2, [0, 1])),
    ("pack_qkv", lambda: (_t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), 2, [0])),
    ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)), 7, None, None, None, True)),
    ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)), -1, None, None, None, True)),
    ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)).transpose(2, 3), 2, None, None, None, True)),
    ("unpack_qkv", lambda: (_t((2, 3, 4, 64)), 2, None, None, None, True)),
    ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)), 3, _t((1, 2, 2, 64)), None, None, True)),
    ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)), 3, _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)), True)),
    ("pack_out", lambda: (_t((1, 7, 2, 64)), None, 2, 3, True)),
    ("pack_out", lambda: (_t((1, 5, 2, 64)), _t((1, 2, 3, 64)), 2, 3, True)),
    ("pack_out", lambda: (_t((1, 5, 2, 64)), None, 2, -1, True)),
    ("unpack_out", lambda: (_t((2, 1, 3, 4, 64)), 9)),
    ("unpack_out", lambda: (_t((2, 1, 3, 4, 64), torch.int32), 8)),
    ("shard_pad", lambda: (_t((4, 3)), 0, -1, 2, 0.0)),
    ("shard_pad", lambda: (_t((4, 3)), 0, 1, -2, 0.0)),
    ("shard_pad", lambda: (_t((4, 3)), 2, 1, 2, 0.0)),
    ("shard_pad", lambda: (torch.tensor(1.0), 0, 0, 1, 0.0)),
    ("shard_pad", lambda: (torch.ones(4, 3, dtype=torch.bool), 0, 0, 2, 0.5)),
    ("shard_pad", lambda: (_i8(), 0, 0, 2, 300.0)),
    ("shard_pad", lambda: (_i8(), 0, 0, 2, 0.5)),
    ("shard_pad", lambda: (_i8(), 0, 0, 2, float("nan"))),
    ("lse_merge_", lambda: (_t((1, 4, 2, 8)), _t((1, 2, 4)), _t((1, 4, 2, 8)), _t((1, 2, 5)))),
    ("lse_merge_", lambda: (_t((1, 4, 2, 8), torch.float16), _t((1, 2, 4)), _t((1, 4, 2, 8)), _t((1, 2, 4)))),
    ("lse_merge_", lambda: (_t((1, 4, 2, 8)), _t((1, 2, 4)), _t((1, 4, 2, 8)), _t((1, 2, 4), torch.float16))),
    ("lse_merge_", lambda: (_t((1, 4, 2, 8)), _t((1, 2, 4)), _t((1, 4, 2, 9)), _t((1, 2, 4)))),
    ("lse_merge_all", lambda: ([_t((1, 4, 2, 8)), _t((1, 4, 2, 9))], [_t((1, 2, 4)), _t((1, 2, 4))], torch.float32)),
    ("lse_merge_all", lambda: ([_t((1, 4, 2, 8)), _t((1, 4, 2, 8), torch.float16)], [_t((1, 2, 4))] * 2, torch.float32)),
    ("lse_merge_all", lambda: ([_t((1, 4, 2, 8))], [_t((1, 2, 4)), _t((1, 2, 4))], torch.float32)),
    ("lse_merge_all", lambda: ([_t((1, 4, 2, 8))], [_t((1, 2, 4))], torch.int32)),
]

_OPS = {
    "pack_qkv": pk.PACK_QKV, "unpack_qkv": pk.UNPACK_QKV, "pack_out": pk.PACK_OUT, "unpack_out": pk.UNPACK_OUT,
    "shard_pad": sp.SHARD_PAD, "lse_merge_": mg.LSE_MERGE_, "lse_merge_all": mg.LSE_MERGE_ALL,
}  # fmt: skip


CASE_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


@pytest.mark.parametrize("name,make", CASES, ids=CASE_IDS)
def test_python_and_native_checks_agree(name, make):
    op = _OPS[name]
    args = make()
    with pytest.raises(RuntimeError) as native:
        op.native(*args)
    with pytest.raises((ValueError, TypeError)) as python:
        op.check(*args)
    cpp, py = normalise(str(native.value)), normalise(str(python.value))
    assert py.startswith(cpp), f"\n native: {cpp}\n python: {py}"


# ---- every device: a bad call raises, it never takes the process down ------------------------------
#
# A native op that crashes on a bad argument (issue 13 saw a segfault on a CUDA tensor) would kill the
# pytest process and hide every later result, so each device's calls run in a child process that
# announces each case before making it: a crash is a failure naming the case, with the child's
# faulthandler stack. On every device the native error must be the CPU one, word for word.


def _on(value, device: str):
    if isinstance(value, torch.Tensor):
        return value.to(device)  # keeps the strides of the non-contiguous cases
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return type(value)(v.to(device) for v in value)
    return value


def _mixed_device_cases(device: str) -> list[tuple[str, object]]:
    """Calls whose tensors sit on two devices (only meaningful when ``device`` is not the CPU)."""
    return [
        ("pack_qkv", lambda: (_t((1, 2, 2, 64)).to(device), _t((1, 2, 2, 64)), _t((1, 2, 2, 64)).to(device), 2, [0, 1])),
        ("unpack_qkv", lambda: (_t((2, 1, 3, 4, 64)).to(device), 3, _t((1, 2, 2, 64)), _t((1, 2, 1, 64)),
                                _t((1, 2, 1, 64)), True)),
        ("pack_out", lambda: (_t((1, 5, 2, 64)).to(device), _t((1, 2, 2, 64)), 2, 3, True)),
        ("lse_merge_", lambda: (_t((1, 4, 2, 8)).to(device), _t((1, 2, 4)).to(device), _t((1, 4, 2, 8)), _t((1, 2, 4)))),
        ("lse_merge_all", lambda: ([_t((1, 4, 2, 8)).to(device), _t((1, 4, 2, 8))], [_t((1, 2, 4)).to(device)] * 2,
                                   torch.float32)),
    ]  # fmt: skip


def child_main(device: str) -> None:
    """Run in the child: every case on ``device``; one JSON line per case (``start`` before the call)."""
    cases = [(f"{n}-{i}", n, lambda make=make: tuple(_on(a, device) for a in make())) for i, (n, make) in enumerate(CASES)]
    if device != "cpu":
        cases += [(f"mixed-{n}-{i}", n, make) for i, (n, make) in enumerate(_mixed_device_cases(device))]
    for case_id, name, make in cases:
        print(json.dumps({"start": case_id}), flush=True)
        args = make()
        try:
            _OPS[name].native(*args)
        except RuntimeError as exc:
            message = normalise(str(exc))
        else:
            message = None
        if device != "cpu":
            torch.cuda.synchronize()  # an asynchronous fault shows here, inside its case
        print(json.dumps({"done": case_id, "message": message}), flush=True)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))],
)
def test_native_bad_calls_raise_on_every_device(device):
    root = Path(__file__).resolve().parent.parent
    code = f"from tests.test_op_messages import child_main; child_main({device!r})"
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=240)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [line["start"] for line in lines if "start" in line]
    done = {line["done"]: line["message"] for line in lines if "done" in line}
    crashed = [case for case in started if case not in done]
    assert proc.returncode == 0 and not crashed, (
        f"the child on {device} exited with {proc.returncode} during case {crashed[:1]} "
        f"(cases done: {len(done)} of {len(started)})\n{proc.stderr[-3000:]}"
    )
    assert len(done) >= len(CASES)
    for case_id, (name, make) in zip(CASE_IDS, CASES):
        assert done[case_id] is not None, f"{case_id} on {device}: the native op accepted a bad call"
        with pytest.raises(RuntimeError) as on_cpu:
            _OPS[name].native(*make())
        assert done[case_id] == normalise(str(on_cpu.value)), f"{case_id}: {device} and cpu errors differ"
    for case_id, message in done.items():
        if case_id.startswith("mixed-"):
            assert message is not None and " is on " in message, f"{case_id}: {message}"
