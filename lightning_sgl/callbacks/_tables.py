"""Adapters that let the callbacks see group-regularised tables the same way, sharded or not.

``tables_of(pl_module)`` returns ``TorchRecTables`` (fused kernels inside sharded EBCs) or
``DenseTables`` (plain ``nn.Embedding``/``nn.EmbeddingBag`` tables trained by a Group optimizer
from :func:`~lightning_sgl.group_optimizers`). Both give, per table:

- ``counts()``: exact ``(rows seen, seen rows non-zero)`` over all ranks (collective); TorchRec
  tables also ``counts_with(extra)``: the same and ``extra`` (float64) summed over the ranks,
  in the counts' own all-reduce;
- ``norms()``: local shrink norms of seen rows (each row on one rank) and the group width;
- ``rows()``: the rows each table holds in all (the most it can ever have seen), O(tables);
- ``set_lambda21(values)`` / ``lambda21()`` and ``reapply()`` (re-run the prox on seen rows);
- TorchRec tables only (the kernels keep a shrink-norm index, :mod:`torchrec_ext.kernel.index`):
  ``histograms()`` (local per-table bucket counts of the shrink norms / sqrt(d), O(tables x
  buckets)), ``run_counts(buckets)`` and ``value_counts(runs)`` (the local counts per run of
  one bucket, and per float32 value of one run, per table: O(runs), or a walk of at most a
  split-size bucket, and a walk of one run) and ``reapply_between(bounds)`` (the prox
  re-applied to the rows between an old and a new ``lambda21``, O(rows of the buckets and runs
  walked));
- ``fix_support()``: the refit -- the support fixed, ``lambda1 = lambda21 = 0`` (O(tables));
  ``scale_dual(f)``: the stored duals times ``f`` (once per refit; the fused tables' seen rows
  only, O(rows seen x dim)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..factory import GROUP_LASSO_MARK, ModelOptimizer

__all__ = ["tables_of", "TorchRecTables", "DenseTables"]


class TorchRecTables:
    def __init__(self, module: nn.Module):
        from torchrec_ext import feature_rate

        self._fr = feature_rate
        self.module = module
        self.kernels = feature_rate.all_group_kernels(module)
        self.names = sorted(feature_rate.plan_tables(module))

    def counts(self) -> dict[str, tuple[int, int]]:
        return self._fr.feature_counts(self.module)

    def counts_with(self, extra: Tensor | None) -> tuple[dict[str, tuple[int, int]], Tensor | None]:
        return self._fr.feature_counts(self.module, extra=extra)

    def layouts(self) -> dict[str, tuple[int, int, int]]:
        """Per table ``(num_embeddings, dim, features)``."""
        return self._fr.plan_table_layouts(self.module)

    def rows(self) -> dict[str, int]:
        return {n: int(v[0]) for n, v in self.layouts().items()}

    def norms(self) -> dict[str, tuple[Tensor, int]]:
        return self._fr.shrink_norms(self.module)

    def _local(self, name: str) -> str:
        return name.rsplit(".", 1)[-1]

    def lambda21(self) -> dict[str, float]:
        out = {}
        for k in self.kernels:
            for t, hp in zip(k.tables, k.table_hyperparameter_list(k.current_hyperparameters())):
                out.setdefault(t.name, float(hp["lambda21"]))
        return {n: out.get(self._local(n), float("nan")) for n in self.names}

    def set_lambda21(self, values: dict[str, float]) -> None:
        # NaN: a value this rank could not read (no shard of the table here); never set it
        local = {self._local(n): float(v) for n, v in values.items() if not math.isnan(float(v))}
        for k in self.kernels:
            mine = {t.name for t in k.tables} & set(local)
            if mine:
                k.set_table_hyperparameters({t: {"lambda21": local[t]} for t in mine})

    def reapply(self) -> None:
        for k in self.kernels:
            k.reapply_prox()

    def histograms(self) -> dict[str, Tensor]:
        return self._fr.shrink_histograms(self.module)

    def run_counts(self, buckets: dict[str, int]) -> dict[str, Tensor]:
        return self._fr.shrink_run_counts(self.module, buckets)

    def value_counts(self, runs: dict[str, tuple[int, int]]) -> dict[str, Tensor]:
        return self._fr.shrink_value_counts(self.module, runs)

    def reapply_between(self, bounds: dict[str, tuple[float, float]]) -> int:
        return self._fr.reapply_prox_between(self.module, bounds)

    @staticmethod
    def bucket_edge(b: int) -> float:
        from torchrec_ext.kernel.index import edge

        return edge(b)

    def fix_support(self) -> None:
        for k in self.kernels:
            names = [t.name for t in k.tables]
            k.set_table_hyperparameters({t: {"lambda1": 0.0, "lambda21": 0.0} for t in names})
            k.set_fixed_support(names)

    def scale_dual(self, factor: float) -> None:
        for k in self.kernels:
            k.scale_dual(factor)  # the seen rows only: O(rows seen x dim)

    def weight_norms(self) -> dict[str, Tensor]:
        return self._fr.seen_row_weight_norms(self.module)

    def prune(self, thresholds: dict[str, float]) -> None:
        self._fr.prune_seen_rows(self.module, thresholds)


class DenseTables:
    def __init__(self, module: nn.Module, optimizer: ModelOptimizer):
        self.opt = optimizer.parts.get("tables")
        self.params: dict[str, nn.Parameter] = {}
        if self.opt is not None:
            for group in self.opt.param_groups:
                for name, p in zip(group.get("param_names") or [], group["params"]):
                    if hasattr(p, GROUP_LASSO_MARK):
                        self.params[name.removesuffix(".weight")] = p
        self.names = sorted(self.params)

    def _group(self, p):
        return next(g for g in self.opt.param_groups if any(q is p for q in g["params"]))

    def counts(self) -> dict[str, tuple[int, int]]:
        out = {}
        for name, p in self.params.items():  # replicated by DDP: local counts are global
            seen, nz = self.opt.row_flags(p)
            out[name] = (int(seen.sum()), int((seen & nz).sum()))
        return out

    def rows(self) -> dict[str, int]:
        return {name: int(p.shape[0]) for name, p in self.params.items()}

    @staticmethod
    def _once(t: Tensor) -> Tensor:
        """Plain tables are replicated by DDP: rank 0 reports their rows, the others none."""
        import torch.distributed as dist

        return t if not dist.is_initialized() or dist.get_rank() == 0 else t[:0]

    def norms(self) -> dict[str, tuple[Tensor, int]]:
        return {name: (self._once(self.opt.shrink_norms(p)), p.shape[1])
                for name, p in self.params.items()}

    def lambda21(self) -> dict[str, float]:
        return {n: float(self._group(p)["lambda21"]) for n, p in self.params.items()}

    def set_lambda21(self, values: dict[str, float]) -> None:
        for n, v in values.items():
            self._group(self.params[n])["lambda21"] = float(v)

    def reapply(self) -> None:
        self.opt.reapply_prox()

    def fix_support(self) -> None:
        for p in self.params.values():
            self._group(p).update(lambda1=0.0, lambda21=0.0, fixed_support=True)

    @torch.no_grad()
    def scale_dual(self, factor: float) -> None:
        for p in self.params.values():
            st = self.opt.state.get(p)
            if st and "dual" in st:
                st["dual"].mul_(factor)

    def weight_norms(self) -> dict[str, Tensor]:
        return {name: self._once(p.detach()[self.opt.row_flags(p)[0]].norm(dim=1))
                for name, p in self.params.items()}

    @torch.no_grad()
    def prune(self, thresholds: dict[str, float]) -> None:
        for name, p in self.params.items():
            if name in thresholds:
                seen, _ = self.opt.row_flags(p)
                drop = seen & (p.norm(dim=1) <= thresholds[name])
                p[drop] = 0.0


def tables_of(pl_module, optimizer=None):
    """The group-regularised tables of ``pl_module`` (TorchRec first), or ``None``."""
    try:
        from torchrec_ext import feature_rate

        if feature_rate.all_group_kernels(pl_module):
            return TorchRecTables(pl_module)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(optimizer, ModelOptimizer):
        dense = DenseTables(pl_module, optimizer)
        if dense.names:
            return dense
    return None


def allreduce_cpu(t: Tensor, op=None) -> Tensor:
    """All-reduce a small CPU tensor over the default group (via the device NCCL needs)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = (torch.device("cuda", torch.cuda.current_device())
               if dist.get_backend() == "nccl" else torch.device("cpu"))
        t = t.to(dev)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        t = t.cpu()
    return t
