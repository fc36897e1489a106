"""The ``torch.func`` fallback: ``vmap`` over the ``vjp`` of a module re-run on each sample."""

from __future__ import annotations

from torch import Tensor, nn

from sgdlens._torch import pytree
from sgdlens.lenses.per_sample._common import Result, Use, from_full, tensors


def func_rule(m: nn.Module, uses: list[Use], want: dict[str, str], need: bool) -> dict[str, Result]:
    """The torch.func fallback: vmap over the vjp of the module re-run on one sample."""
    from torch.func import functional_call, vjp, vmap

    names = list(want)
    own = dict(m.named_parameters())
    params = {n: own[n].detach() for n in names}
    totals: dict[str, Tensor] = {}
    for use in uses:
        leaves, spec = pytree.tree_flatten((use.args, use.kwargs))
        tens = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        batch = leaves[tens[0]].shape[0]
        dims = tuple(
            0 if leaves[i].dim() > 0 and leaves[i].shape[0] == batch else None for i in tens
        )
        cot_dims = tuple(0 if o.dim() > 0 and o.shape[0] == batch else None for o in use.output)
        for j, (d, got) in enumerate(zip(cot_dims, use.got)):
            if d is None and got:
                raise ValueError(
                    f"its output {j} (shape {tuple(use.output[j].shape)}) has no batch dimension "
                    f"and gets a gradient (a loss computed inside the module, say)"
                )
        cots = tuple(o.zeros() if gr is None else gr for o, gr in zip(use.output, use.grads))
        buffers = {n: b.clone() for n, b in m.named_buffers()}

        def one(cot: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> dict[str, Tensor]:
            filled = list(leaves)  # noqa: B023 - used at once by vmap below
            for i, x, d in zip(tens, xs, dims):  # noqa: B023
                filled[i] = x.unsqueeze(0) if d == 0 else x
            args, kwargs = pytree.tree_unflatten(filled, spec)  # noqa: B023

            def f(ps: dict[str, Tensor]) -> tuple[Tensor, ...]:
                out = functional_call(m, ({**ps, **buffers}), tuple(args), kwargs)  # noqa: B023
                return tuple(tensors(out))

            pull = vjp(f, params)[1]
            return pull(tuple(c.unsqueeze(0) if d == 0 else c for c, d in zip(cot, cot_dims)))[0]  # noqa: B023

        grads = vmap(one, in_dims=(cot_dims, dims), randomness="different")(
            cots, tuple(leaves[i] for i in tens)
        )
        for n in names:
            totals[n] = grads[n] if n not in totals else totals[n] + grads[n]
    return {
        n: ("full", totals[n], None) if w == "full" else from_full(totals[n], need)
        for n, w in want.items()
    }
