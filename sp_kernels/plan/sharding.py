"""Shard and gather one tensor across the SP group (used by the hooks and by intrusive code).

Rank ``i`` of P holds rows ``[i*L, (i+1)*L)`` with ``L = ceil(S / P)``; with auto_pad the rows past
``S`` are padding, and the true length is recorded in the SP context so that ``sp_gather`` trims
it and attention excludes it.

Autograd: a shard's backward puts this rank's gradient rows back in place (zeros elsewhere, no
communication) and a gather's backward is a reduce-scatter (``_gather_backward``), so the AVERAGE of a
parameter's gradient over the SP group is the full-sequence gradient (DDP's reduction).

torch.compile: the gather is one library op (``sp_kernels::gather_shards``, with a fake impl and its
backward op), so a compiled model has no graph break here; the shard is the ``shard_pad`` op.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from ..distributed.comm import all_gather_small
from ..distributed.parallel_state import device_of_group, group_by_name, group_name, group_rank, group_size
from ..ops.shard_pad import shard_pad
from .context import ShardLayout, SPContext, current_context, layout_of, tag


def _resolve_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int, int, SPContext | None]:
    """(group, size, rank, context to record into): the SP group of the current context by default."""
    if group is not None:
        return group, group_size(group), group_rank(group), None
    ctx = current_context()
    if ctx is not None:
        return ctx.state.sp_group, ctx.state.sp_size, ctx.state.sp_rank, ctx
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD, dist.get_world_size(), dist.get_rank(), None
    return None, 1, 0, None


def _norm_dim(tensor: torch.Tensor, dim: int, what: str) -> int:
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"{what}: dim={dim} is out of range for a tensor of shape {tuple(tensor.shape)}")
    return dim % tensor.dim()


_MAX_DIMS = 16


def _check_shapes_agree(x: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise on every rank when the ranks' shards differ in shape or dtype.

    A fixed-size metadata exchange cannot itself mismatch, while an all-gather of shards of different
    shapes would hang or scramble data. Costs one tiny collective per gather (once per forward).
    """
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{what}: tensors of more than {_MAX_DIMS} dims are not supported, got {x.dim()}")
    # str hashes differ between processes; crc32 does not.
    meta = [x.dim(), zlib.crc32(str(x.dtype).encode())] + list(x.shape) + [-1] * (_MAX_DIMS - x.dim())
    metas = all_gather_small(meta, group, "gather shapes")
    if any(m != metas[0] for m in metas):
        shapes = [tuple(m[2 : 2 + m[0]]) for m in metas]
        raise ValueError(
            f"{what}: the ranks' shards disagree (shapes by rank: {shapes}, dtypes equal: "
            f"{all(m[1] == metas[0][1] for m in metas)}); every rank must run the same model on inputs of the "
            "same shape"
        )


def _all_gather_cat(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None, size: int, meta_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather equal-shaped shards and concatenate them along ``dim`` in rank order."""
    x = x.contiguous()
    _check_shapes_agree(x, meta_group, "sp_gather")
    if device_of_group(group, x.device).type == "cuda":
        # One collective into one buffer, then one copy to put the rank axis next to dim.
        buf = x.new_empty((size, *x.shape))
        dist.all_gather_into_tensor(buf, x, group=group)
        if dim == 0:
            return buf.flatten(0, 1)
        return buf.movedim(0, dim).flatten(dim, dim + 1)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


# The gather is one torch.library op (its backward another), so torch.compile sees one opaque node with a
# fake impl instead of breaking the graph at the collectives and the host-side shape check.
@torch.library.custom_op("sp_kernels::gather_shards", mutates_args=())
def _gather_shards(x: torch.Tensor, dim: int, keep: int, group: str, meta_group: str) -> torch.Tensor:
    """All-gather ``x`` over ``group`` along ``dim`` in rank order (shapes checked over ``meta_group``, ""
    meaning ``group``), keeping the first ``keep`` rows."""
    g = group_by_name(group)
    full = _all_gather_cat(x, dim, g, group_size(g), group_by_name(meta_group) if meta_group else g)
    # Contiguous, like the fake impl's result: a compiled graph plans views on the strides the fake gives.
    return full.narrow(dim, 0, keep).contiguous() if keep < full.size(dim) else full


@_gather_shards.register_fake
def _(x, dim, keep, group, meta_group):
    shape = list(x.shape)
    shape[dim] = keep
    return x.new_empty(shape)


@torch.library.custom_op("sp_kernels::gather_shards_backward", mutates_args=())
def _gather_shards_backward(grad: torch.Tensor, dim: int, local: int, group: str) -> torch.Tensor:
    """The gather's backward: the sum of every rank's output gradient, this rank's ``local`` rows of it."""
    g = group_by_name(group)
    total = grad.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=g)
    return shard_pad(total, dim, group_rank(g) * local, local)


@_gather_shards_backward.register_fake
def _(grad, dim, local, group):
    shape = list(grad.shape)
    shape[dim] = local
    return grad.new_empty(shape)


