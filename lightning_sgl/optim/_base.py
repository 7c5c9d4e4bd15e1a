"""The ``torch.optim`` front end shared by every Group optimizer.

A subclass only names its moment rule and validates/declares its own hyperparameters; state
initialisation, grouping, dense and lazy sparse updates, non-finite handling and the compiled path
live here and call :mod:`._functional` (the one implementation of Algorithm 1).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._functional import (
    apply_dense_,
    apply_rows_,
    from_groups,
    group_norms,
    reprox_rows_,
    rowwise_view,
    support_rows,
    to_groups,
)
from ._moments import get_rule
from ._validation import (
    GROUP_BY_OPTIONS,
    NONFINITE_OPTIONS,
    NonFiniteGradientError,
    check_bool,
    check_choice,
    check_lambdas,
    check_positive,
)

EMBEDDING_MARK = "_sgl_embedding"


def _is_view_of(view: Tensor, t: Tensor) -> bool:
    """``view`` shares ``t``'s storage (writes to it reach ``t``)."""
    return view.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def mark_embedding(obj) -> Any:
    """Mark a parameter (or every 2-D parameter of a module) as an embedding table.

    ``group_by="auto"`` (the default) then groups it by row (one row = one feature) and applies
    the lambdas to it; unmarked parameters get no regulariser under ``auto``. The mark is a
    Python attribute of the parameter: ``copy.deepcopy`` of a model keeps the data only (torch's
    ``Parameter.__deepcopy__``), so mark the copy again. Returns ``obj``.

    Example::

        model.embedding = mark_embedding(nn.Embedding(num_ids, 16))
        opt = GroupAdam(model.parameters(), lr=1e-3, lambda21=1e-4)   # the MLP stays plain Adam
    """
    params = [obj] if isinstance(obj, torch.nn.Parameter) else list(obj.parameters())
    for p in params:
        if p.dim() == 2:
            setattr(p, EMBEDDING_MARK, True)
    return obj


def _looks_like_embedding(p: Tensor, name: str | None) -> bool:
    if getattr(p, EMBEDDING_MARK, False):
        return True
    return name is not None and "emb" in name.lower()


#: the layout ``group_by="auto"`` gives a parameter that is not an embedding table: no groups
#: and no regulariser at all (the base optimizer's step)
PLAIN = "plain"


def resolve_group_by(p: Tensor, option: str, name: str | None = None) -> str:
    """The group layout of parameter ``p`` under the param group option ``option``.

    ``auto`` (the default) regularises embedding tables only, as the paper does (Section 4.1):
    a 2-D parameter marked with :func:`mark_embedding` (parameters that receive sparse
    gradients, ``nn.Embedding(sparse=True)``, are marked at their first step), or whose name
    (when the optimizer was given ``named_parameters()``) contains ``"emb"``, -> ``row`` (one row = one feature); every
    other parameter (MLP weights, biases, unmarked unnamed tensors) -> ``"plain"``: no lambda
    acts on it, it takes the base optimizer's step. Dense groups are opt-in: ``row``,
    ``column`` (``nn.Linear`` weights ``[out, in]``: one group per input unit) or ``tensor``.
    """
    check_choice("group_by", option, GROUP_BY_OPTIONS)
    if option == "auto":
        return "row" if p.dim() == 2 and _looks_like_embedding(p, name) else PLAIN
    if option in ("row", "column") and p.dim() != 2:
        raise ValueError(
            f"Invalid group_by: {option!r} needs a 2-D parameter, got shape {tuple(p.shape)}"
            + (f" ({name})" if name else "")
            + "; use 'tensor' or 'none' for it")
    return option


