"""The layout rules of docs/architecture.md, checked on the source tree.

- Python layers import downwards only: ops <- distributed <- plan <- attn <- integrations <- testing
  (distributed reads attn/backends.py, the data-only backend table, and nothing else of attn).
- csrc: one folder per op, every file in it named after the op, with the op's header and its CPU and
  CUDA implementation (csrc/sources.txt finds them by those names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sp_kernels"

# layer -> the layers (or single modules) it may import
ALLOWED: dict[str, set[str]] = {
    "ops": set(),
    "distributed": {"ops", "attn.backends"},
    "plan": {"ops", "distributed"},
    "attn": {"ops", "distributed", "plan"},
    "integrations": {"ops", "distributed", "plan", "attn"},
    "testing": {"ops", "distributed", "plan", "attn", "integrations"},
}


def _imports(path: Path) -> set[str]:
    """Dotted sp_kernels module names imported by ``path`` (relative imports resolved)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sp_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("sp_kernels"):
                found.add(name)
                found |= {f"{name}.{a.name}" for a in node.names}  # "from ..attn import backends"
    return found


def _layer_files() -> list[tuple[str, Path]]:
    return [(layer, f) for layer in ALLOWED for f in sorted((PKG / layer).rglob("*.py"))]


@pytest.mark.parametrize("layer,path", _layer_files(), ids=lambda x: str(x.relative_to(PKG)) if isinstance(x, Path) else x)
def test_imports_go_down_the_layers(layer, path):
    bad = []
    for name in sorted(_imports(path)):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] == layer or parts[1] not in ALLOWED:
            continue  # the package root, its own layer, or a module of the root (_C, sp_plan, ...)
        target = parts[1]
        allowed = ALLOWED[layer]
        if target in allowed or ".".join(parts[1:3]) in allowed:
            continue
        if len(parts) == 2 and any(a.startswith(f"{target}.") for a in allowed):
            continue  # "from ..attn import backends": the imported name is checked as attn.backends
        bad.append(name)
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports {bad}; {layer} may import {sorted(ALLOWED[layer])}"


def test_library_does_not_import_testing():
    offenders = [
        str(f.relative_to(ROOT))
        for f in PKG.rglob("*.py")
        if "testing" not in f.relative_to(PKG).parts and any(n.startswith("sp_kernels.testing") for n in _imports(f))
    ]
    assert not offenders, offenders


def _op_dirs() -> list[Path]:
    return sorted(d for d in (ROOT / "csrc").iterdir() if d.is_dir() and d.name not in ("include", "tests"))


def test_csrc_op_folders_follow_the_rule():
    dirs = _op_dirs()
    assert {d.name for d in dirs} >= {"shard_pad", "pack", "merge"}, dirs
    for d in dirs:
        op = d.name
        names = {f.name for f in d.iterdir()}
        for required in (f"{op}.h", f"{op}_cpu.cpp", f"{op}_cuda.cu"):
            assert required in names, f"csrc/{op}/ lacks {required}"
        strays = [n for n in names if not n.startswith(op)]
        assert not strays, f"csrc/{op}/ holds files not named after the op: {strays}"
        kinds = {n.removeprefix(op) for n in names}
        allowed = {".h", "_cpu.cpp", "_cuda.cu", "_prepare.cpp"}
        extra = [op + k for k in kinds if k not in allowed and not k.endswith(".h")]
        assert not extra, f"csrc/{op}/: {extra} match no group of csrc/sources.txt"
