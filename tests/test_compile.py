"""torch.compile of models with SP applied (issue 16): fullgraph=True with zero graph breaks in the hooks, the
split/gather, the attention backends and the ops, on gloo ranks.

* The tiny DiT (auto_pad, joint text tokens, RoPE, GQA) compiled whole under every backend: dynamo's graph-break
  counter stays empty, and the output and every parameter gradient (SP-group average) equal the single-process
  model's in float64 (1e-12) -- over several input shapes, so the recompiles (automatic dynamic shapes) are
  covered too; then 2 SGD steps compiled follow the single-process trajectory.
* Regional compilation (each transformer block compiled, as diffusers' compile_repeated_blocks does) and a whole
  model with inductor, float32 (1e-5).
* diffusers: enable_sequence_parallel (Flux, Wan, Qwen-Image with prompt masks with holes) with the whole model
  and with its repeated blocks compiled, and the drop-in (diffusers' own context parallelism with our backend)
  under compile_repeated_blocks, all with zero graph breaks and equal to one process.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

from tests.attention_cases import sp_degrees

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
SHAPES = [dict(batch=1, tokens=9), dict(batch=2, tokens=14), dict(batch=1, frames=2, height=6, width=6)]


def _grads_vs_single(single, model, world: int) -> float:
    """Largest difference between the SP-group average of ``model``'s gradients and ``single``'s."""
    err = 0.0
    for p, q in zip(single.parameters(), model.parameters()):
        g = q.grad.clone() if q.grad is not None else torch.zeros_like(q)
        dist.all_reduce(g)
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        err = max(err, float((g / world - ref).abs().max()))
    return err


def _dit_cases(cases: list[dict]) -> list[dict]:
    """Rank side: each case compiles a fresh SP model (``mode``: "whole" or "blocks") with ``compiler``."""
    import torch._dynamo as dynamo

    from sp_kernels import SequenceParallelConfig, apply_sequence_parallel, remove_sequence_parallel
    from sp_kernels.testing.demo import Shape, build_model, make_inputs
    from sp_kernels.testing.models.dit import DiTConfig

    world = dist.get_world_size()
    results = []
    for case in cases:
        try:
            dynamo.reset()
            dynamo.utils.counters.clear()
            dtype = case.get("dtype", torch.float64)
            cfg = DiTConfig(num_layers=2, num_heads=4, num_kv_heads=case.get("kv_heads"), head_dim=8, text_dim=16)
            single = build_model(cfg, 3, dtype, torch.device("cpu"))
            model = build_model(cfg, 3, dtype, torch.device("cpu"))
            u, r = case["degrees"]
            apply_sequence_parallel(model, SequenceParallelConfig(u, r, attention_backend=case["backend"]))
            restore = None
            try:
                if case["mode"] == "blocks":
                    for block in model.blocks:
                        block.compile(fullgraph=True, backend=case["compiler"])
                    run = model
                elif case["mode"] == "user-break":
                    # A graph break in the user's block code, compiled without fullgraph: dynamo skips the SP
                    # forward's frame and compiles the pieces around the break; still exact.
                    restore = _break_in_blocks()
                    run = torch.compile(model, backend=case["compiler"])
                else:
                    run = torch.compile(model, fullgraph=True, backend=case["compiler"])
                out_err = grad_err = 0.0
                for shape in case["shapes"]:
                    inputs = make_inputs(Shape(**shape), cfg, 5, dtype, torch.device("cpu"))
                    single.zero_grad()
                    model.zero_grad()
                    ref = single(*inputs)
                    ref.square().mean().backward()
                    got = run(*inputs)
                    got.square().mean().backward()
                    out_err = max(out_err, float((got.detach() - ref.detach()).abs().max()))
                    grad_err = max(grad_err, _grads_vs_single(single, model, world))
                steps = []
                if case.get("train"):
                    inputs = make_inputs(Shape(**case["shapes"][0]), cfg, 7, dtype, torch.device("cpu"))
                    for _ in range(2):
                        for m, fwd in ((single, single), (model, run)):
                            m.zero_grad()
                            fwd(*inputs).square().mean().backward()
                        with torch.no_grad():
                            for p, q in zip(single.parameters(), model.parameters()):
                                g = q.grad.clone() if q.grad is not None else torch.zeros_like(q)
                                dist.all_reduce(g)
                                q.sub_(0.5 * g / world)
                                if p.grad is not None:
                                    p.sub_(0.5 * p.grad)
                        steps.append(max(float((p - q).abs().max()) for p, q in zip(single.parameters(),
                                                                                     model.parameters())))
                results.append({"out": out_err, "grad": grad_err, "steps": steps,
                                "breaks": sum(dynamo.utils.counters["graph_break"].values()),
                                "frames": dynamo.utils.counters["stats"]["unique_graphs"]})
            finally:
                if restore is not None:
                    restore()
                remove_sequence_parallel(model)
        except Exception as e:  # noqa: BLE001 - reported per case to the parent
            results.append({"error": f"{type(e).__name__}: {e}"})
    return results


def _break_in_blocks():
    """Put a dynamo graph break into DiTBlock.forward (same signature); returns the function that undoes it."""
    import functools

    from sp_kernels.testing.models.dit import DiTBlock

    original = DiTBlock.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return original(self, *args, **kwargs)

    DiTBlock.forward = forward

    def restore():
        DiTBlock.forward = original

    return restore


def _dit_case_list(P: int) -> list[dict]:
    rows = [("ulysses", (P, 1)), ("ring", (1, P)), ("fused_ring", (1, P)), ("usp", (1, P))]
    if P == 4:
        rows = [("ulysses", (4, 1)), ("fused_ring", (1, 4)), ("usp", (2, 2))]
    cases = [dict(backend=b, degrees=d, mode="whole", compiler="aot_eager", shapes=SHAPES, kv_heads=2 if i % 2 else None,
                  train=P == 2) for i, (b, d) in enumerate(rows)]
    if P == 2:
        fp32 = dict(dtype=torch.float32, compiler="inductor", shapes=SHAPES[:1])
        cases += [dict(backend="fused_ring", degrees=(1, 2), mode="user-break", compiler="aot_eager", shapes=SHAPES),
                  dict(backend="fused_ring", degrees=(1, 2), mode="blocks", **fp32),
                  dict(backend="ulysses", degrees=(2, 1), mode="blocks", **fp32),
                  dict(backend="ulysses", degrees=(2, 1), mode="whole", **fp32)]
    return cases


CASES = {P: _dit_case_list(P) for P in (2, 4)}


@pytest.mark.parametrize(
    "world_size,index",
    [pytest.param(P, i, id=f"P{P}-{c['backend']}-{c['degrees'][0]}x{c['degrees'][1]}-{c['mode']}-{c['compiler']}")
     for P, cs in CASES.items() for i, c in enumerate(cs)],
)
def test_compiled_dit_matches_single_process(rank_batch, world_size, index):
    case = CASES[world_size][index]
    tol = 1e-12 if case.get("dtype", torch.float64) == torch.float64 else 1e-5
    for rank, results in enumerate(rank_batch(_dit_cases, world_size, CASES[world_size])):
        res = results[index]
        assert "error" not in res, (rank, res)
        assert (res["breaks"] > 0) == (case["mode"] == "user-break"), (rank, res)
        assert res["frames"] >= 1, (rank, res)  # something was compiled
        assert res["out"] < tol and res["grad"] < tol, (rank, res)
        assert all(s < tol for s in res["steps"]), (rank, res)


def _compiled_call_errors(_: list) -> list[str]:
    """Rank side: refusals inside a compiled call still raise on every rank (a mask under autograd)."""
    import sp_kernels
    from sp_kernels import SequenceParallelConfig, attention, init_sequence_parallel
    from sp_kernels.plan.context import sp_forward_context

    state = init_sequence_parallel(SequenceParallelConfig(1, dist.get_world_size(), attention_backend="ring"))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 8 * dist.get_world_size(), dtype=torch.bool)

    def fn(q, k, v, mask):
        with sp_forward_context(state):
            q = sp_kernels.sp_shard(q, 1)
            return attention(q, sp_kernels.sp_shard(k, 1), sp_kernels.sp_shard(v, 1), key_padding_mask=mask)

    torch._dynamo.reset()
    try:
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    except Exception as e:  # noqa: BLE001 - the message is the result
        return [f"{type(e).__name__}: {e}"]
    finally:
        sp_kernels.destroy_sequence_parallel()
    return ["no error"]


def test_compiled_refusal_raises_on_every_rank(rank_pool):
    for rank, (msg,) in enumerate(rank_pool(2).run(_compiled_call_errors, [])):
        assert "NotImplementedError" in msg and "under autograd is not supported" in msg, (rank, msg)


def _diffusers_cases(cases: list[dict]) -> list[dict]:
    """Rank side: enable_sequence_parallel on a tiny diffusers model, compiled whole or by its repeated blocks."""
    import logging

    import torch._dynamo as dynamo

    from sp_kernels import SequenceParallelConfig
    from sp_kernels.integrations.diffusers import disable_sequence_parallel, enable_sequence_parallel
    from sp_kernels.testing.models import diffusers_tiny
    from tests.test_diffusers_masks import batched_inputs

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("sp_kernels").setLevel(logging.ERROR)
    results = []
    for case in cases:
        try:
            dynamo.reset()
            dynamo.utils.counters.clear()
            family = case["family"]
            model = diffusers_tiny.build(family, seed=5)
            inputs = (batched_inputs(family, 24, 8) if case.get("holes")
                      else diffusers_tiny.make_inputs(family, 35, text_tokens=8, seed=6))
            with torch.no_grad():
                single = model(**inputs, return_dict=False)[0]
            U, R = sp_degrees(case["backend"], dist.get_world_size())
            enable_sequence_parallel(model, SequenceParallelConfig(U, R, attention_backend=case["backend"]))
            try:
                if case["mode"] == "blocks":
                    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
                    run = model
                else:
                    run = torch.compile(model, fullgraph=True, backend="aot_eager")
                with torch.no_grad():
                    out = run(**inputs, return_dict=False)[0]
            finally:
                disable_sequence_parallel(model)
            results.append({"err": float((out - single).abs().max()),
                            "breaks": sum(dynamo.utils.counters["graph_break"].values())})
        except Exception as e:  # noqa: BLE001 - reported per case to the parent
            results.append({"error": f"{type(e).__name__}: {e}"})
    return results


DIFFUSERS_CASES = [dict(family=f, backend=b, mode=m, holes=f == "qwen")
                   for f in ("flux", "wan", "qwen") for b in ("ulysses", "fused_ring") for m in ("whole", "blocks")]


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (scripts/setup.sh installs it)")
@pytest.mark.parametrize("index", range(len(DIFFUSERS_CASES)),
                         ids=[f"{c['family']}-{c['backend']}-{c['mode']}" for c in DIFFUSERS_CASES])
def test_compiled_diffusers_matches_single_process(rank_batch, index):
    for rank, results in enumerate(rank_batch(_diffusers_cases, 2, DIFFUSERS_CASES)):
        res = results[index]
        assert "error" not in res, (rank, res)
        assert res["breaks"] == 0 and res["err"] < 1e-5, (rank, res)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed (scripts/setup.sh installs it)")
def test_compiled_dropin_matches_single_process(rank_pool):
    """diffusers' own context parallelism with our backends under compile_repeated_blocks (Wan's _cp_plan puts
    diffusers' hooks on its blocks, whose code breaks the graph in diffusers itself, so Flux and Qwen-Image)."""
    from tests.test_diffusers_dropin import _dropin_cases

    cases = [("flux", "fused_ring", 2, 1), ("flux", "sp_ulysses", 1, 2), ("qwen", "fused_ring", 2, 1, "holes")]
    per_rank = rank_pool(2).run(_dropin_cases, cases, compile_blocks=True)
    for i, case in enumerate(cases):
        for rank, res in enumerate(r[i] for r in per_rank):
            assert res["shape_ok"] and res["err"] < 1e-5 and res["graph_breaks"] == 0, (case, rank, res)


