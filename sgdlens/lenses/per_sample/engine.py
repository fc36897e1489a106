"""The per-sample engine: module and parameter hooks, the rule table, the accumulated sums."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sgdlens._quiet import probing_now
from sgdlens._torch import pytree
from sgdlens._warn import warn
from sgdlens.lenses.per_sample._common import (
    Result,
    Rule,
    Use,
    from_full,
    index_sums,
    narrow,
    tensors,
    wide,
)
from sgdlens.lenses.per_sample.attention import attention, attention_ok
from sgdlens.lenses.per_sample.conv import conv
from sgdlens.lenses.per_sample.embedding import embedding, embedding_ok
from sgdlens.lenses.per_sample.func import func_rule
from sgdlens.lenses.per_sample.linear import is_hf_conv1d, linear
from sgdlens.lenses.per_sample.norm import norm_layer

RULES: dict[type, tuple[Rule, Callable[[nn.Module], bool]]] = {
    nn.Linear: (linear, lambda m: True),
    nn.Conv1d: (conv, lambda m: True),
    nn.Conv2d: (conv, lambda m: True),
    nn.Conv3d: (conv, lambda m: True),
    nn.Embedding: (embedding, embedding_ok),
    nn.LayerNorm: (norm_layer, lambda m: True),
}
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    RULES[nn.RMSNorm] = (norm_layer, lambda m: True)


class _Unit:
    """A module whose forward calls give the per-sample gradients of ``names``."""

    def __init__(self, module: nn.Module, rule: Rule, names: dict[str, int]) -> None:
        self.module, self.rule, self.names = module, rule, names  # names: param name -> index
        self.uses: list[Use] = []
        self.result: dict[str, Result] | None = None
        self.want: dict[str, str] = {}
        self.excluded = False  # its output does not carry the batch (see _exclude)
        self.attention = isinstance(module, nn.MultiheadAttention)


class PerSampleEngine:
    """Hooks computing per-sample gradient statistics of ``params`` inside ``model``.

    Args:
        model: the module whose forward and backward produce the gradients.
        params: the parameters to cover (others are left alone).
        mode: ``"auto"`` (rules where they exist, ``torch.func`` elsewhere), ``"hooks"``
            (rules only; other parameters uncovered) or ``"func"`` (``torch.func`` for all).
        need_elem: also accumulate Σ_s c_s² elementwise.
        keep_last: keep the per-sample squared norms of the last backward in ``last_sq``.
        dtype: dtype of the accumulated ``sq`` scalars.

    Attributes:
        covered: per parameter, whether some hook computes its per-sample statistics (set to
            ``False``, with a warning, for a module whose output turns out not to carry the
            model's batch along its batch dimension).
        elem, count: per parameter, Σ_s c_s² and the number of samples since the last
            :meth:`reset` (``None``/0 before any backward); :meth:`sums` gives Σ_s ‖c_s‖².
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        *,
        mode: str = "auto",
        need_elem: bool = False,
        keep_last: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.model, self.params, self.mode = model, list(params), mode
        self.batch: int | None = None
        self.need_elem, self.keep_last, self.dtype = need_elem, keep_last, dtype
        self.first = ""  # the lens that built a shared engine (see shared_engine)
        self._owners: dict[str, bool] = {}  # lens -> wants elementwise sums (see arm)
        self._handles: list[Any] = []
        self.live = True  # hooks read the passes (False: armed by no lens, see arm)
        self.compiled = is_compiled(model)
        self._busy = False
        index = {id(p): i for i, p in enumerate(self.params)}
        self.units: list[_Unit] = []
        self._visit(model, index)
        self.units_of: list[list[tuple[_Unit, str]]] = [[] for _ in self.params]
        for u in self.units:
            for name, i in u.names.items():
                self.units_of[i].append((u, name))
        for u in self.units:  # a parameter in several units is materialised by each
            u.want = {
                n: "full" if len(self.units_of[i]) > 1 else "norm" for n, i in u.names.items()
            }
        # a frozen parameter (requires_grad=False) gets no gradient and takes no hook
        self.covered = [bool(us) and p.requires_grad for us, p in zip(self.units_of, self.params)]
        n = len(self.params)
        self._parts: list[list[Tensor]] = [[] for _ in range(n)]  # per-sample ‖c_s‖² vectors
        self._roots: list[list[Tensor]] = [[] for _ in range(n)]  # per-sample ‖c_s‖ vectors
        self._index: dict[tuple[tuple[int, int], ...], Tensor] = {}
        self.elem: list[Tensor | None] = [None] * n
        self.count = [0] * n
        self.last_sq: list[Tensor | None] = [None] * n
        self._grads: list[weakref.ref[Tensor] | None] = [None] * n  # the .grad last read

    def _visit(self, module: nn.Module, index: dict[int, int]) -> None:
        rule = RULES.get(type(module), (linear, is_hf_conv1d))
        if self.mode != "func" and rule[1](module):
            names = {
                n: index[id(p)] for n, p in module.named_parameters(recurse=False) if id(p) in index
            }
            if names:
                self.units.append(_Unit(module, rule[0], names))
            return
        if isinstance(module, nn.MultiheadAttention):  # reads out_proj's weights directly
            # it re-runs the attention, so, like torch.func, not in "hooks" (hooks only)
            if self.mode != "hooks":
                names = {n: index[id(p)] for n, p in module.named_parameters() if id(p) in index}
                how = attention if self.mode == "auto" and attention_ok(module) else func_rule
                if names:
                    self.units.append(_Unit(module, how, names))
            return
        for child in module.children():
            self._visit(child, index)
        if self.mode != "hooks":
            names = {
                n: index[id(p)] for n, p in module.named_parameters(recurse=False) if id(p) in index
            }
            if names:
                self.units.append(_Unit(module, func_rule, names))

    def arm(self, owner: str, on: bool, *, elem: bool = False) -> None:
        """Let ``owner`` (a lens) switch the hooks on for the next backward passes, or off.

        The engine is shared by every lens of a monitor: its hooks are registered while any
        owner wants them, and the elementwise sums are taken while any owner asks for them.
        """
        armed = self._owners
        if on:
            armed[owner] = elem
        else:
            armed.pop(owner, None)
        self.need_elem = any(armed.values())
        self.live = bool(armed)
        if self.compiled:  # its hooks stay registered from the start (see shared_engine)
            return
        if armed and not self._handles:
            self._handles = self.attach()
        elif not armed:
            self.detach()

    def release(self, owner: str) -> None:
        """``owner`` is done (its monitor closed); the last one out removes the hooks."""
        self.arm(owner, False)
        if not self._owners:
            self.detach()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def attach(self) -> list[Any]:
        """Register the hooks; returns their handles (:meth:`arm` manages them for lenses)."""
        # wrapped here, once: building a torch.compiler.disable wrapper costs ~0.3 ms (more
        # than the rules' arithmetic, were it built per output per forward), and the first
        # one imports torch._dynamo (~0.8 s), which importing sgdlens must not
        self._store = eager(_store)
        handles = [self.model.register_forward_pre_hook(eager(self._on_model), with_kwargs=True)]
        try:
            for u in self.units:
                handles.append(
                    u.module.register_forward_hook(
                        eager(partial(self._on_forward, u)), with_kwargs=True
                    )
                )
            for i, p in enumerate(self.params):
                if self.covered[i] and p.requires_grad:
                    hook = eager(partial(self._on_param, i))
                    handles.append(p.register_post_accumulate_grad_hook(hook))
        except BaseException:  # never leave half the hooks behind
            for h in handles:
                h.remove()
            raise
        return handles

    def _training_pass(self) -> bool:
        """Whether the forward pass running now may be the step's: armed, with gradients,
        not the engine's own re-run, a ``torch.func`` transform or a probe."""
        return (
            not self._busy
            and self.live
            and torch.is_grad_enabled()
            and not _transformed()
            and not probing_now()
        )

    def _on_model(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The batch size: dimension 0 of the model's first tensor input."""
        if self._training_pass():
            leaf = args[0] if args else None  # the usual first leaf, without a tree walk
            if not isinstance(leaf, Tensor) or leaf.dim() == 0:
                leaf = next(
                    (
                        t
                        for t in pytree.tree_leaves((args, kwargs))
                        if isinstance(t, Tensor) and t.dim() > 0
                    ),
                    None,
                )
            self.batch = None if leaf is None else int(leaf.shape[0])

    def _exclude(self, unit: _Unit, why: str) -> None:
        """Leave a unit out of the per-sample statistics, with a warning saying why."""
        unit.uses, unit.result, unit.excluded = [], {}, True
        for i in unit.names.values():
            self.covered[i] = False
        warn(
            f"per-sample gradients of {type(unit.module).__name__} parameters "
            f"{sorted(unit.names)} cannot be read from module hooks: {why}; they are left out "
            f"of the per-sample statistics",
        )

    def reset(self) -> None:
        """Forget the statistics and any pending forward calls (after an optimizer step)."""
        n = len(self.params)
        self._parts, self.elem, self.count = [[] for _ in range(n)], [None] * n, [0] * n
        self._roots = [[] for _ in range(n)]
        for u in self.units:
            u.uses, u.result = [], None

    # -- hooks ---------------------------------------------------------------------------

    def _on_forward(self, unit: _Unit, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        if not self._training_pass() or unit.excluded:
            return
        if unit.result is not None:  # the previous backward is over
            unit.uses, unit.result = [], None
        outs = [out] if isinstance(out, Tensor) else tensors(out)
        seq_first = unit.attention and not module.batch_first
        if seq_first and unit.rule is func_rule:
            self._exclude(
                unit,
                "the torch.func rule splits dimension 0, and this attention "
                "is sequence-first (batch_first=False)",
            )
            return
        first = next((t for t in outs if t.dim() > 0), None)  # a loss may come first
        if first is not None and self.batch is not None:
            size = first.shape[1 if seq_first and first.dim() > 1 else 0]
            if size != self.batch:
                self._exclude(
                    unit,
                    f"its output has {size} along the batch dimension where the "
                    f"model's input has {self.batch} (an output shared by the whole "
                    f"batch, such as position embeddings, or a flattened batch)",
                )
                return
        use = Use(args, kwargs, outs)
        for j, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(partial(self._store, use, j))
        unit.uses.append(use)

    def _on_param(self, i: int, p: Tensor) -> None:
        """After a backward pass accumulated into ``p.grad`` (never for ``autograd.grad``
        passes: HVPs, gradient penalties' inner gradients, other tools' extra passes)."""
        if self._busy or not self.live or not self.covered[i] or probing_now():
            return
        last = self._grads[i]
        if last is None or last() is not p.grad:  # a new .grad: a new accumulation cycle
            self._parts[i], self._roots[i], self.elem[i], self.count[i] = [], [], None, 0
            self._grads[i] = weakref.ref(p.grad) if p.grad is not None else None
        results = []
        for u, name in self.units_of[i]:
            if u.result is None:
                self._busy = True
                try:
                    u.result = self._process(u)
                except Exception as err:  # a statistic must never stop training
                    self._exclude(u, repr(err))
                finally:
                    self._busy = False
            if u.result is not None and name in u.result:
                results.append(u.result[name])
        if not results or not self.covered[i]:  # a unit of a shared parameter was dropped
            return
        if len(results) == 1 and results[0][0] != "full":
            kind, sq, elem = results[0]
        else:
            full = results[0][1]
            for r in results[1:]:
                full = full + r[1]
            kind, sq, elem = from_full(full, self.need_elem)
        # a "root" (‖c_s‖, from Goodfellow's trick) is squared at the step, with the others
        (self._roots if kind == "root" else self._parts)[i].append(sq)
        if self.need_elem and elem is not None:
            e = elem.to(torch.promote_types(p.dtype, torch.float32))
            self.elem[i] = e if self.elem[i] is None else self.elem[i] + e  # type: ignore[operator]
        self.count[i] += int(sq.shape[0])
        if self.keep_last:
            self.last_sq[i] = (sq.square() if kind == "root" else sq).detach()

    def sums(
        self, device: torch.device, slots: Sequence[int] | None = None, size: int | None = None
    ) -> Tensor:
        """Σ_s ‖c_s‖² per parameter since the last :meth:`reset` (0 where none), in ``dtype``;
        with ``slots``, parameter ``i``'s sum goes to entry ``slots[i]`` of ``size`` (e.g. its
        layer: the sums per layer in the same two ops).

        The hooks keep each backward's per-sample vector; one concatenation and one
        ``index_add_`` per step sum them.
        """
        return index_sums(
            self._parts, self.dtype, device, self._index, slots=slots, size=size, roots=self._roots
        )

    def _process(self, unit: _Unit) -> dict[str, Result]:
        uses = [u for u in unit.uses if any(g is not None for g in u.grads)]
        if not uses:
            return {}
        rule = unit.rule
        if rule is attention and any(g is not None for u in uses for g in u.grads[1:]):
            rule = func_rule  # the attention weights reach the loss: the rule ignores them
        with torch.no_grad() if torch.is_grad_enabled() else _NOTHING:
            for u in uses:  # outputs that got no gradient contribute zero
                u.got = [g is not None for g in u.grads]  # (never `None in`: Tensor.__eq__)
                if not all(u.got):
                    u.grads = [o.zeros() if g is None else g for o, g in zip(u.output, u.grads)]
                if rule is not func_rule and narrow(u.args, u.grads):  # half-precision
                    # products and squares lose the small differences the estimators
                    # take: the rules work in float32
                    u.args = tuple(wide(a) for a in u.args)
                    u.grads = [wide(g) for g in u.grads]
            res = rule(unit.module, uses, unit.want, self.need_elem)
        for u in uses:
            u.args = u.kwargs = None
            u.grads = []
        return res


#: the context ``_process`` enters where grad mode is already off (a backward pass without
#: ``create_graph``): entering ``torch.no_grad()`` there costs more than the check
_NOTHING = nullcontext()


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs through ``torch.compile`` (``torch.compile(m)``
    wraps it in an ``OptimizedModule``; ``m.compile()`` sets a compiled call)."""
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
        for m in model.modules()
    )


def eager(hook: Any) -> Any:
    """``hook`` kept out of ``torch.compile``'s graphs: a compiled model calls it as Python,
    every time (traced, its checks and side effects would be decided once, at compile time)."""
    return torch.compiler.disable(hook, recursive=True)


def _store(use: Use, j: int, grad: Tensor) -> None:
    if j < len(use.grads):  # a pass after the use was processed (another tool's HVP) is not
        use.grads[j] = grad  # the step's backward: it is left alone


def _transformed() -> bool:
    """Whether a ``torch.func`` transform is running (its forward passes are not training)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class Disarm:
    """The handle a lens gives the monitor: on close, the lens no longer wants the hooks."""

    def __init__(self, engine: PerSampleEngine, owner: str) -> None:
        self.engine, self.owner = engine, owner

    def remove(self) -> None:
        self.engine.release(self.owner)


def shared_engine(view: Any, model: nn.Module, mode: str, owner: str) -> PerSampleEngine:
    """The one per-sample engine of a monitor (kept on its :class:`ParamView`), built by the
    first lens that asks; a lens asking for another ``per_sample`` mode is refused."""
    engine = view.shared.get("per_sample")
    if engine is None:
        engine = PerSampleEngine(model, list(view.params), mode=mode, dtype=view.dtype)
        view.shared["per_sample"] = engine
        engine.first = owner
        if engine.compiled:
            # Compiled code does not see hooks added after it was traced, and adding and
            # removing them at every log point would recompile it each time: a compiled
            # model gets its hooks once, idle while no lens arms them, and compiled code
            # traced without them is dropped.
            engine.live = False
            engine._handles = engine.attach()
            torch.compiler.reset()
    elif engine.mode != mode:
        raise ValueError(
            f"{owner}(per_sample={mode!r}) and {engine.first}(per_sample={engine.mode!r}) share "
            f"the monitor's one per-sample engine; give both the same per_sample="
        )
    return engine
