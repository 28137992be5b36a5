"""Build of the native extension ``sp_kernels._C`` (metadata lives in pyproject.toml).

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and a CUDA toolkit
is found; no GPU is needed (``torch.cuda.is_available()`` is deliberately never consulted).

Environment knobs:
  SP_KERNELS_BUILD_CUDA=0|1   force CUDA kernels off, or on (then failing to build them is an error)
  SP_KERNELS_CUDA_ARCHS       ";"-separated arch list, default "8.0;9.0a" (sm_80 and sm_90a)
  MAX_JOBS                    parallel compile jobs (default: number of cores, at most 8)
  CUDA_HOME / CUDA_PATH       toolkit root; when unset it is searched (see find_cuda_toolkit)

scripts/ptxas_report.py imports this file for the same toolkit search and flags, so setup() runs
only when executed as a script (which is how pip and setuptools run it).
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
GENERATED_DIR = ROOT / "build" / "generated"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"

CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]


def openmp_flags() -> list[str]:
    """-fopenmp where torch itself runs at::parallel_for on OpenMP.

    at::parallel_for is a header template: without -fopenmp its `omp parallel` pragma compiles away
    and every CPU kernel of ours runs on one thread, whatever torch.set_num_threads says. Apple's
    clang has no -fopenmp, and a torch built on another backend needs none.
    """
    import torch

    if sys.platform == "darwin" or not getattr(torch._C, "has_openmp", False):
        return []
    return ["-fopenmp"]


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("pyproject.toml has no [project] version")
    return match.group(1)


def source_groups() -> dict[str, list[str]]:
    """csrc/sources.txt expanded: group -> sorted source paths relative to the repo root."""
    groups: dict[str, list[str]] = {}
    for raw in (CSRC / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        group, pattern = line.split()
        matches = sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / pattern)))
        groups.setdefault(group, []).extend(matches)
    return groups


def env_switch(name: str) -> bool | None:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


def _has_nvcc(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "bin", "nvcc"))


def toolkit_behind_nvcc(nvcc: str) -> str | None:
    """Toolkit root of an nvcc, which may be a wrapper script that execs the real one elsewhere.

    nvcc's dry run prints the variables of its own nvcc.profile, among them TOP (the real toolkit
    root), so this resolves wrappers and symlinks alike; the parent of bin/ of the resolved path is
    the fallback for an nvcc whose dry run says nothing useful.
    """
    try:
        proc = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=120,
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            match = re.match(r"^#\$ TOP=(.+)$", line.strip())
            if match:
                top = os.path.realpath(match.group(1).strip())
                if _has_nvcc(top):
                    return top
    except (OSError, subprocess.SubprocessError):
        pass
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return root if _has_nvcc(root) else None


def find_cuda_toolkit() -> tuple[str | None, list[str]]:
    """(toolkit root or None, where it looked). Order: $CUDA_HOME/$CUDA_PATH, /usr/local/cuda, nvcc on PATH."""
    looked: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            # An explicit setting is authoritative: silently using some other toolkit would surprise.
            if _has_nvcc(value):
                return os.path.realpath(value), looked + [f"${var}={value}"]
            return None, looked + [f"${var}={value} (no bin/nvcc there)"]
        looked.append(f"${var} (unset)")
    if _has_nvcc("/usr/local/cuda"):
        return os.path.realpath("/usr/local/cuda"), looked + ["/usr/local/cuda"]
    looked.append("/usr/local/cuda (no bin/nvcc)")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, looked + ["nvcc on PATH (not found)"]
    root = toolkit_behind_nvcc(nvcc)
    if root is None:
        return None, looked + [f"nvcc on PATH ({nvcc}: could not resolve its toolkit)"]
    return root, looked + [f"nvcc on PATH ({nvcc} -> {root})"]


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA version from nvcc --version:\n{out}")
    return match.group(1)


def cuda_arch_flags(spec: str) -> tuple[list[str], list[str]]:
    """("8.0;9.0a") -> (["sm_80", "sm_90a"], explicit -gencode flags). "+PTX" also embeds PTX."""
    archs: list[str] = []
    flags: list[str] = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", item)
        if match is None:
            raise SystemExit(f"SP_KERNELS_CUDA_ARCHS: cannot parse {item!r} (expected e.g. '8.0;9.0a')")
        num = match.group(1) + match.group(2) + match.group(3)
        archs.append(f"sm_{num}")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not archs:
        raise SystemExit("SP_KERNELS_CUDA_ARCHS is empty")
    return archs, flags


class CudaConfig:
    """Whether CUDA kernels are built, and with what. Decided before torch.utils.cpp_extension is imported."""

    def __init__(self) -> None:
        import torch  # local: importing this file must stay cheap for tools

        self.torch_version: str = torch.__version__
        self.torch_cuda: str | None = torch.version.cuda
        self.enabled = False
        self.home: str | None = None
        self.version: str | None = None
        self.archs: list[str] = []
        self.gencode_flags: list[str] = []
        self.reason = ""

        forced = env_switch("SP_KERNELS_BUILD_CUDA")
        if forced is False:
            self.reason = "SP_KERNELS_BUILD_CUDA=0"
            return
        if self.torch_cuda is None:
            self.reason = f"torch {self.torch_version} is a CPU-only build (torch.version.cuda is None)"
            return self._refuse_if(forced)
        home, looked = find_cuda_toolkit()
        if home is None:
            self.reason = "no CUDA toolkit found (looked at: " + "; ".join(looked) + ")"
            return self._refuse_if(forced)
        version = nvcc_version(home)
        if version.split(".")[0] != self.torch_cuda.split(".")[0]:
            self.reason = (
                f"CUDA toolkit {version} at {home} does not match the CUDA {self.torch_cuda} torch was built with "
                "(major versions must agree)"
            )
            return self._refuse_if(forced)
        self.enabled = True
        self.home = home
        self.version = version
        self.archs, self.gencode_flags = cuda_arch_flags(os.environ.get("SP_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))

    def _refuse_if(self, forced: bool | None) -> None:
        if forced:
            raise SystemExit(f"SP_KERNELS_BUILD_CUDA=1 but CUDA kernels cannot be built: {self.reason}")


def write_build_config(cfg: CudaConfig, build_system: str = "setuptools") -> Path:
    """Fill csrc/sp_kernels_build_config.h.in (the template CMake's configure_file also fills)."""
    values = {
        "SP_KERNELS_VERSION": project_version(),
        "SP_KERNELS_BUILD_SYSTEM": build_system,
        "SP_KERNELS_WITH_CUDA": "1" if cfg.enabled else "0",
        "SP_KERNELS_BUILT_ARCHS": ";".join(cfg.archs),
        "SP_KERNELS_TORCH_VERSION": cfg.torch_version,
        "SP_KERNELS_CUDA_VERSION": cfg.version or "",
    }
    text = (CSRC / "sp_kernels_build_config.h.in").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@\w+@", text)
    if leftover:
        raise RuntimeError(f"unfilled placeholders in sp_kernels_build_config.h.in: {leftover}")
    GENERATED_DIR.mkdir(parents=True, exist_ok=True)
    path = GENERATED_DIR / "sp_kernels_build_config.h"
    # Rewriting an unchanged header would make ninja recompile its users on every install.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def include_dirs() -> list[str]:
    return [str(CSRC), str(CSRC / "include"), str(GENERATED_DIR)]


def extension_modules(cfg: CudaConfig) -> list:
    if cfg.enabled:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import; its own guess from the nvcc on
        # PATH is wrong when that nvcc is a wrapper script (it then fails to link -lcudart).
        os.environ["CUDA_HOME"] = cfg.home
    # Its import warns "No CUDA runtime is found" without a GPU, which is expected when building.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    groups = source_groups()
    sources = groups.get("common", []) + groups.get("cpu", []) + groups.get("python", [])
    omp = openmp_flags()
    extra_compile_args: dict[str, list[str]] = {"cxx": CXX_FLAGS + omp}
    if cfg.enabled:
        sources += groups.get("cuda", [])
        # Explicit -gencode flags make torch skip its own arch selection (which would query GPUs).
        extra_compile_args["nvcc"] = NVCC_FLAGS + cfg.gencode_flags
        return [
            CUDAExtension(
                "sp_kernels._C",
                sources=sources,
                include_dirs=include_dirs(),
                extra_compile_args=extra_compile_args,
                extra_link_args=omp,
            )
        ]
    return [
        CppExtension(
            "sp_kernels._C",
            sources=sources,
            include_dirs=include_dirs(),
            extra_compile_args=extra_compile_args,
            extra_link_args=omp,
        )
    ]


def main() -> None:
    from setuptools import setup

    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 8))))
    cfg = CudaConfig()
    if cfg.enabled:
        print(
            f"sp_kernels: building CPU + CUDA kernels (CUDA {cfg.version} at {cfg.home}, archs {' '.join(cfg.archs)}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']})",
            file=sys.stderr,
        )
    else:
        print(f"sp_kernels: building CPU kernels only ({cfg.reason})", file=sys.stderr)
    write_build_config(cfg)
    ext_modules = extension_modules(cfg)
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