class GroupOptimizer(Optimizer):
    """Base class of the Group optimizers (Algorithm 1 of Yue et al.): the ``torch.optim``
    front end of the math core (:mod:`lightning_sgl.optim.functional`).

    A new optimizer is one moment rule and one spec in the math core plus a thin subclass that
    sets ``rule`` (the rule's name) and validates its own hyperparameters in
    ``_validate_extra(group)``; state, grouping, dense and lazy sparse steps, the non-finite
    policy and the compiled path live here.

    Args:
        params: an iterable of parameters or param-group dicts.
        defaults: the hyperparameters of every param group (``lr``, the lambdas, the flags
            ``group_by``, ``rowwise``, ``exact_group_norm``, ``nonfinite``, ``compiled`` and the
            rule's own), validated here; see the subclasses for their meaning. Two more
            param-group keys (default ``False``): ``track_seen`` (one byte per row: the row
            was trained) and ``fixed_support`` (the refit of a relaxed group lasso: only rows in
            the support train, see :func:`~lightning_sgl.optim.functional.support_rows` and
            ``_lazy``).

    Reference:
        Yue et al., "Adaptive Optimizers with Sparse Group Lasso for Neural Networks in CTR
        Prediction", Algorithm 1.
    """

    rule: ClassVar[str]
    _flags = ("group_by", "rowwise", "exact_group_norm", "nonfinite", "compiled", "track_seen",
              "fixed_support")

    def __init__(self, params, defaults: dict):
        self._validate(defaults, params=None)
        super().__init__(params, defaults)
        self._checked_lambdas = False

    def _warn_if_regularisers_act_nowhere(self) -> None:
        """Warn once (at the first step, when sparse tables are known) if a param group sets
        lambdas that reach none of its parameters."""
        self._checked_lambdas = True
        for i, group in enumerate(self.param_groups):
            lams = [k for k in ("lambda1", "lambda21", "lambda2") if float(group[k]) > 0]
            if lams and all(resolve_group_by(p, group["group_by"], n) == PLAIN for p, n in self._named(group)):
                warnings.warn(
                    f"{type(self).__name__}: {', '.join(lams)} set in param group {i}, but none "
                    "of its parameters is an embedding table, so no regulariser acts: "
                    "group_by='auto' regularises only tables marked with mark_embedding(...) or "
                    "named '*emb*' (pass model.named_parameters()). Mark the tables, or give "
                    "their param group group_by='row'.", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ validation
    def _validate_extra(self, group: dict) -> None:  # pragma: no cover - overridden
        pass

    def _validate(self, group: dict, params) -> None:
        check_positive("lr", group["lr"])
        check_lambdas(group["lambda1"], group["lambda21"], group["lambda2"])
        check_choice("group_by", group["group_by"], GROUP_BY_OPTIONS)
        check_choice("nonfinite", group["nonfinite"], NONFINITE_OPTIONS)
        check_bool("rowwise", group["rowwise"])
        check_bool("exact_group_norm", group["exact_group_norm"])
        check_bool("compiled", group["compiled"])
        group.setdefault("track_seen", False)
        check_bool("track_seen", group["track_seen"])
        group.setdefault("fixed_support", False)
        check_bool("fixed_support", group["fixed_support"])
        if group["rowwise"] and not get_rule(self.rule).second_moment_names:
            raise ValueError(f"Invalid rowwise: True ({type(self).__name__} has no second moment)")
        self._validate_extra(group)
        if params is not None:
            for p, n in self._named(group):
                resolve_group_by(p, group["group_by"], n)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group, group["params"])
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _named(group: dict):
        """``(param, name or None)`` pairs of a param group."""
        return zip(group["params"], group.get("param_names") or [None] * len(group["params"]))

    def _group_states(self, state: dict, group: dict, group_by: str) -> tuple[Tensor, ...]:
        """The moment states in group-matrix layout (row-wise ones as ``[G, 1]`` views)."""
        rule = get_rule(self.rule)
        return tuple(rowwise_view(state[n]) if group["rowwise"] and n in rule.second_moment_names
                     else to_groups(state[n], group_by) for n in rule.state_names)

    def _hp(self, group: dict, group_by: str) -> dict:
        hp = {k: v for k, v in group.items()
              if k not in ("params", "param_names", "initial_lr", *self._flags)}
        if group_by in ("none", PLAIN):
            hp["lambda21"] = 0.0
        if group_by == PLAIN:
            hp["lambda1"] = hp["lambda2"] = 0.0
        return hp

    def _state_shapes(self, p: Tensor, group: dict, name: str | None) -> dict[str, tuple]:
        """The shape of every state tensor of ``p`` under ``group``'s settings (``seen``, if
        tracked, is one byte per row)."""
        rule = get_rule(self.rule)
        gb = resolve_group_by(p, group["group_by"], name)
        n_groups = to_groups(p, gb).shape[0]
        shapes = {"step": (), "dual": tuple(p.shape)}
        for n in rule.state_names:
            rw = group["rowwise"] and n in rule.second_moment_names
            shapes[n] = (n_groups,) if rw else tuple(p.shape)
        return shapes

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, after checking that ``state_dict`` comes
        from this optimizer type with these parameters: every hyperparameter present, the state
        names of this optimizer's rule and their shapes. A mismatch raises ``ValueError`` naming
        it, and nothing is loaded."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if groups is None or "state" not in state_dict:
            raise ValueError(f"Invalid state_dict for {type(self).__name__}: expected the keys "
                             "'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict for {type(self).__name__}: {len(groups)} param "
                             f"groups, this optimizer has {len(self.param_groups)}")
        rule = get_rule(self.rule)
        by_index = {}
        for gi, (saved, current) in enumerate(zip(groups, self.param_groups)):
            missing = sorted(k for k in self.defaults if k not in saved)
            if missing:
                raise ValueError(
                    f"Invalid state_dict for {type(self).__name__}: param group {gi} has no "
                    f"{', '.join(missing)} (it was saved by another optimizer type?)")
            if len(saved["params"]) != len(current["params"]):
                raise ValueError(
                    f"Invalid state_dict for {type(self).__name__}: param group {gi} holds "
                    f"{len(saved['params'])} parameters, this optimizer's holds "
                    f"{len(current['params'])}")
            merged = {**current, **{k: v for k, v in saved.items() if k != "params"}}
            for idx, (p, name) in zip(saved["params"], self._named(current)):
                by_index[idx] = (p, name, merged)
        for idx, st in state_dict["state"].items():
            if idx not in by_index:
                raise ValueError(f"Invalid state_dict for {type(self).__name__}: state for "
                                 f"parameter index {idx!r}, which no param group lists")
            p, name, group = by_index[idx]
            shapes = self._state_shapes(p, group, name)
            label = name or f"parameter {idx} {tuple(p.shape)}"
            want = set(shapes) | ({"seen"} if "seen" in st else set())
            if set(st) != want:
                raise ValueError(
                    f"Invalid state_dict for {type(self).__name__} ({rule.name}): {label} has "
                    f"states {sorted(st)}, expected {sorted(want)}")
            for key, shape in {**shapes, **({"seen": (p.shape[0],)} if "seen" in st else {})}.items():
                got = tuple(st[key].shape) if torch.is_tensor(st[key]) else None
                if got != shape:
                    raise ValueError(
                        f"Invalid state_dict for {type(self).__name__}: {label} state "
                        f"{key!r} has shape {got}, expected {shape}")
        super().load_state_dict(state_dict)

    def _init_state(self, p: Tensor, group_by: str, rowwise: bool) -> dict:
        rule = get_rule(self.rule)
        state = self.state[p]
        if state:
            return state
        n_groups = to_groups(p, group_by).shape[0]
        init = float(self.defaults.get("initial_accumulator_value", 0.0))
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["dual"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for name in rule.state_names:
            v = init if name == "sum" else 0.0
            if rowwise and name in rule.second_moment_names:
                state[name] = torch.full((n_groups,), v, dtype=p.dtype, device=p.device)
            else:
                state[name] = torch.full_like(p, v, memory_format=torch.preserve_format)
        return state

    def _collect(self):
        """Validate everything and gather the work; raises before any state is modified."""
        work = []
        for group in self.param_groups:
            self._validate(group, params=None)
            for p, name in self._named(group):
                if p.grad is None:
                    continue
                if p.grad.is_sparse and p.dim() == 2:
                    # a 2-D parameter with sparse gradients (nn.Embedding(sparse=True)) is a table
                    mark_embedding(p)
                gb = resolve_group_by(p, group["group_by"], name)
                if p.grad.is_sparse and (gb not in ("row", "none") or p.dim() != 2):
                    raise ValueError(
                        f"Invalid group_by: {gb!r} for a sparse gradient of shape "
                        f"{tuple(p.shape)} (valid: 'row' or 'none' on a 2-D embedding table)")
                work.append((group, p, name, gb))
        if not self.__dict__.get("_checked_lambdas", False):
            self._warn_if_regularisers_act_nowhere()
        return work

    @staticmethod
    def _finite_flags(tensors: list[Tensor]) -> list[bool]:
        """Whether each tensor is free of NaN/Inf, with one cheap pass and one sync.

        A tensor's sum is non-finite whenever an element is (NaN and Inf propagate); only when
        a sum is non-finite is the exact element-wise test run (finite values can overflow it).
        """
        if not tensors:
            return []
        values = [t._values() if t.is_sparse else t for t in tensors]
        sums = torch.stack([v.sum(dtype=torch.float64 if v.dtype == torch.float64 else
                                  torch.float32) for v in values])
        flags = torch.isfinite(sums).tolist()
        return [ok or bool(torch.isfinite(v).all()) for ok, v in zip(flags, values)]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (Algorithm 1) for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update(self._collect())
        return loss

    def _update(self, work, sq_of: dict | None = None) -> None:
        sq_of = sq_of or {}
        # duplicates of a sparse gradient are summed first, so that finite values whose sum
        # overflows are caught by the check (and the rows are coalesced once)
        grads = {p: (p.grad.coalesce() if p.grad.is_sparse else p.grad) for _, p, _, _ in work}
        checks = [grads[p] for _, p, _, _ in work] + [sq_of[p] for _, p, _, _ in work if p in sq_of]
        flags = self._finite_flags(checks)
        bad = [i for i, ok in enumerate(flags[: len(work)]) if not ok]
        bad += [i for i, ok in zip([i for i, w in enumerate(work) if w[1] in sq_of],
                                   flags[len(work):]) if not ok]
        refuse = [work[i] for i in sorted(set(bad)) if work[i][0]["nonfinite"] == "raise"]
        if refuse:
            names = ", ".join(n or f"param {tuple(p.shape)}" for _, p, n, _ in refuse)
            raise NonFiniteGradientError(
                f"{type(self).__name__}: non-finite (NaN/Inf) gradient in {names}; no parameter "
                "or state was modified. Pass nonfinite='skip' to skip the affected rows instead.")
        bad = set(bad)
        rule = get_rule(self.rule)
        overflow = []
        for i, (group, p, name, gb) in enumerate(work):
            rowwise = group["rowwise"]
            state = self._init_state(p, gb, rowwise)
            state["step"] += 1
            step = state["step"].item()
            hp = self._hp(group, gb)
            states = [state[n] for n in rule.state_names]
            rw = [rowwise and n in rule.second_moment_names for n in rule.state_names]
            kw = dict(step=step, hp=hp, rule_name=self.rule, rowwise=rowwise,
                      exact=group["exact_group_norm"], compiled=group["compiled"])
            grad, h = grads[p], sq_of.get(p)
            fixed = group["fixed_support"] and gb == "row"
            if grad.is_sparse or i in bad or fixed:
                idx, refused = self._lazy(p, grad, h, state, states, rw, gb, i in bad, kw, fixed)
            else:
                idx = None
                refused = apply_dense_(p, grad, state["dual"], states, rw, sq_of=h, group_by=gb,
                                       **kw)
            if group["track_seen"] and gb == "row":
                self._mark_seen(state, p, grad, idx, refused)
            n_refused = int(refused.sum())
            if n_refused:
                overflow.append((group, name or f"param {tuple(p.shape)}", n_refused))
        raising = [(n, k) for g, n, k in overflow if g["nonfinite"] == "raise"]
        if raising:
            raise NonFiniteGradientError(
                f"{type(self).__name__}: the step would have written non-finite values (overflow "
                "from finite gradients: a state near the float range or extreme hyperparameters) "
                f"into {', '.join(f'{k} group(s) of {n}' for n, k in raising)}; those groups and "
                "their state were left unchanged, every other group was updated. Pass "
                "nonfinite='skip' to skip such groups silently.")

    @staticmethod
    def _mark_seen(state: dict, p: Tensor, grad: Tensor, idx: Tensor | None,
                   refused: Tensor) -> None:
        """1 byte per row: the row had a (non-zero) gradient at some step and was updated."""
        if "seen" not in state:
            state["seen"] = torch.zeros(p.shape[0], dtype=torch.uint8, device=p.device)
        if idx is not None:  # lazy rows (sparse gradient or skipped rows)
            state["seen"][idx[~refused]] = 1
        else:
            state["seen"] |= (grad.ne(0).any(dim=1) & ~refused).to(torch.uint8)

    def _param_info(self, p: Tensor):
        for group in self.param_groups:
            for q, name in self._named(group):
                if q is p:
                    return group, resolve_group_by(p, group["group_by"], name)
        raise ValueError("Invalid parameter: not managed by this optimizer")

    @torch.no_grad()
    def row_flags(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """``(seen, non-zero)`` per row of a row-grouped parameter tracked with
        ``track_seen=True`` (seen = the row had a non-zero gradient)."""
        state = self.state.get(p, {})
        seen = state.get("seen")
        if seen is None:
            seen = torch.zeros(p.shape[0], dtype=torch.uint8, device=p.device)
        return seen.bool(), p.ne(0).any(dim=1)

    @torch.no_grad()
    def shrink_norms(self, p: Tensor) -> Tensor:
        """Shrink norms (see ``_functional.group_norms``) of the seen rows of ``p``."""
        group, gb = self._param_info(p)
        state = self.state.get(p)
        if not state or "seen" not in state:
            return torch.zeros(0, dtype=p.dtype, device=p.device)
        rows = state["seen"].nonzero().view(-1)
        states = tuple(t.index_select(0, rows) for t in self._group_states(state, group, gb))
        return group_norms(to_groups(p, gb).index_select(0, rows),
                           to_groups(state["dual"], gb).index_select(0, rows), states,
                           rule=get_rule(self.rule), step=max(state["step"].item(), 1.0),
                           hp=self._hp(group, gb), exact=group["exact_group_norm"]).view(-1)

    @torch.no_grad()
    def reapply_prox(self) -> None:
        """Re-apply the proximal step with the current hyperparameters to every parameter that
        has state, without a gradient (e.g. after ``lambda21`` was changed, so that rows the
        batches do not touch follow the new value). See :func:`._functional.reprox`."""
        rule = get_rule(self.rule)
        for group in self.param_groups:
            self._validate(group, params=None)
            for p, name in self._named(group):
                state = self.state.get(p)
                if not state:
                    continue
                gb = resolve_group_by(p, group["group_by"], name)
                # only rows that were trained, for lazy tables; every group otherwise; with the
                # support fixed, only support rows (a zero row would revive at lambda21 = 0)
                if group["fixed_support"] and gb == "row":
                    rows = support_rows(to_groups(p, gb), state.get("seen")).nonzero().view(-1)
                else:
                    rows = state["seen"].nonzero().view(-1) if "seen" in state else None
                x2d, dual2d = to_groups(p, gb), to_groups(state["dual"], gb)
                if rows is None and (not _is_view_of(x2d, p) or not _is_view_of(dual2d,
                                                                                  state["dual"])):
                    x2d, dual2d = x2d.clone(), dual2d.clone()  # reshape copied: write back below
                reprox_rows_(x2d, dual2d, self._group_states(state, group, gb), rows, rule=rule,
                             step=max(state["step"].item(), 1.0), hp=self._hp(group, gb),
                             exact=group["exact_group_norm"])
                if not _is_view_of(x2d, p):
                    p.copy_(from_groups(x2d, gb, p.shape))
                    state["dual"].copy_(from_groups(dual2d, gb, p.shape))

    @staticmethod
    def _lazy(p, grad, h, state, states, rw, gb, skip_nonfinite, kw, fixed=False
              ) -> tuple[Tensor, Tensor]:
        """Lazy rows: only rows present in the gradient (coalesced if sparse) and finite, when
        skipping, are updated. With ``fixed`` (``fixed_support=True``, row groups) only those of
        them in the support (:func:`~._functional.support_rows`) -- with a dense gradient every
        support row steps, as the dense step would --; a zero row keeps its values and state,
        and a row seen for the first time is set to zero and marked seen. O(rows of the
        gradient x d). Returns ``(rows processed, mask of those refused)``."""
        x2d = to_groups(p, gb)
        if grad.is_sparse:
            idx, rows = grad.indices()[0], grad.values()
            sq_rows = None
        else:
            rows = to_groups(grad, gb)
            idx = torch.arange(rows.shape[0], device=rows.device)
            sq_rows = None if h is None else to_groups(h, gb)
        keep = None
        if fixed:
            seen = state.get("seen")
            keep = support_rows(x2d.index_select(0, idx), None if seen is None else seen[idx])
            if seen is not None:  # first seen now: outside the support, served as zero
                touched = torch.ones_like(keep) if grad.is_sparse else rows.ne(0).any(dim=1)
                new = idx[touched & seen[idx].eq(0)]
                x2d.index_fill_(0, new, 0.0)
                seen[new] = 1
        if skip_nonfinite:
            ok = torch.isfinite(rows).all(dim=1)
            if sq_rows is not None:
                ok &= torch.isfinite(sq_rows).all(dim=1)
            keep = ok if keep is None else keep & ok
        if keep is not None:
            idx, rows = idx[keep], rows[keep]
            sq_rows = None if sq_rows is None else sq_rows[keep]
        states2d = [rowwise_view(s) if r else to_groups(s, gb) for s, r in zip(states, rw)]
        refused = apply_rows_(x2d, idx, rows, to_groups(state["dual"], gb), states2d,
                              sq_rows=sq_rows, **kw)
        return idx, refused
