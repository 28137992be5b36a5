"""What a GPU session will run, checked here without a GPU (issue 13).

* scripts/gpu_check.sh: syntax, shellcheck, the dry run, the no-GPU exit, and its orchestration
  (per-step caps, a failed or timed-out step not stopping the next, the pip fallback, the key
  numbers in the table, the exit status) with a stand-in python that plays each step.
* scripts/gpu_first_run.py: its CPU mode end to end, that its ring check catches a ring that
  delivers the wrong block, and the arch string it hands the build.
* sp_kernels.distributed.parallel_state: the ring groups get a high-priority NCCL stream when (and only when)
  the parent backend runs NCCL for CUDA tensors.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sp_kernels.distributed import parallel_state as ps

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FIRST_RUN = ROOT / "scripts" / "gpu_first_run.py"
STEPS = ["env", "detect-gpu", "build", "build-info", "tests", "first-run", "bench-ring", "bench-merge", "bench-pack"]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


first_run = _load("gpu_first_run", FIRST_RUN)


def _run_check(out: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    full.pop("SP_KERNELS_IMPL", None)
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _table(out: Path) -> dict[str, list[str]]:
    """steps.tsv as step -> [status, seconds, key]."""
    rows = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, secs, key = (line.split("\t") + [""] * 4)[:4]
        rows[name] = [status, secs, key]
    return rows


# ---------------------------------------------------------------------------------------------
# gpu_check.sh


def test_gpu_check_syntax():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_gpu_check_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_check_dry_run_lists_every_step(tmp_path):
    proc = _run_check(tmp_path / "out", SP_KERNELS_GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for needle in ("--print-arch", "SP_KERNELS_CUDA_ARCHS=", "SP_KERNELS_BUILD_CUDA=1",
                   "-m pip install --no-deps --no-build-isolation -e .", "-m pytest", "tests/test_merge.py",
                   "tests/test_shard_pad.py", "tests/test_attention_local.py", "-k cuda or gpu", "gpu_first_run.py --device cuda",
                   "bench_ring.py --device cuda", "bench_merge.py --device cuda --no-compile",
                   "bench_pack.py --device cuda --no-compile"):  # fmt: skip
        assert needle in text, needle
    assert list(_table(tmp_path / "out")) == STEPS
    assert all(row[0] == "dry-run" for row in _table(tmp_path / "out").values())
    assert "gpu_check summary" in text and (tmp_path / "out" / "summary.txt").is_file()


def test_gpu_check_usage():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: bash scripts/gpu_check.sh OUTDIR" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run every step")
def test_gpu_check_without_gpu_says_so_and_exits_zero(tmp_path):
    out = tmp_path / "out"
    proc = _run_check(out, PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: torch.cuda.is_available() is False" in proc.stdout
    table = _table(out)
    assert list(table) == STEPS
    assert table["env"][0] == "ok" and table["detect-gpu"][0] == "no GPU"
    assert all(table[s][0] == "skipped (no GPU)" for s in STEPS[2:])
    assert "torch " in (out / "env.log").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("bench-pack")  # the table comes last


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Plays each step of gpu_check.sh: GPU found, pip broken, pytest hanging, bench_ring failing.
case "$*" in
  *--print-arch*) echo 9.0a ;;
  *--env*) echo "GPU 0: Fake H200, sm_90" ;;
  *"-m pip install"*) echo "archs=$SP_KERNELS_CUDA_ARCHS build_cuda=$SP_KERNELS_BUILD_CUDA jobs=$MAX_JOBS"; echo "error: pip is broken"; exit 1 ;;
  *"setup.py build_ext --inplace"*) echo "built in place for $SP_KERNELS_CUDA_ARCHS" ;;
  "-c "*) echo "key: cuda_kernels=True archs=sm_90a" ;;
  *"-m pytest"*) echo "collecting"; sleep 60 ;;
  *gpu_first_run.py*) echo "key: kernels 3 passed, 0 failed"; echo "key: ring 2 passed, 0 failed" ;;
  *bench_ring.py*) echo "key: loop 0.970..0.990 (target >= 0.95: met 6/6)"; exit 1 ;;
  *) echo "fake python: $*" ;;
esac
"""


