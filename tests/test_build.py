"""The build as installed: build_info(), kernel registration, and life without the extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sp_kernels
from sp_kernels.ops import _ext

EXPECTED_TYPES = {
    "version": str,
    "native_extension": bool,
    "native_error": (str, type(None)),
    "cpu_kernels": bool,
    "cpu_openmp": bool,
    "cuda_kernels": bool,
    "cuda_archs": list,
    "built_with_torch": (str, type(None)),
    "built_with_cuda": (str, type(None)),
    "torch": str,
    "triton_available": bool,
    "triton_version": (str, type(None)),
    "flash_attn_available": bool,
    "gpu_available": bool,
}


def test_build_info_keys_and_types():
    info = _ext.build_info()
    missing = set(EXPECTED_TYPES) - set(info)
    assert not missing, f"build_info() lacks {sorted(missing)}"
    for key, types in EXPECTED_TYPES.items():
        assert isinstance(info[key], types), f"build_info()[{key!r}] = {info[key]!r} is not {types}"
    assert all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["torch"] == torch.__version__
    assert info["gpu_available"] == torch.cuda.is_available()
    assert info["native_extension"] == (info["native_error"] is None)
    json.dumps(info)  # plain data, printable by CI and bug reports


def test_build_info_is_reexported():
    assert sp_kernels.build_info() == _ext.build_info()


@pytest.mark.skipif(not _ext.load(), reason=f"native extension not built: {_ext.native_error()}")
def test_native_build_consistent_with_runtime():
    info = _ext.build_info()
    native = json.loads(torch.ops.sp_kernels._build_info())
    assert info["cpu_kernels"] is True
    for key in ("cuda_kernels", "cuda_archs", "built_with_torch", "built_with_cuda"):
        assert info[key] == native[key], key
    # An extension built against another torch would have failed to load, or worse, loaded with a
    # mismatched ABI: the build must match the torch it runs with.
    assert info["built_with_torch"] == torch.__version__
    assert _ext.has_native_kernel("shard_pad", "cpu")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sp_kernels::shard_pad", "CPU")
    if torch.version.cuda is None:
        assert info["cuda_kernels"] is False, "a CPU-only torch cannot have CUDA kernels built against it"
    # Without -fopenmp, at::parallel_for in our kernels compiles to a serial loop while torch's own
    # ops use every thread: the CPU kernels would lose to eager torch on any multi-core machine.
    if getattr(torch._C, "has_openmp", False) and sys.platform != "darwin":
        assert info["cpu_openmp"] is True, "torch runs on OpenMP but the extension was built without -fopenmp"


@pytest.mark.skipif(
    not (_ext.load() and _ext.build_info()["cuda_kernels"]), reason="extension built without CUDA kernels"
)
def test_cuda_kernels_registered():
    info = _ext.build_info()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sp_kernels::shard_pad", "CUDA")
    assert _ext.has_native_kernel("shard_pad", "cuda")
    assert info["cuda_archs"], "CUDA build must name its archs"
    assert all(a.startswith("sm_") for a in info["cuda_archs"]), info["cuda_archs"]
    assert info["built_with_cuda"] and info["built_with_cuda"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_has_native_kernel_unknown_op_and_device():
    assert _ext.has_native_kernel("no_such_op", "cpu") is False
    assert _ext.has_native_kernel("shard_pad", "no_such_device") is False


HIDDEN_EXTENSION_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import os
    import sys


    class BlockNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sp_kernels._C":
                raise ImportError("sp_kernels._C blocked by test")
            return None


    sys.meta_path.insert(0, BlockNative())

    import torch

    import sp_kernels
    from sp_kernels.ops.shard_pad import shard_pad

    info = sp_kernels.build_info()
    assert info["native_extension"] is False, info
    assert "blocked by test" in info["native_error"], info
    assert info["cpu_kernels"] is False and info["cuda_kernels"] is False, info
    assert not hasattr(torch.ops.sp_kernels, "shard_pad")

    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    y = shard_pad(x, 1, 3, 4, -2.0)
    want = torch.cat([x[:, 3:], torch.full((2, 2, 3), -2.0, dtype=torch.float64)], dim=1)
    assert torch.equal(y, want), (y, want)
    assert torch.autograd.gradcheck(lambda t: shard_pad(t, 1, 3, 4, -2.0), (x,))

    os.environ["SP_KERNELS_IMPL"] = "native"
    try:
        shard_pad(x, 1, 3, 4)
    except RuntimeError as exc:
        assert "sp_kernels._C is not available" in str(exc) and "blocked by test" in str(exc), exc
    else:
        raise AssertionError("SP_KERNELS_IMPL=native must fail without the extension")
    print("FALLBACK-OK")
    """
)