def _gather_setup(ctx, inputs, output) -> None:
    x, dim, _, group, _ = inputs
    ctx.dim, ctx.local, ctx.group = dim, x.size(dim), group


def _gather_backward(ctx, grad):
    """Reduce-scatter: all-reduce, then this rank's rows.

    Every rank computes the same loss from the gathered output, so the upstream gradient is the same on
    every rank; summing it over the group makes each rank's gradient P times its share. With that, the
    gradient of every parameter -- used before the gather on a shard (a share) or after it on the
    replicated output (the whole gradient on every rank) -- AVERAGED over the SP group is the
    full-sequence gradient: the reduction DDP applies, so DDP over all ranks needs nothing else.
    """
    return _gather_shards_backward(grad, ctx.dim, ctx.local, ctx.group), None, None, None, None


_gather_shards.register_autograd(_gather_backward, setup_context=_gather_setup)


def _gather(
    x: torch.Tensor, dim: int, keep: int, group: dist.ProcessGroup | None, meta_group: dist.ProcessGroup | None
) -> torch.Tensor:
    """All-gather forward, reduce-scatter backward (``_gather_backward``), ``keep`` rows along ``dim``."""
    return _gather_shards(x.contiguous(), dim, keep, group_name(group), "" if meta_group is group else group_name(meta_group))


