"""Attention under torch.compile: one library op per call, so a compiled model has no graph break in it.

While dynamo traces ``attention()``, everything that depends only on the plan and on shapes runs as
traced Python: input validation, the record of the forward (context.py) and ``read_roles``, which
decide the call's ``Route``. What depends on data or communicates -- the cross-rank agreement, the
mask judgements, the backend with its collectives, streams and kernel choice -- runs inside one op,
``sp_kernels::attention``, whose implementation is the eager path (``run_route``) and whose fake impl
gives the output's shape. The route travels to the op as constants: the backend name, the SP state's
key (``SPState.key``) and the roles as ints.

Backward: ``sp_kernels::attention_backward`` recomputes the call under autograd with the backend's
differentiable implementation (attn/grad.py) and differentiates it, as activation checkpointing of
the attention call would: the compiled forward keeps no autograd graph of the op's inside (an output
cannot carry one to the backward: a compiled graph hands the backward other tensor objects), and the
backward costs one more forward of the attention (and its communication). Eager calls are not
affected: they keep the graph of the differentiable backends and recompute nothing.
"""

from __future__ import annotations

import torch

from ..distributed.parallel_state import state_for_key
from ..plan.context import ShardLayout
from .call import Joint

Tensor = torch.Tensor

_QUERY = ("sharded", "replicated")
_KV = ("same", "replicated", "sharded")
_LAYOUT_INTS = 6  # present, true_len, local_len, sp_size, prefix_len, suffix_len


def _layout_ints(layout: ShardLayout | None) -> list[int]:
    if layout is None:
        return [0] * _LAYOUT_INTS
    return [1, layout.true_len, layout.local_len, layout.sp_size, layout.prefix_len, layout.suffix_len]


def _layout(ints: list[int]) -> ShardLayout | None:
    if not ints[0]:
        return None
    return ShardLayout(*ints[1:_LAYOUT_INTS], source="a compiled call")


def encode_route(route) -> tuple[str, str, list[int]]:
    """(backend name, state key or "", roles as ints) of a ``Route``: constants in a compiled graph."""
    state_key = route.state.key if route.state is not None else ""
    roles = route.roles
    if roles is None:
        return route.name, state_key, []
    return route.name, state_key, [
        _QUERY.index(roles.query), _KV.index(roles.kv), *_layout_ints(roles.q_layout), *_layout_ints(roles.kv_layout)
    ]


def decode_route(name: str, state_key: str, roles: list[int]):
    from . import Roles, Route

    state = state_for_key(state_key, "attention") if state_key else None
    if not roles:
        return Route(name, state)
    q_layout = _layout(roles[2 : 2 + _LAYOUT_INTS])
    kv_layout = _layout(roles[2 + _LAYOUT_INTS : 2 + 2 * _LAYOUT_INTS])
    return Route(name, state, Roles(_QUERY[roles[0]], q_layout, _KV[roles[1]], kv_layout))


def _run(query, key, value, joint_query, joint_key, joint_value, attn_mask, key_padding_mask, scale, causal,
         joint_strategy, backend, state, roles, refusal, needs_grad) -> Tensor:
    from . import run_route

    joint = Joint(joint_query, joint_key, joint_value, joint_strategy) if joint_query is not None else None
    return run_route(
        decode_route(backend, state, roles), query, key, value, scale=scale, causal=causal, joint=joint,
        mask=attn_mask, key_padding_mask=key_padding_mask, refusal=refusal, memo=None, needs_grad=needs_grad,
    )


@torch.library.custom_op("sp_kernels::attention", mutates_args=())
def attention_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    joint_query: Tensor | None,
    joint_key: Tensor | None,
    joint_value: Tensor | None,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    scale: float,
    causal: bool,
    joint_strategy: str,
    backend: str,
    state: str,
    roles: list[int],
    refusal: str | None,
    needs_grad: bool,
) -> Tensor:
    """One attention call on its route (``encode_route``); the eager path, run as one op."""
    inputs = (query, key, value, joint_query, joint_key, joint_value)
    out = _run(*inputs, attn_mask, key_padding_mask, scale, causal, joint_strategy, backend, state, roles, refusal,
               needs_grad)
    # An op's output may not alias its inputs (a local call of a backend may hand back a view of one), and it
    # has the fake impl's (contiguous) strides, on which a compiled graph plans its views.
    if _aliases(out, inputs):
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _aliases(out: Tensor, inputs) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(t is not None and t.untyped_storage().data_ptr() == storage for t in inputs)


