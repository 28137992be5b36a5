"""SequenceParallelJointInput: replicated text tokens joined to the sharded image tokens inside the
model (MM-DiT joint attention), front or rear, with a text-only refiner attention before the join.
Every backend on 2-4 gloo ranks must equal the same model on one process in float64, for image and
text lengths no SP size divides; a join the plan does not declare is refused, not attended wrongly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from sp_kernels import (
    SequenceParallelConfig,
    SequenceParallelInput,
    SequenceParallelJointInput,
    SequenceParallelOutput,
    apply_sequence_parallel,
    attention,
    remove_sequence_parallel,
    validate_sp_plan,
)
from tests.attention_cases import sp_degrees

HEADS, DIM = 3, 8


class JointBlock(nn.Module):
    """Attention over the text and image tokens concatenated in ``order`` (inline, as MM-DiTs do)."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.qkv_img = nn.Linear(HEADS * DIM, 3 * HEADS * DIM)
        self.qkv_txt = nn.Linear(HEADS * DIM, 3 * HEADS * DIM)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, n, t = img.shape[0], img.shape[1], txt.shape[1]
        qi, ki, vi = self.qkv_img(img).view(B, n, 3, HEADS, DIM).unbind(2)
        qt, kt, vt = self.qkv_txt(txt).view(B, t, 3, HEADS, DIM).unbind(2)
        front = self.order == "front"
        q, k, v = (torch.cat([a, b] if front else [b, a], dim=1) for a, b in ((qt, qi), (kt, ki), (vt, vi)))
        out = attention(q, k, v).flatten(2)
        o_txt, o_img = (out[:, :t], out[:, t:]) if front else (out[:, n:], out[:, :n])
        return img + o_img, txt + o_txt


class Refiner(nn.Module):
    """Self-attention over the text alone (HunyuanVideo's token refiner): replicated. Undeclared, the
    record tells it from the image shard by its length; ``local=True`` declares it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HEADS * DIM, 3 * HEADS * DIM)
        self.local = False

    def forward(self, txt: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(txt).view(*txt.shape[:2], 3, HEADS, DIM).unbind(2)
        return txt + attention(q, k, v, backend="local" if self.local else None).flatten(2)


class MMDiT(nn.Module):
    def __init__(self, order: str) -> None:
        super().__init__()
        self.refiner = Refiner()
        self.blocks = nn.ModuleList([JointBlock(order), JointBlock(order)])
        self.proj_out = nn.Linear(HEADS * DIM, 5)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        txt = self.refiner(txt)
        for block in self.blocks:
            img, txt = block(img, txt)
        return self.proj_out(img)


def _plan(order: str, joint: bool = True) -> dict:
    plan: dict = {"": {"img": SequenceParallelInput(1, expected_dims=3, auto_pad=True)},
                  "proj_out": SequenceParallelOutput(1, expected_dims=3)}
    if joint:
        plan[""]["txt"] = SequenceParallelJointInput(seq_dim=1, joint_strategy=order, expected_dims=3)
    return plan




def _run(backends: tuple[str, ...]) -> list[dict]:
    world = dist.get_world_size()
    results = []
    for order in ("front", "rear"):
        torch.manual_seed(3)
        model = MMDiT(order).double().eval()
        for n, t in ((13, 5), (12, 6), (7, 1)):
            gen = torch.Generator().manual_seed(n * 10 + t)
            img = torch.randn(2, n, HEADS * DIM, generator=gen, dtype=torch.float64)
            txt = torch.randn(2, t, HEADS * DIM, generator=gen, dtype=torch.float64)
            with torch.no_grad():
                ref = model(img, txt)
                local = -(-n // world)
                # The refiner's text has as many rows as a padded image shard: the record cannot tell
                # them apart, so undeclared it must raise (on every rank); declared local it is exact.
                collides = t == local and n % world != 0
                for backend in backends:
                    u, r = sp_degrees(backend, world)
                    cfg = SequenceParallelConfig(ulysses_degree=u, ring_degree=r, attention_backend=backend)
                    for declared in (False, True) if collides else (False,):
                        model.refiner.local = declared
                        apply_sequence_parallel(model, cfg, _plan(order))
                        try:
                            out = model(img, txt)
                            res = {"err": (out - ref).abs().max().item()}
                        except ValueError as e:
                            res = {"collision_error": str(e)}
                        finally:
                            remove_sequence_parallel(model)
                            model.refiner.local = False
                        results.append({"case": (order, n, t, backend, collides, declared), **res})
        # The same join without the JointInput: with padding in play it must raise, not attend it.
        cfg = SequenceParallelConfig(ring_degree=world, attention_backend="ring")
        apply_sequence_parallel(model, cfg, _plan(order, joint=False))
        try:
            with torch.no_grad():
                model(torch.randn(2, 13, HEADS * DIM, dtype=torch.float64),
                      torch.randn(2, 5, HEADS * DIM, dtype=torch.float64))
            results.append({"case": (order, "undeclared"), "error": None})
        except ValueError as e:
            results.append({"case": (order, "undeclared"), "error": str(e)})
        finally:
            remove_sequence_parallel(model)
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_joint_text_matches_single_process(rank_pool, world):
    backends = ("ulysses", "ring", "usp", "fused_ring")
    for results in rank_pool(world).run(_run, backends):
        for res in results:
            if "error" in res:
                assert res["error"] and "matches no sequence sharded" in res["error"], res
            elif res["case"][-2] and not res["case"][-1]:  # colliding lengths, refiner undeclared
                assert "match both the replicated joint tokens" in res.get("collision_error", ""), res
            else:
                assert res.get("err", 1.0) < 1e-12, res


def test_joint_input_validation():
    with pytest.raises(ValueError, match="joint_strategy must be one of"):
        SequenceParallelJointInput(joint_strategy="middle")
    with pytest.raises(ValueError, match="seq_dim=3 is out of range for expected_dims=3"):
        SequenceParallelJointInput(seq_dim=3, expected_dims=3)
    with pytest.raises(ValueError, match=r"\['rope'\]\[0\]: an int key .* requires split_output=True"):
        validate_sp_plan({"rope": {0: SequenceParallelJointInput()}})
    validate_sp_plan({"rope": {1: SequenceParallelJointInput(seq_dim=0, split_output=True)}})
