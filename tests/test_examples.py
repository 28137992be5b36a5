"""Every examples/<family>.py, CPU path: 2 gloo ranks under torchrun, tiny config, one denoising step,
checked against the same loop without SP (--check exits 1 over the tolerance)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("flux", "flux2", "qwen_image", "wan", "skyreels", "ltx", "hunyuan_video")
PARALLEL = 2  # torchrun jobs at a time: most of a run is startup (imports, rendezvous)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                    reason="diffusers is not installed (scripts/setup.sh installs it); the examples need it")
def test_examples_cpu_two_ranks():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    pending = list(EXAMPLES)
    running: list[tuple[str, subprocess.Popen]] = []
    failures = []
    while pending or running:
        while pending and len(running) < PARALLEL:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(ROOT / "examples" / f"{name}.py"), "--cpu", "--tiny", "--steps", "1", "--check"]
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)))
        name, proc = running.pop(0)
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if not (proc.returncode == 0 and "SP on 2 rank(s): 1 steps" in out and ": ok" in out):
            failures.append(f"examples/{name}.py rc={proc.returncode}\n{out}\n{err[-3000:]}")
    assert not failures, "\n\n".join(failures)