def test_prepare_is_needed_before_a_compiled_first_dropin_call():
    """Building the drop-in's state inside a trace is refused with the way out named (no hang, no wrong call)."""
    pytest.importorskip("diffusers")
    from types import SimpleNamespace

    from sp_kernels.integrations.diffusers import sp_state_for

    cp = SimpleNamespace(_flattened_mesh=object(), ulysses_degree=1, ring_degree=2)

    def fn(x):
        sp_state_for(cp)
        return x + 1

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"prepare\(model\)"):
        torch.compile(fn, fullgraph=True, backend="eager")(torch.ones(2))


def test_bench_train_quick():
    """benchmarks/bench_train.py --quick runs end to end (so the benchmark cannot rot) and prints both tables."""
    from tests.op_utils import run_quick_bench_lines

    lines = run_quick_bench_lines("bench_train.py")
    layer = next(i for i, line in enumerate(lines) if line.startswith("one attention layer"))
    assert [line.split()[0] for line in lines[layer + 3 : layer + 8]] == ["single", "ulysses", "ring", "fused_ring",
                                                                          "usp"], lines
    assert "compiled / eager" in lines[-3] and lines[-1].startswith("ulysses"), lines


def test_route_travels_as_constants_and_a_gone_state_raises():
    """The route a compiled graph bakes in (backend, state key, roles as ints) decodes to the same route; a
    state that no longer exists is a named error, not a call on the wrong groups."""
    from sp_kernels.attn import Roles, Route
    from sp_kernels.attn.compiled import decode_route, encode_route
    from sp_kernels.distributed.parallel_state import SequenceParallelConfig, SPState
    from sp_kernels.plan.context import ShardLayout

    state = SPState(config=SequenceParallelConfig())
    q_layout = ShardLayout(true_len=9, local_len=5, sp_size=2, prefix_len=3)
    kv_layout = ShardLayout(true_len=7, local_len=4, sp_size=2, suffix_len=1)
    for route in (Route("local", None), Route("ring", state, Roles("sharded", q_layout, "same")),
                  Route("ulysses", state, Roles("replicated", None, "sharded", kv_layout)),
                  Route("usp", state, Roles("sharded", None, "replicated"))):
        name, key, roles = encode_route(route)
        assert isinstance(key, str) and all(isinstance(i, int) for i in roles)
        assert decode_route(name, key, roles) == route
    key = state.key
    del state, route
    import gc

    gc.collect()
    with pytest.raises(RuntimeError, match=f"state '{key}' this call was compiled with no longer exists"):
        decode_route("ring", key, roles)
