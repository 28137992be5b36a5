#!/usr/bin/env python3
"""What the CUDA copy kernels execute per unit, read from their SASS (no GPU needed).

Compiles a .cu for one arch with the build's flags (scripts/ptxas_report.py's nvcc command), disassembles
it with cuobjdump (pip's ``nvidia-cuda-cuobjdump`` + ``nvidia-cuda-nvdisasm``, or Triton's), and prints one row per
kernel: SASS instructions in all, integer divisions by a runtime value (each compiles to one
``MUFU.RCP`` reciprocal plus a correction sequence), and the copy part: instructions from the first
global load to the last global store, which the kernel runs per chunk of units.

    python scripts/sass_report.py [--arch 9.0a] [--kernel row_copy_kernel] [csrc/pack/pack_cuda.cu]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def find_cuobjdump(cuda_home: str) -> str | None:
    candidates = [os.path.join(cuda_home, "bin", "cuobjdump")]
    for base in sys.path:
        candidates += glob.glob(os.path.join(base, "nvidia", "cu*", "bin", "cuobjdump"))
        candidates += glob.glob(os.path.join(base, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def kernels(sass: str) -> dict[str, list[str]]:
    """Function name -> its SASS instruction mnemonics, in order."""
    out: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and name is not None:
            out[name].append(m.group(1))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    try:
        proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return dict(zip(names, proc.stdout.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", type=Path, default=ROOT / "csrc" / "pack" / "pack_cuda.cu")
    parser.add_argument("--arch", default="9.0a")
    parser.add_argument("--kernel", default="", help="only kernels whose demangled name contains this")
    args = parser.parse_args()

    setup = _module("sp_kernels_setup", ROOT / "setup.py")
    ptxas = _module("sp_kernels_ptxas_report", ROOT / "scripts" / "ptxas_report.py")
    cuda_home, looked = setup.find_cuda_toolkit()
    if cuda_home is None:
        print(f"sass_report: no CUDA toolkit ({'; '.join(looked)})", file=sys.stderr)
        return 1
    tool = find_cuobjdump(cuda_home)
    if tool is None:
        print("sass_report: no cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, or install triton)",
              file=sys.stderr)
        return 1
    _, gencode = setup.cuda_arch_flags(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "out.o"
        cmd = [c for c in ptxas.nvcc_command(setup, cuda_home, args.source, gencode, obj) if c not in ("-Xptxas", "-v")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        # cuobjdump runs nvdisasm, which the pip package and Triton ship beside it.
        env = dict(os.environ, NVDISASM_PATH=os.path.dirname(tool), PATH=os.path.dirname(tool) + os.pathsep
                   + os.environ.get("PATH", ""))
        dump = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, env=env)
        if dump.returncode:
            print(f"sass_report: {tool} failed:\n{dump.stdout}{dump.stderr}", file=sys.stderr)
            return 1
        sass = dump.stdout
    funcs = kernels(sass)
    pretty = demangle(list(funcs))
    print(f"sass_report: {args.source}, sm_{args.arch.replace('.', '')}, {tool}")
    print(f"{'total':>6} {'div':>4} {'copy part':>9} {'loads':>6} {'stores':>6}  kernel")
    for name, ops in sorted(funcs.items(), key=lambda kv: pretty[kv[0]]):
        if args.kernel not in pretty[name]:
            continue
        loads = [i for i, op in enumerate(ops) if op.startswith("LDG")]
        stores = [i for i, op in enumerate(ops) if op.startswith("STG")]
        copy = (stores[-1] - loads[0] + 1) if loads and stores else 0
        divs = sum(op.startswith("MUFU.RCP") for op in ops)
        print(f"{len(ops):>6} {divs:>4} {copy:>9} {len(loads):>6} {len(stores):>6}  {pretty[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