def test_import_and_fallback_without_extension():
    package_parent = Path(sp_kernels.__file__).resolve().parent.parent
    env = dict(os.environ)
    env.pop("SP_KERNELS_IMPL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(package_parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", HIDDEN_EXTENSION_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "FALLBACK-OK" in proc.stdout


# --- setup.py's build decisions (imported, not run; skipped where the source tree is absent) ----

SETUP_PY = Path(__file__).resolve().parent.parent / "setup.py"
needs_setup_py = pytest.mark.skipif(not SETUP_PY.is_file(), reason="setup.py not beside the tests (installed run)")


@pytest.fixture
def setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sp_kernels_setup_under_test", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_setup_py
def test_cuda_arch_flags(setup_module):
    archs, flags = setup_module.cuda_arch_flags("8.0;9.0a")
    assert archs == ["sm_80", "sm_90a"]
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    archs, flags = setup_module.cuda_arch_flags("10.0 12.0+PTX")
    assert archs == ["sm_100", "sm_120"]
    assert "-gencode=arch=compute_120,code=compute_120" in flags
    with pytest.raises(SystemExit, match="cannot parse 'sm_80'"):
        setup_module.cuda_arch_flags("sm_80")


@needs_setup_py
def test_toolkit_behind_wrapper_nvcc(setup_module, tmp_path):
    # A toolkit whose nvcc answers -dryrun like the real one, and a wrapper script elsewhere that
    # execs it (the layout of these machines): the wrapper's own parent is not the toolkit.
    toolkit = tmp_path / "cuda-x"
    (toolkit / "bin").mkdir(parents=True)
    real = toolkit / "bin" / "nvcc"
    real.write_text(f'#!/bin/sh\necho "#$ _HERE_={toolkit}/bin" >&2\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    real.chmod(0o755)
    wrapper_dir = tmp_path / "wrappers" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    assert setup_module.toolkit_behind_nvcc(str(wrapper)) == str(toolkit.resolve())


@needs_setup_py
def test_explicit_cuda_home_is_authoritative(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    root, looked = setup_module.find_cuda_toolkit()
    assert root is None
    assert any("no bin/nvcc there" in item for item in looked), looked


@needs_setup_py
def test_forced_cuda_build_explains_why_not(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("SP_KERNELS_BUILD_CUDA", "1")
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match=r"CUDA kernels cannot be built: torch .* is a CPU-only build"):
        setup_module.CudaConfig()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"no CUDA toolkit found \(looked at: \$CUDA_HOME=.*nowhere"):
        setup_module.CudaConfig()
    monkeypatch.setenv("SP_KERNELS_BUILD_CUDA", "0")
    cfg = setup_module.CudaConfig()
    assert cfg.enabled is False and cfg.reason == "SP_KERNELS_BUILD_CUDA=0"
    monkeypatch.setenv("SP_KERNELS_BUILD_CUDA", "maybe")
    with pytest.raises(SystemExit, match="SP_KERNELS_BUILD_CUDA must be 0 or 1"):
        setup_module.CudaConfig()


@needs_setup_py
def test_source_list_shared_with_cmake(setup_module):
    groups = setup_module.source_groups()
    assert "csrc/ops.cpp" in groups["common"]
    assert "csrc/shard_pad/shard_pad_cpu.cpp" in groups["cpu"]
    assert "csrc/shard_pad/shard_pad_cuda.cu" in groups["cuda"]
    assert groups["python"] == ["csrc/py_module.cpp"]
    cmake = (SETUP_PY.parent / "CMakeLists.txt").read_text()
    assert "csrc/sources.txt" in cmake, "CMake must read the same source list"
