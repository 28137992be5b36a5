#!/usr/bin/env python3
"""Compile every csrc/<op>/<op>_cuda.cu with ``-Xptxas -v`` and fail on register spills or local memory.

No GPU is needed: ptxas runs at compile time. Uses the toolkit search, arch list and nvcc flags of
setup.py (imported, not run), plus torch's include dirs and common nvcc flags, so what is checked is
what the build compiles. Prints one row per kernel and arch; exits 1 when any kernel has a nonzero
stack frame (local memory), spill stores or spill loads, or when nothing was compiled.

    python scripts/ptxas_report.py [--archs "8.0;9.0a"] [files.cu ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_setup():
    spec = importlib.util.spec_from_file_location("sp_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class KernelStats:
    source: str
    arch: str
    name: str
    registers: int = -1
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    lmem: int = 0

    @property
    def ok(self) -> bool:
        return self.stack_frame == 0 and self.spill_stores == 0 and self.spill_loads == 0 and self.lmem == 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_LMEM = re.compile(r"(\d+) bytes lmem")


def parse_ptxas(source: str, text: str) -> list[KernelStats]:
    """ptxas -v output -> stats per (function, arch); non-entry functions are reported too."""
    stats: dict[tuple[str, str], KernelStats] = {}
    arch = "?"
    current: KernelStats | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            name, arch = m.group(1), m.group(2)
            current = stats.setdefault((name, arch), KernelStats(source, arch, name))
        elif m := _PROPS.search(line):
            name = m.group(1)
            current = stats.setdefault((name, arch), KernelStats(source, arch, name))
        elif current is not None and (m := _FRAME.search(line)):
            current.stack_frame, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if lm := _LMEM.search(line):
                current.lmem = int(lm.group(1))
    return list(stats.values())


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _short(demangled: str) -> str:
    """'void ns::(anonymous namespace)::kern<uint4, int>(args...)' -> 'ns::kern<uint4, int>'."""
    name = demangled.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def nvcc_command(setup, cuda_home: str, source: Path, gencode: list[str], out: Path) -> list[str]:
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it at import
    # Its import warns "No CUDA runtime is found" on machines without a GPU: expected here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    includes = setup.include_dirs() + cpp_extension.include_paths(device_type="cuda")
    flags = [
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        *setup.NVCC_FLAGS,
        *gencode,
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        "-std=c++20",
        "-Xptxas",
        "-v",
    ]
    return [
        os.path.join(cuda_home, "bin", "nvcc"),
        *(f"-I{d}" for d in includes),
        "-c",
        str(source),
        "-o",
        str(out),
        *flags,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="CUDA sources (default: csrc/<op>/<op>_cuda.cu)")
    parser.add_argument("--archs", default=None, help="arch list (default: $SP_KERNELS_CUDA_ARCHS or 8.0;9.0a)")
    args = parser.parse_args()

    setup = _load_setup()
    cuda_home, looked = setup.find_cuda_toolkit()
    if cuda_home is None:
        print("ptxas_report: no CUDA toolkit found (looked at: " + "; ".join(looked) + ")", file=sys.stderr)
        return 1
    arch_spec = args.archs or os.environ.get("SP_KERNELS_CUDA_ARCHS", setup.DEFAULT_CUDA_ARCHS)
    archs, gencode = setup.cuda_arch_flags(arch_spec)
    files = args.files or sorted((ROOT / "csrc").glob("*/*_cuda.cu"))
    if not files:
        print("ptxas_report: no CUDA sources found", file=sys.stderr)
        return 1
    print(f"ptxas_report: {len(files)} file(s), archs {' '.join(archs)}, toolkit {cuda_home}")

    def compile_one(source: Path) -> tuple[Path, subprocess.CompletedProcess]:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = nvcc_command(setup, cuda_home, source, gencode, Path(tmp) / "out.o")
            return source, subprocess.run(cmd, capture_output=True, text=True)

    jobs = max(1, int(os.environ.get("MAX_JOBS", "2")))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(compile_one, files))

    all_stats: list[KernelStats] = []
    failed_compiles = 0
    for source, proc in results:
        rel = str(source.resolve().relative_to(ROOT)) if source.resolve().is_relative_to(ROOT) else str(source)
        if proc.returncode != 0:
            failed_compiles += 1
            print(f"ptxas_report: nvcc failed for {rel}:\n{proc.stdout}{proc.stderr}", file=sys.stderr)
            continue
        stats = parse_ptxas(rel, proc.stdout + proc.stderr)
        if not stats:
            failed_compiles += 1
            print(f"ptxas_report: no ptxas statistics for {rel} (no kernels, or unparsable output)", file=sys.stderr)
        all_stats.extend(stats)

    names = {k: _short(v) for k, v in demangle(sorted({s.name for s in all_stats})).items()}
    header = f"{'source':<24} {'arch':<7} {'regs':>4} {'stack':>5} {'spill st':>8} {'spill ld':>8} {'lmem':>4}  kernel"
    print(header)
    print("-" * len(header))
    for s in sorted(all_stats, key=lambda s: (s.source, names[s.name], s.arch)):
        pretty = names[s.name]
        flag = "" if s.ok else "   <-- SPILL/LOCAL MEMORY"
        print(
            f"{s.source:<24} {s.arch:<7} {s.registers:>4} {s.stack_frame:>5} {s.spill_stores:>8} "
            f"{s.spill_loads:>8} {s.lmem:>4}  {pretty}{flag}"
        )
    bad = [s for s in all_stats if not s.ok]
    missing_archs = {a for a in archs} - {s.arch for s in all_stats}
    print(
        f"ptxas_report: {len(all_stats)} kernel builds, {len(bad)} with spills or local memory, "
        f"{failed_compiles} failed compile(s)"
        + (f", archs without kernels: {sorted(missing_archs)}" if missing_archs else "")
    )
    return 1 if bad or failed_compiles or missing_archs else 0


if __name__ == "__main__":
    sys.exit(main())
