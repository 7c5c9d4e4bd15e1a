"""``TorchRecStrategy``: Lightning's DDP strategy with TorchRec's ``DistributedModelParallel``.

The module's ``EmbeddingBagCollection`` tables are sharded by DMP (under a given plan, or one made
by TorchRec's planner with storage estimates that count the Group state --
:func:`torchrec_ext.group_planner` -- and the given constraints) with the Group sharders, the
dense part is wrapped in DDP by DMP itself, gloo on CPU and NCCL on GPU. Checkpoints are written
by every rank with ``torch.distributed.checkpoint`` (sharded tables and fused optimizer state,
``param_groups`` included) plus one small file with everything else (dense weights and
optimizer state, loops, LR schedulers, callbacks), so a checkpoint loads under another world
size or plan. A checkpoint is staged, closed by a manifest of checksums and published
atomically; loading verifies it and checks names and shapes before anything is loaded
(:mod:`lightning_sgl.checkpoint`).
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

from . import checkpoint as ckpt

__all__ = ["TorchRecStrategy"]

_META = "lightning_meta.pt"
_PLACEHOLDER = "__lightning_sgl_dcp__:"


#: DDPStrategy arguments that DMP's own DDP wrapper cannot honour
_UNSUPPORTED_DDP = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")
#: DistributedDataParallel arguments that DMP sets itself on the DDP of the dense part
_DMP_FIXED_DDP = ("module", "device_ids", "output_device", "process_group",
                  "gradient_as_bucket_view", "broadcast_buffers")


def _dmp_ddp_kwargs(kwargs: dict) -> dict:
    """The DDP keyword arguments to hand to DMP: those that differ from
    ``DistributedDataParallel``'s defaults (``LightningCLI`` resolves ``**kwargs`` into every
    DDP argument with its default). ``ValueError`` for one that DMP fixes itself."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    defaults = {k: p.default for k, p in
                inspect.signature(DistributedDataParallel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    out = {k: v for k, v in kwargs.items() if not (k in defaults and _same(v, defaults[k]))}
    fixed = sorted(set(out) & set(_DMP_FIXED_DDP))
    if fixed:
        raise ValueError(f"Invalid argument {fixed[0]}: DistributedModelParallel sets it itself "
                         "on the DDP of the dense part (TorchRecStrategy cannot change it)")
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - values without a boolean equality
        return a is b


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
    """Put the loaded sharded tensors back; placeholders that were not loaded become ``None``."""
    if isinstance(obj, str) and obj.startswith(_PLACEHOLDER):
        return sharded.get(obj[len(_PLACEHOLDER):])
    if isinstance(obj, dict):
        return {k: _join(v, sharded) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, sharded) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_join(v, sharded) for v in obj)
    return obj


#: checkpoint key of the sharded modules' fused optimizer state when ``configure_optimizers``
#: returns optimizers that do not hold it (e.g. a plain ``torch.optim.Adam``)
FUSED_KEY = "torchrec_fused_optimizer"


def _leaf_optimizers(opt: Any):
    """The optimizers a (combined) optimizer is made of, recursively."""
    parts = getattr(opt, "parts", None)
    if isinstance(parts, dict):
        for o in parts.values():
            yield from _leaf_optimizers(o)
        return
    inner = getattr(opt, "optimizers", None)
    if isinstance(inner, list) and all(isinstance(x, tuple) and len(x) == 2 for x in inner):
        for _, o in inner:
            yield from _leaf_optimizers(o)
        return
    yield opt


