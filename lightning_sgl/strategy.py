"""``TorchRecStrategy``: Lightning's DDP strategy with TorchRec's ``DistributedModelParallel``.

The module's ``EmbeddingBagCollection`` tables are sharded by DMP (the planner by default, or a
given plan / planner constraints) with the Group sharders, the dense part is wrapped in DDP by DMP
itself, gloo on CPU and NCCL on GPU. Checkpoints are written by every rank with
``torch.distributed.checkpoint`` (sharded tables and fused optimizer state) plus one small file
with everything else (dense weights and optimizer state, loops, callbacks), so a checkpoint loads
under another world size or plan.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["TorchRecStrategy"]

_META = "lightning_meta.pt"
_PLACEHOLDER = "__lightning_sgl_dcp__:"


def _is_sharded(value: Any) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(value, (ShardedTensor, DTensor))


def _split(obj: Any, path: str, sharded: dict[str, Any]) -> Any:
    """Replace every sharded tensor in a nested dict/list by a placeholder naming its path."""
    if _is_sharded(obj):
        sharded[path] = obj
        return _PLACEHOLDER + path
    if isinstance(obj, dict):
        return {k: _split(v, f"{path}/{k}", sharded) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_split(v, f"{path}/{i}", sharded) for i, v in enumerate(obj)]
        return type(obj)(out) if isinstance(obj, tuple) else out
    return obj


def _join(obj: Any, sharded: dict[str, Any]) -> Any:
    if isinstance(obj, str) and obj.startswith(_PLACEHOLDER):
        return sharded[obj[len(_PLACEHOLDER):]]
    if isinstance(obj, dict):
        return {k: _join(v, sharded) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, sharded) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_join(v, sharded) for v in obj)
    return obj


class TorchRecStrategy(DDPStrategy):
    """Shard the LightningModule's embedding tables with ``DistributedModelParallel``.

    Args:
        plan: a ``torchrec.distributed.types.ShardingPlan`` to use as is.
        constraints: planner constraints (``{table: ParameterConstraints}``) for DMP's planner.
        sharders: module sharders (default: :func:`torchrec_ext.group_sharders`).
        **kwargs: passed to ``DDPStrategy`` (``process_group_backend``, timeouts, ...).

    ``fit``, ``validate``, ``test`` and ``predict`` all run on the sharded model. Checkpoints
    (``ModelCheckpoint`` top-k and last, ``fit(ckpt_path=...)``) are directories written by
    every rank; see the module docstring.
    """

    strategy_name = "torchrec"

    def __init__(self, plan=None, constraints: dict | None = None, sharders: list | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._plan = plan
        self._constraints = constraints
        self._sharders = sharders
        self._dmp = None

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="TorchRec DMP + DDP")

    # ------------------------------------------------------------------ setup
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # tables must be sharded (and optimizers built) before a checkpoint loads

    def model_to_device(self) -> None:
        """No-op: tables may live on the meta device until DMP shards them; DMP moves the rest."""

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self._shard(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _shard(self, trainer) -> None:
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.types import ShardingEnv

        from torchrec_ext import group_sharders

        if self._dmp is not None:
            self.model = self._dmp
            return
        module = self.lightning_module
        sharders = self._sharders if self._sharders is not None else group_sharders()
        pg = dist.group.WORLD
        plan = self._plan
        if plan is None and self._constraints is not None:
            planner = EmbeddingShardingPlanner(
                topology=Topology(world_size=self.world_size, local_world_size=self.num_processes,
                                  compute_device=self.root_device.type),
                constraints=self._constraints)
            plan = planner.collective_plan(module, sharders, pg)
        self._dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(pg),
                                             device=self.root_device, plan=plan, sharders=sharders)
        rank_zero_info(f"TorchRecStrategy: sharding plan\n{self._dmp.plan}")
        self.model = self._dmp

    @property
    def dmp(self):
        """The ``DistributedModelParallel`` wrapper (after setup)."""
        return self._dmp

    def configure_ddp(self) -> None:  # DMP already applies DDP to the dense part
        pass

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        """Every rank writes its shards with DCP; rank 0 writes everything else once."""
        import torch.distributed.checkpoint as dcp

        path = str(filepath)
        sharded: dict[str, Any] = {}
        rest = _split(checkpoint, "", sharded)
        if self.is_global_zero:
            if os.path.isfile(path):
                os.remove(path)
            os.makedirs(path, exist_ok=True)
        self.barrier("TorchRecStrategy.save_checkpoint")
        dcp.save(sharded, checkpoint_id=path)
        if self.is_global_zero:
            torch.save(rest, os.path.join(path, _META))
        self.barrier("TorchRecStrategy.save_checkpoint.done")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint directory into the current (possibly differently sharded) model."""
        import torch.distributed.checkpoint as dcp

        path = str(checkpoint_path)
        meta_file = os.path.join(path, _META)
        if not os.path.isfile(meta_file):
            raise FileNotFoundError(
                f"Invalid checkpoint: {path!r} is not a TorchRecStrategy checkpoint directory "
                f"(missing {_META})")
        rest = torch.load(meta_file, weights_only=False, map_location="cpu")
        template: dict[str, Any] = {}
        current = {"state_dict": self.lightning_module_state_dict(),
                   "optimizer_states": [self.optimizer_state(o) for o in self.optimizers]}
        _split(current, "", template)
        saved = _placeholders(rest)
        wanted = {k: v for k, v in template.items() if f"{_PLACEHOLDER}{k}" in saved}
        dcp.load(wanted, checkpoint_id=path)
        return _join(rest, wanted)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = str(filepath)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def teardown(self) -> None:
        self._dmp = None
        super().teardown()


def _placeholders(obj: Any) -> set[str]:
    out: set[str] = set()

    def walk(o):
        if isinstance(o, str) and o.startswith(_PLACEHOLDER):
            out.add(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return out