def test_gpu_check_orchestration_with_a_stand_in_python(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = _run_check(out, timeout=90, PYTHON=str(fake), SP_KERNELS_GPU_CHECK_MAX_CAP="3")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step failed, and the run went on
    table = _table(out)
    assert list(table) == STEPS[:3] + ["build-inplace"] + STEPS[3:]
    assert table["detect-gpu"] == ["ok", table["detect-gpu"][1], "SP_KERNELS_CUDA_ARCHS=9.0a"]
    assert table["build"][0] == "FAIL (rc 1)" and "error: pip is broken" in table["build"][2]
    assert "archs=9.0a build_cuda=1" in (out / "build.log").read_text()
    assert table["build-inplace"][0] == "ok"
    assert table["build-info"] == ["ok", table["build-info"][1], "cuda_kernels=True archs=sm_90a"]
    assert table["tests"][0] == "TIMEOUT (3 s)" and int(table["tests"][1]) < 10
    assert table["first-run"][0] == "ok"
    assert table["first-run"][2] == "kernels 3 passed, 0 failed; ring 2 passed, 0 failed"
    assert table["bench-ring"][0] == "FAIL (rc 1)" and table["bench-ring"][2].startswith("loop 0.970..0.990")
    assert table["bench-merge"][0] == "ok" and table["bench-pack"][0] == "ok"
    for step in ("env", "build", "tests", "first-run", "bench-ring"):
        assert (out / f"{step}.log").is_file(), step
    assert "GPU 0: Fake H200" in table["env"][2]


# ---------------------------------------------------------------------------------------------
# gpu_first_run.py


def test_gpu_first_run_cpu_quick(tmp_path):
    env = dict(os.environ)
    env.pop("SP_KERNELS_IMPL", None)
    proc = subprocess.run([sys.executable, str(FIRST_RUN), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "delays skipped: CUDA only" in proc.stdout
    keys = [line for line in proc.stdout.splitlines() if line.startswith("key: ")]
    assert [k.split()[1] for k in keys] == ["kernels", "ops", "ring"]
    assert all(" 0 failed" in k and " 0 passed" not in k for k in keys), keys
    assert "PASS cpu_flash" in proc.stdout and "PASS math" in proc.stdout
    assert "PASS native pack_qkv" in proc.stdout or "native unavailable" in proc.stdout
    assert (tmp_path / "gpu_first_run.csv").is_file()


@pytest.mark.parametrize("merge", ["step", "all"])
def test_first_run_ring_check_is_exact_and_catches_a_wrong_block(merge):
    cpu = torch.device("cpu")
    case = first_run.RingCase((12, 0, 20, 7), 4, 2, 64, False, torch.float32)
    err, sends = first_run.run_ring_case(case, cpu, merge)
    assert err < 1e-5 and sends
    causal = first_run.RingCase((10, 6, 13), 4, 1, 64, True, torch.float32)
    err, sends = first_run.run_ring_case(causal, cpu, merge)
    assert err < 1e-5 and sends
    # A comm that hands every rank its successor's block instead: wrong numbers, wrong forwards.
    err, sends = first_run.run_ring_case(first_run.RingCase((16, 16, 16), 2, 2, 64, False, torch.float32), cpu,
                                         merge, skew=1)  # fmt: skip
    assert err > first_run.OUT_TOL[torch.float32] and not sends


def test_reference_attention_matches_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        out, lse = first_run.reference_attention(q, k, v, 0.25, causal)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=0.25
        ).transpose(1, 2)
        assert torch.allclose(out, want, atol=1e-12)
        assert lse.shape == (2, 4, 9)


def test_cuda_arch_spec_is_what_setup_py_parses():
    setup = _load("sp_kernels_setup_for_test", ROOT / "setup.py")
    for cap, spec, sm in (((9, 0), "9.0a", "sm_90a"), ((8, 0), "8.0", "sm_80"), ((8, 9), "8.9", "sm_89"),
                          ((10, 0), "10.0", "sm_100"), ((12, 0), "12.0", "sm_120")):  # fmt: skip
        assert first_run.cuda_arch_spec(*cap) == spec
        archs, flags = setup.cuda_arch_flags(spec)
        assert archs == [sm] and f"code={sm}" in flags[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_print_arch_without_gpu():
    proc = subprocess.run([sys.executable, str(FIRST_RUN), "--print-arch"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "no GPU" in proc.stderr


# ---------------------------------------------------------------------------------------------
# ring groups: high-priority NCCL stream


class FakeOptions:
    def __init__(self, is_high_priority_stream: bool = False) -> None:
        self.is_high_priority_stream = is_high_priority_stream
        self._timeout = datetime.timedelta(minutes=10)


class FakeOptionsNoKwargs:
    def __init__(self) -> None:
        self.is_high_priority_stream = False


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo", "mpi", "my_custom_backend", "cpu:gloo,cuda", 42])
def test_ring_options_none_without_nccl(backend):
    assert ps.ring_group_pg_options(backend, nccl_options=FakeOptions) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["nccl", "NCCL", "cpu:gloo,cuda:nccl", "cuda:nccl", "undefined"])
def test_ring_options_high_priority_with_nccl(backend):
    timeout = datetime.timedelta(seconds=7)
    opts = ps.ring_group_pg_options(backend, timeout, nccl_options=FakeOptions)
    assert isinstance(opts, FakeOptions) and opts.is_high_priority_stream is True and opts._timeout == timeout
    opts = ps.ring_group_pg_options(backend, nccl_options=FakeOptionsNoKwargs)
    assert isinstance(opts, FakeOptionsNoKwargs) and opts.is_high_priority_stream is True


@pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="torch built without NCCL")
def test_ring_options_real_nccl_class():
    timeout = datetime.timedelta(seconds=9)
    opts = ps.ring_group_pg_options("cpu:gloo,cuda:nccl", timeout)
    assert isinstance(opts, dist.ProcessGroupNCCL.Options)
    assert opts.is_high_priority_stream is True and opts._timeout == timeout
    assert ps.ring_group_pg_options("gloo", timeout) is None


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:nccl"])
def test_build_groups_gives_the_option_to_ring_groups_only(monkeypatch, backend):
    """_build_groups on a fake world of 4 (U=2 x R=2): every group created once, the NCCL option on
    the two ring groups only, and a gloo world's calls exactly as before (no pg_options at all)."""
    nccl = ps.parse_backend_config(backend).get("cuda") == "nccl"
    if nccl and not dist.is_nccl_available():
        pytest.skip("torch built without NCCL")
    calls: list[tuple[list[int], dict]] = []

    def new_group(ranks, **kwargs):
        calls.append((list(ranks), kwargs))
        return object()

    monkeypatch.setattr(ps.dist, "new_group", new_group)
    monkeypatch.setattr(ps.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(ps, "device_of_group", lambda group, tensor_device=None: torch.device("cpu"))
    monkeypatch.setattr(ps, "_backend_text", lambda group: backend)
    timeout = datetime.timedelta(seconds=5)
    config = ps.SequenceParallelConfig(ulysses_degree=2, ring_degree=2)
    groups = ps._build_groups(("k",), (0, 1, 2, 3), config, timeout, parent=object())
    assert [r for r, _ in calls] == [[0, 1, 2, 3], [0, 1], [2, 3], [0, 2], [1, 3]]
    options = [kwargs["pg_options"] for _, kwargs in calls if "pg_options" in kwargs]
    assert len({id(o) for o in options}) == len(options)  # one object per group: torch writes into it
    for ranks, kwargs in calls:
        assert kwargs.get("timeout") == timeout
        if nccl and ranks in ([0, 2], [1, 3]):
            opts = kwargs["pg_options"]
            assert opts.is_high_priority_stream is True and opts._timeout == timeout
        else:
            assert set(kwargs) == {"timeout"}, (ranks, kwargs)
    assert groups.sp_rank == 0 and groups.sp_ranks == (0, 1, 2, 3)