class TorchRecStrategy(DDPStrategy):
    """Shard the LightningModule's embedding tables with ``DistributedModelParallel``.

    Args:
        plan: a ``torchrec.distributed.types.ShardingPlan`` to use as is.
        constraints: planner constraints (``{table: ParameterConstraints}``) for the planner
            (:func:`torchrec_ext.group_planner`, used whenever no ``plan`` is given).
        sharders: module sharders (default: :func:`torchrec_ext.group_sharders`).
        verify_checkpoints: check every file of a checkpoint against its manifest (size and
            SHA-256) before loading it (default ``True``).
        **kwargs: ``DDPStrategy``'s own arguments (``process_group_backend``, ``timeout``,
            ``cluster_environment``, ...) and ``DistributedDataParallel`` keyword arguments
            (``find_unused_parameters``, ``static_graph``, ``bucket_cap_mb``, ...), which reach
            the DDP that ``DistributedModelParallel`` wraps the dense part in (through TorchRec's
            ``DefaultDataParallelWrapper``). DDP communication hooks, model averaging and
            ``sync_batchnorm`` are refused with an error: DMP builds the DDP wrapper itself.

    ``setup`` does not run ``DDPStrategy.setup``: that would wrap the model in a second DDP and,
    outside fitting, broadcast rank 0's module state -- which for sharded tables would overwrite
    every rank's shards with rank 0's. It runs the same steps in the order DMP needs (shard,
    then optimizers).

    ``fit``, ``validate``, ``test`` and ``predict`` all run on the sharded model (the same DMP is
    reused by later stages of one Trainer). Checkpoints (``ModelCheckpoint`` top-k and last,
    ``fit/validate/test/predict(ckpt_path=...)``) are directories written by every rank and
    published atomically; see the module docstring and :mod:`lightning_sgl.checkpoint`.
    """

    strategy_name = "torchrec"

    def __init__(self, plan=None, constraints: dict | None = None, sharders: list | None = None,
                 verify_checkpoints: bool = True, **kwargs: Any) -> None:
        if not isinstance(verify_checkpoints, bool):
            raise ValueError(f"Invalid verify_checkpoints: {verify_checkpoints!r} (valid options: "
                             "True, False)")
        bad = [k for k in _UNSUPPORTED_DDP if kwargs.get(k) is not None]
        if bad:
            raise ValueError(
                f"Invalid argument {bad[0]}: TorchRecStrategy does not support DDP communication "
                "hooks or model averaging (DistributedModelParallel builds the DDP wrapper of "
                "the dense part itself); DistributedDataParallel keyword arguments such as "
                "find_unused_parameters, static_graph or bucket_cap_mb are supported")
        super().__init__(**kwargs)
        _dmp_ddp_kwargs(self._ddp_kwargs)  # validated now: refused before any process starts
        self._plan = plan
        self._constraints = constraints
        self._sharders = sharders
        self._verify = verify_checkpoints
        self._dmp = None

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="TorchRec DMP + DDP")

    # ------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        """Set ``LOCAL_WORLD_SIZE`` (processes on this node) before the process group starts:
        Lightning's launcher sets ``LOCAL_RANK`` and ``WORLD_SIZE`` but not it, and TorchRec
        reads it (its sharding topology; a warning when it is missing)."""
        os.environ["LOCAL_WORLD_SIZE"] = str(self.num_processes)
        super().setup_environment()

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # tables must be sharded (and optimizers built) before a checkpoint loads

    def model_to_device(self) -> None:
        """No-op: tables may live on the meta device until DMP shards them; DMP moves the rest."""

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        if self._layer_sync is not None:
            raise ValueError("Invalid Trainer(sync_batchnorm=True): TorchRecStrategy does not "
                             "convert layers (DistributedModelParallel owns the module); use "
                             "torch.nn.SyncBatchNorm in the model itself")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self._shard(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _shard(self, trainer) -> None:
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
        from torchrec.distributed.types import ShardingEnv

        from torchrec_ext import group_planner, group_sharders

        module = self.lightning_module
        if self._dmp is not None and self._dmp.module is module:
            self.model = self._dmp  # a later stage of the same Trainer: already sharded
            return
        sharders = self._sharders if self._sharders is not None else group_sharders()
        pg = dist.group.WORLD
        plan = self._plan
        if plan is None:  # TorchRec's planner, with storage estimates that count Group state
            topology = TopologyFactory.create_topology(
                TrainerConfig(world_size=self.world_size, local_world_size=self.num_processes),
                kernel_config=KernelConfig(compute_device=self.root_device.type))
            planner = group_planner(topology, constraints=self._constraints)
            plan = planner.collective_plan(module, sharders, pg)
        self._dmp = DistributedModelParallel(module, env=ShardingEnv.from_process_group(pg),
                                             device=self.root_device, plan=plan, sharders=sharders,
                                             data_parallel_wrapper=self._ddp_wrapper())
        rank_zero_info(f"TorchRecStrategy: sharding plan\n{self._dmp.plan}")
        self.model = self._dmp

    def _ddp_wrapper(self):
        """TorchRec's DDP wrapper of the dense part, with the user's DDP keyword arguments
        (``None``: DMP's default)."""
        kw = _dmp_ddp_kwargs(self._ddp_kwargs)
        if not kw:
            return None
        from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

        named = {k: kw.pop(k) for k in ("bucket_cap_mb", "static_graph",
                                        "find_unused_parameters") if k in kw}
        return DefaultDataParallelWrapper(**named, ddp_kwargs=kw)

    @property
    def dmp(self):
        """The ``DistributedModelParallel`` wrapper (after setup)."""
        return self._dmp

    def configure_ddp(self) -> None:  # DMP already applies DDP to the dense part
        pass

    # ------------------------------------------------------------------ checkpoints
    def _fused_optimizer(self):
        """The sharded modules' fused optimizer (``None`` without fused tables)."""
        fused = getattr(self._dmp, "fused_optimizer", None) if self._dmp is not None else None
        return fused if fused is not None and getattr(fused, "params", None) else None

    def _fused_covered(self) -> bool:
        """Whether the optimizers of ``configure_optimizers`` hold every fused table's state."""
        fused = self._fused_optimizer()
        if fused is None:
            return True
        mine = {id(o) for opt in self.optimizers for o in _leaf_optimizers(opt)}
        return all(id(o) in mine for o in _leaf_optimizers(fused))

    def _with_fused_state(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Add the fused tables' optimizer state (``param_groups`` included) when the user's
        optimizers do not carry it, so that resume never restarts dual and moments."""
        fused = self._fused_optimizer()
        if fused is None or self._fused_covered() or "optimizer_states" not in checkpoint:
            return checkpoint
        fused.save_param_groups(True)
        return {**checkpoint, FUSED_KEY: fused.state_dict()}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        """Every rank writes its shards with DCP into a staging directory, rank 0 writes
        everything else once and the manifest (sizes and SHA-256 of every file) last, then
        publishes the directory atomically (:func:`lightning_sgl.checkpoint.publish`): a crash
        at any point leaves the previous checkpoint or the new one, complete."""
        import torch.distributed.checkpoint as dcp

        if storage_options is not None:
            raise TypeError("TorchRecStrategy.save_checkpoint takes no storage_options (got "
                            f"{storage_options!r}): checkpoints are DCP directories on a shared "
                            "file system")
        path = os.path.abspath(str(filepath))
        stage = ckpt.staging_dir(path)
        sharded: dict[str, Any] = {}
        rest = _split(self._with_fused_state(checkpoint), "", sharded)
        if self.is_global_zero:
            ckpt.discard_staging(path)
            os.makedirs(stage)
        self.barrier("TorchRecStrategy.save_checkpoint.stage")
        dcp.save(sharded, storage_writer=dcp.FileSystemWriter(stage, overwrite=True))
        mine = {n: ckpt.file_digest(os.path.join(stage, n)) for n in sorted(os.listdir(stage))
                if n.startswith(f"__{self.global_rank}_")}
        every = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        if self.is_global_zero:
            torch.save(rest, os.path.join(stage, _META))
            files = {n: d for part in every for n, d in part.items()}
            for n in (".metadata", _META):
                files[n] = ckpt.file_digest(os.path.join(stage, n))
            ckpt.write_manifest(stage, files, info={
                "world_size": self.world_size, "epoch": checkpoint.get("epoch"),
                "global_step": checkpoint.get("global_step")})
            ckpt.publish(stage, path)
        self.barrier("TorchRecStrategy.save_checkpoint.done")

    def _verify_files(self, path: str) -> None:
        """Every file of the checkpoint against its manifest, split over the ranks; the first
        problem found is raised on every rank (nothing is loaded)."""
        error = ""
        try:
            names = sorted(ckpt.read_manifest(path)["files"])
            world = dist.get_world_size() if dist.is_initialized() else 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            ckpt.verify(path, names[rank::world])
        except ckpt.CheckpointCorruptError as err:
            error = str(err)
        errors = [error]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), "")
        if first:
            raise ckpt.CheckpointCorruptError(first)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint directory into the current (possibly differently sharded) model.

        Before anything is loaded: the files are verified against the manifest, and the saved
        sharded entries are compared with this run's (names and global shapes of every table
        and fused optimizer state): another optimizer type, other tables or other sizes raise
        ``ValueError`` naming them. Outside ``fit`` only the model state is loaded.
        ``weights_only`` is passed to ``torch.load`` of the non-sharded part.
        """
        import torch.distributed.checkpoint as dcp

        path = ckpt.resolve(os.path.abspath(str(checkpoint_path)))
        meta_file = os.path.join(path, _META)
        if not os.path.isdir(path) or not os.path.isfile(meta_file):
            raise FileNotFoundError(
                f"Invalid checkpoint: {str(checkpoint_path)!r} is not a TorchRecStrategy "
                f"checkpoint directory (missing {_META})")
        if self._verify:
            self._verify_files(path)
        rest = torch.load(meta_file, weights_only=weights_only, map_location="cpu")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        current: dict[str, Any] = {"state_dict": self.lightning_module_state_dict()}
        if fitting:
            current["optimizer_states"] = [self.optimizer_state(o) for o in self.optimizers]
            if isinstance(rest, dict) and FUSED_KEY in rest and self._fused_optimizer() is not None:
                self._fused_optimizer().save_param_groups(True)
                current[FUSED_KEY] = self._fused_optimizer().state_dict()
        template: dict[str, Any] = {}
        _split(current, "", template)
        saved = {p[len(_PLACEHOLDER):] for p in _placeholders(rest)}
        wanted = {k: v for k, v in template.items() if k in saved}
        self._check_against_saved(path, template, saved, fitting)
        dcp.load(wanted, storage_reader=dcp.FileSystemReader(path))
        self._invalidate_table_counts()
        out = _join(rest, wanted)
        if not fitting:
            out.pop("optimizer_states", None)
            out.pop(FUSED_KEY, None)
        return out

    def _check_against_saved(self, path: str, template: dict, saved: set[str],
                             fitting: bool) -> None:
        """Raise ``ValueError`` if the saved sharded entries do not match this run's."""
        import torch.distributed.checkpoint as dcp

        def relevant(key: str) -> bool:
            return fitting or key.startswith("/state_dict/")

        strict = getattr(self.lightning_module, "strict_loading", True)
        missing = sorted(k for k in template if k not in saved and relevant(k))
        unexpected = sorted(k for k in saved if k not in template and relevant(k)
                            and (strict or not k.startswith("/state_dict/")))
        if not strict:
            missing = [k for k in missing if not k.startswith("/state_dict/")]
        if missing or unexpected:
            raise ValueError(
                f"Invalid checkpoint {path!r} for this model and optimizer: it lacks "
                f"{_short(missing)} and holds {_short(unexpected)} (saved with another optimizer "
                "type, other tables or another configure_optimizers?); nothing was loaded")
        meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        for key, value in template.items():
            if key not in saved or key not in meta:
                continue
            want = tuple(value.size())
            got = tuple(getattr(meta[key], "size", ()))
            if got != want:
                raise ValueError(f"Invalid checkpoint {path!r}: {key} has shape {got}, this run's "
                                 f"is {want} (another table size or state layout, e.g. row-wise "
                                 "vs element-wise); nothing was loaded")

    def _invalidate_table_counts(self) -> None:
        """The tables were loaded in place: their kernels recount at the next read."""
        try:
            from torchrec_ext.feature_rate import all_group_kernels
        except ImportError:  # pragma: no cover
            return
        for kernel in all_group_kernels(self.lightning_module):
            kernel.invalidate_counts()

    def load_optimizer_state_dict(self, checkpoint) -> None:
        super().load_optimizer_state_dict(checkpoint)
        fused = checkpoint.get(FUSED_KEY)
        if fused is not None and self._fused_optimizer() is not None:
            self._fused_optimizer().load_state_dict(fused)

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = str(filepath)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
            ckpt.discard_staging(path)

    def teardown(self) -> None:
        """Unwrap DMP and release the strategy's resources. The module is not moved to CPU: its
        sharded tables stay where DMP placed them (and a module whose setup failed may still be
        on the meta device, which ``.cpu()`` cannot copy). The DMP wrapper is kept for later
        stages of the same Trainer (``validate`` after ``fit``)."""
        if self.lightning_module is not None:
            self.model = self.lightning_module
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()


def _short(keys: list[str], n: int = 4) -> str:
    if not keys:
        return "nothing else"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return "[" + ", ".join(repr(k) for k in keys[:n]) + "]" + more


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