def _shard(tensor: torch.Tensor, dim: int, size: int, rank: int, pad_value: float = 0.0) -> tuple[torch.Tensor, int]:
    local = -(-tensor.size(dim) // size)
    if tensor.is_complex():
        # Complex rope tables (Qwen-Image): shard the (re, im) view, whose extra dim comes last.
        real = torch.view_as_real(tensor if tensor.is_contiguous() else tensor.contiguous())
        return torch.view_as_complex(shard_pad(real, dim, rank * local, local, pad_value)), local
    return shard_pad(tensor, dim, rank * local, local, pad_value), local


def shard_and_record(
    tensor: torch.Tensor,
    dim: int,
    ctx: SPContext | None,
    size: int,
    rank: int,
    prefix_len: int = 0,
    source: str = "",
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Shard ``tensor[prefix_len:]`` along ``dim`` (padding at the end), keep the prefix replicated,
    record the layout in ``ctx`` (opening the sharded region) and tag the shard with it."""
    body = tensor.narrow(dim, prefix_len, tensor.size(dim) - prefix_len) if prefix_len else tensor
    true_len = body.size(dim)
    out, local = _shard(body, dim, size, rank, pad_value)
    if prefix_len:
        out = torch.cat([tensor.narrow(dim, 0, prefix_len), out], dim=dim)
    layout = ShardLayout(true_len=true_len, local_len=local, sp_size=size, prefix_len=prefix_len, source=source)
    if ctx is not None:
        ctx.record(layout)
    return tag(out, layout)


def sp_shard(
    tensor: torch.Tensor,
    dim: int,
    validate: bool = True,
    *,
    auto_pad: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's shard of ``tensor`` along ``dim`` (a new contiguous tensor).

    ``group`` defaults to the SP group of the current context (else the default group). A length
    not divisible by the group size raises unless ``auto_pad``, which pads at the end and records
    the true length so that ``sp_gather`` and attention drop the padding. ``validate=False``
    (vLLM-Omni's argument) accepts such a length the same way. Sharding with the SP group records
    the sequence (context.py): gathers and attention read that record.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"sp_shard expects a tensor, got {type(tensor).__name__}")
    dim = _norm_dim(tensor, dim, "sp_shard")
    if not isinstance(validate, bool) or not isinstance(auto_pad, bool):
        raise TypeError(f"sp_shard: validate and auto_pad must be bools, got {validate!r} and {auto_pad!r}")
    group, size, rank, ctx = _resolve_group(group)
    length = tensor.size(dim)
    if length % size != 0 and validate and not auto_pad:
        raise ValueError(
            f"sp_shard: length {length} of dim {dim} (shape {tuple(tensor.shape)}) is not divisible by the "
            f"sequence-parallel size {size}; pass auto_pad=True (SequenceParallelInput(..., auto_pad=True) in a "
            "plan) to pad it"
        )
    if size == 1:
        return tensor
    return shard_and_record(tensor, dim, ctx, size, rank, source="sp_shard")


def sp_shard_with_padding(tensor: torch.Tensor, dim: int, pad_value: float = 0.0) -> tuple[torch.Tensor, int]:
    """Pad ``tensor`` at the end of ``dim`` to a multiple of the SP size with ``pad_value`` and shard it.

    Returns (this rank's shard, number of padding rows added to the whole sequence). The true length
    is recorded like ``sp_shard(..., auto_pad=True)`` so ``sp_gather`` trims it.
    """
    dim = _norm_dim(tensor, dim, "sp_shard_with_padding")
    _, size, rank, ctx = _resolve_group(None)
    length = tensor.size(dim)
    if size == 1:
        return tensor, 0
    out = shard_and_record(tensor, dim, ctx, size, rank, source="sp_shard_with_padding", pad_value=pad_value)
    return out, -(-length // size) * size - length


def gather_and_trim(
    tensor: torch.Tensor,
    dim: int,
    ctx: SPContext | None,
    group,
    size: int,
    rank: int,
    what: str = "sp_gather",
    strict: bool = False,
    layout: ShardLayout | None = None,
    group_name: str | None = None,
) -> torch.Tensor:
    """All-gather along ``dim``, dropping padding and rebuilding ``[prefix | full]`` per the layout of
    ``tensor``: its tag when a split produced it, else the one recorded layout with its local length.
    A length with no layout is gathered as even shards, unless padded sequences exist (their padding
    could not be dropped). Marks the layout gathered (the region closes after the last one).
    ``strict``: refuse a tensor that matches no layout outside the sharded region (the plan's gathers).
    ``layout``, ``group_name``: the sequence's layout and shard_group when the caller knows them (a plan
    gather naming its group)."""
    # The shape check runs over the state's host-side group when gathering over its SP group.
    meta = ctx.state.host_group if ctx is not None and group is ctx.state.sp_group else group
    rows = tensor.size(dim)
    if layout is not None and layout.local_rows != rows:
        raise ValueError(
            f"{what}: the tensor has {rows} rows along dim {dim}, but its sequence ({layout.describe()}) has "
            f"{layout.local_rows} local rows"
        )
    layout = layout if layout is not None else layout_of(tensor)
    if layout is not None and (layout.sp_size != size or layout.local_rows != rows):
        layout = None  # a tag from another cut (e.g. a view of a split tensor along another dim)
    if layout is None and ctx is not None:
        layout = ctx.layout_for_local(rows, what)
        if layout is None and not ctx.sharded and (ctx.layouts or strict):
            # Gathering a replicated tensor would repeat it sp_size times: a silent wrong answer.
            known = sorted({lay.local_rows for lay in ctx.layouts})
            raise RuntimeError(
                f"{what}: gather requested for a tensor of {rows} rows along dim {dim}, but "
                + (f"it matches no sequence sharded in this forward (local rows: {known}) and every sharded "
                   "sequence was gathered already" if ctx.layouts else
                   "the sequence is not sharded in this forward (no split ran before it, or every split was skipped "
                   "by expected_dims)")
                + "; check the plan's split and gather keys"
            )
        padded = [lay for lay in ctx.layouts if lay.pad]
        if layout is None and padded:
            raise ValueError(
                f"{what}: a tensor of {rows} rows along dim {dim} matches no sequence sharded in this forward "
                f"(local rows: {sorted({lay.local_rows for lay in ctx.layouts})}), while auto_pad padded one of them "
                f"({padded[0].describe()}): its padding rows could not be dropped. Gather tensors with the length "
                "of a split, or declare sequences concatenated inside the model in the plan"
            )
    if ctx is not None:
        ctx.mark_gathered(layout, group_name)
    if layout is None:
        return _gather(tensor, dim, rows * size, group, meta)
    return gather_rows(tensor, dim, layout, group, size, rank, meta)


def gather_rows(
    tensor: torch.Tensor,
    dim: int,
    layout: ShardLayout,
    group: dist.ProcessGroup | None,
    size: int,
    rank: int,
    meta_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The whole sequence of a shard cut by ``layout``, on every rank: ``[prefix | true_len rows | suffix]``
    (padding dropped). Differentiable: the backward is a reduce-scatter (``_gather_backward``)."""
    if layout.prefix_len == 0 and layout.suffix_len == 0:
        return _gather(tensor, dim, layout.true_len, group, meta_group)
    prefix = tensor.narrow(dim, 0, layout.prefix_len)
    body = tensor.narrow(dim, layout.prefix_len, layout.local_len)
    suffix = tensor.narrow(dim, layout.prefix_len + layout.local_len, layout.suffix_len)
    full = _gather(body, dim, layout.true_len, group, meta_group)
    return torch.cat([prefix, full, suffix], dim=dim)


def sp_gather(
    tensor: torch.Tensor,
    dim: int,
    validate: bool = True,
    *,
    communication_backend: str = "native",
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """All-gather shards along ``dim`` in rank order and drop the padding recorded by auto_pad.

    A tensor whose local length matches a recorded partial layout ``[prefix | shard]`` comes back
    as ``[prefix | full sequence]``. The sharded region closes once every sharded sequence of the
    forward was gathered. ``validate`` and ``communication_backend`` are vLLM-Omni's arguments: the
    first has no effect there either, the second accepts its two values (both gather the same way).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"sp_gather expects a tensor, got {type(tensor).__name__}")
    if communication_backend not in ("native", "functional"):
        raise ValueError(
            f"sp_gather: communication_backend={communication_backend!r} is unknown; expected 'native' or 'functional'"
        )
    dim = _norm_dim(tensor, dim, "sp_gather")
    group, size, rank, ctx = _resolve_group(group)
    if size == 1:
        return tensor
    return gather_and_trim(tensor, dim, ctx, group, size, rank)