@attention_op.register_fake
def _(query, key, value, joint_query, joint_key, joint_value, attn_mask, key_padding_mask, scale, causal,
      joint_strategy, backend, state, roles, refusal, needs_grad):
    B, S, H, D = query.shape
    J = joint_query.shape[1] if joint_query is not None else 0
    return query.new_empty((B, J + S, H, D))


@torch.library.custom_op("sp_kernels::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    joint_query: Tensor | None,
    joint_key: Tensor | None,
    joint_value: Tensor | None,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    scale: float,
    causal: bool,
    joint_strategy: str,
    backend: str,
    state: str,
    roles: list[int],
) -> list[Tensor]:
    """Gradients of (query, key, value, joint query, key, value) of ``attention_op``; an empty tensor for
    joint tensors not passed. Recomputes the call under autograd (every rank of the route's groups runs it)."""
    inputs = (query, key, value, joint_query, joint_key, joint_value)
    with _autograd_dispatch(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
        out = _run(*leaves, attn_mask, key_padding_mask, scale, causal, joint_strategy, backend, state, roles, None,
                   True)
        given = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(out, given, grad_out, allow_unused=True)
    it = iter(grads)
    result = []
    for t in leaves:
        if t is None:
            result.append(query.new_empty(0))
            continue
        g = next(it)
        result.append(torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None else g.contiguous())
    return result


def _autograd_dispatch():
    """Autograd back on inside an op's implementation: the dispatcher runs implementations with the autograd
    keys excluded (below autograd), and the recompute needs them to record its graph."""
    C = torch._C
    if not (hasattr(C, "_ForceDispatchKeyGuard") and hasattr(C, "_dispatch_tls_local_exclude_set")):
        raise RuntimeError(
            f"sp_kernels: the backward of a compiled attention call needs torch._C._ForceDispatchKeyGuard, which torch "
            f"{torch.__version__} lacks; train without torch.compile around the attention"
        )
    exclude = C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor"):
        exclude = exclude.remove(getattr(C.DispatchKey, key))
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exclude)


@attention_backward_op.register_fake
def _(grad_out, query, key, value, joint_query, joint_key, joint_value, attn_mask, key_padding_mask, scale, causal,
      joint_strategy, backend, state, roles):
    return [t.new_empty(t.shape) if t is not None else query.new_empty(0)
            for t in (query, key, value, joint_query, joint_key, joint_value)]


def _setup_context(ctx, inputs, output) -> None:
    (query, key, value, jq, jk, jv, attn_mask, kpm, scale, causal, strategy, backend, state, roles, _, _) = inputs
    ctx.save_for_backward(query, key, value, jq, jk, jv, attn_mask, kpm)
    ctx.args = (scale, causal, strategy, backend, state, roles)
    ctx.has_joint = jq is not None


def _backward(ctx, grad_out):
    query, key, value, jq, jk, jv, attn_mask, kpm = ctx.saved_tensors
    grads = attention_backward_op(grad_out.contiguous(), query, key, value, jq, jk, jv, attn_mask, kpm, *ctx.args)
    if not ctx.has_joint:
        grads = [*grads[:3], None, None, None]
    return (*grads, None, None, None, None, None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(
    route,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    scale: float,
    causal: bool,
    joint: Joint | None,
    mask: Tensor | None,
    key_padding_mask: Tensor | None,
    refusal: str | None,
) -> Tensor:
    """``run_route`` as the ``sp_kernels::attention`` op (called while dynamo traces)."""
    jq, jk, jv = (joint.query, joint.key, joint.value) if joint is not None else (None, None, None)
    strategy = joint.strategy if joint is not None else "front"
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, jq, jk, jv))
    name, state, roles = encode_route(route)
    return attention_op(query, key, value, jq, jk, jv, mask, key_padding_mask, scale, causal, strategy, name, state,
                        roles, refusal, needs_grad)
