#!/usr/bin/env bash
# One setup command for a fresh machine, run from the repository root:
#
#   bash scripts/setup.sh && .venv/bin/python -m pytest tests
#
# Creates .venv (python3) when missing, installs torch and the dev tools, and installs sp_kernels
# editable with its native extension (CPU kernels always; CUDA kernels when torch is a CUDA build and
# a toolkit is found -- setup.py locates the toolkit itself, CUDA_HOME need not be set). Idempotent: a
# second run with nothing changed installs and builds nothing.
#
# Environment: SP_KERNELS_TORCH (default torch==2.14.1, e.g. torch==2.13.0 for the CPU-only build),
# SP_KERNELS_VENV (default .venv), PYTHON (default python3), plus the build knobs of setup.py
# (SP_KERNELS_BUILD_CUDA, SP_KERNELS_CUDA_ARCHS, MAX_JOBS).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
VENV="${SP_KERNELS_VENV:-.venv}"
TORCH_SPEC="${SP_KERNELS_TORCH:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"
# diffusers: the version the integration tests ran against (sp_kernels.integrations.diffusers).
DEPS=("$TORCH_SPEC" numpy ninja pybind11 setuptools wheel triton pytest hypothesis ruff matplotlib "diffusers==0.42.1")

log() { printf 'setup.sh: %s\n' "$*"; }

hash_stdin() { sha256sum | cut -d' ' -f1; }

if [ -x "$VENV/bin/python" ]; then
  log "venv $VENV exists ($("$VENV/bin/python" --version 2>&1))"
else
  log "creating venv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$(cd "$VENV" && pwd)/bin/python"

# Dependencies: reinstalled only when the requested set changes (or the venv lost torch).
deps_key="$(printf '%s\n' "${DEPS[@]}" | hash_stdin)"
deps_stamp="$VENV/.sp_kernels_deps"
if [ -f "$deps_stamp" ] && [ "$(cat "$deps_stamp")" = "$deps_key" ] && "$VPY" -c "import torch, numpy, pytest" 2>/dev/null; then
  log "dependencies up to date (${DEPS[*]})"
else
  log "installing ${DEPS[*]} (log: $VENV/sp_kernels_deps.log)"
  if ! "$VPY" -m pip install "${DEPS[@]}" > "$VENV/sp_kernels_deps.log" 2>&1; then
    tail -n 40 "$VENV/sp_kernels_deps.log"
    log "dependency install FAILED (full log: $VENV/sp_kernels_deps.log)"
    exit 1
  fi
  printf '%s\n' "$deps_key" > "$deps_stamp"
fi

# Native build: redone when a source, the build files, torch or a build knob changes.
build_key="$(
  {
    printf '%s\n' "$ROOT" "$("$VPY" -c 'import torch; print(torch.__version__)')"
    printf '%s\n' "${SP_KERNELS_BUILD_CUDA:-}" "${SP_KERNELS_CUDA_ARCHS:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}"
    find csrc -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml
  } | hash_stdin
)"
build_stamp="$VENV/.sp_kernels_build"
build_log="$VENV/sp_kernels_build.log"
if [ -f "$build_stamp" ] && [ "$(cat "$build_stamp")" = "$build_key" ] \
  && "$VPY" -c "import torch, sp_kernels._C" 2>/dev/null; then
  log "sp_kernels editable install up to date"
else
  log "building sp_kernels (pip install --no-build-isolation -e .; log: $build_log)"
  if ! "$VPY" -m pip install -v --no-build-isolation -e . > "$build_log" 2>&1; then
    tail -n 60 "$build_log"
    log "build FAILED (full log: $build_log)"
    exit 1
  fi
  grep -m1 -o 'sp_kernels: building.*' "$build_log" | sed 's/^/setup.sh: /' || true
  printf '%s\n' "$build_key" > "$build_stamp"
fi

log "build_info: $("$VPY" -c 'import json; from sp_kernels.ops._ext import build_info; print(json.dumps(build_info()))')"
