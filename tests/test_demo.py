"""The demo's diffusers models (``python -m sp_kernels.testing.demo --model ...``) through its own entry
function, on the session's 2-rank pool: every default backend, a token count 2 divides and one it
does not, checked against the same model on one process."""

from __future__ import annotations

import importlib.util

import pytest

from sp_kernels.testing import demo

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (scripts/setup.sh installs it); the demo's diffusers models need it",
)


@needs_diffusers
@pytest.mark.parametrize("model", ["wan", "flux"])
def test_demo_diffusers_model_matches_single_process(rank_pool, capsys, model):
    rc = demo.main(["--model", model, "--iters", "1", "--check"], pool=rank_pool(2))
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line for line in out.splitlines() if line.rstrip().endswith((" ok", " FAIL"))]
    names = [line.split()[0] for line in rows]
    # ulysses, ring, fused_ring, auto (usp does not fit 2 ranks) x 24 and 25 tokens
    assert names == [n for n in ("ulysses", "ring", "fused_ring", "auto->ulysses") for _ in range(2)], out
    assert [line.split()[4] for line in rows] == ["24", "25"] * 4, out
    assert all(line.rstrip().endswith(" ok") for line in rows), out


def test_demo_without_diffusers_says_so(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", "wan"])
    assert exc.value.code == 2
    assert "--model wan needs diffusers" in capsys.readouterr().err


def test_demo_backend_rows_include_fused_ring():
    assert demo.backend_rows(2, demo.DIFFUSERS_BACKENDS) == [
        ("ulysses", (2, 1)), ("ring", (1, 2)), ("fused_ring", (1, 2)), ("auto", (2, 1))
    ]
    assert ("usp", (2, 2)) in demo.backend_rows(4, demo.DIFFUSERS_BACKENDS)
