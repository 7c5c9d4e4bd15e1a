"""Fault injection for the checkpoint kill test: SIGKILL this rank at a chosen point of the
``save_checkpoint`` of a chosen step (installed by ``fit_job`` when its config has ``"fault"``).

Points: ``random`` (a timer at a uniformly drawn moment within the duration of the previous
save), ``shards`` (right after this
rank wrote its DCP shard files), ``before_metadata`` (DCP's coordinator, before ``.metadata``),
``before_manifest``, ``before_publish`` and ``after_publish`` (rank 0 only: around the final
rename), ``before_gather`` (before the ranks exchange their checksums).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: dict, rank: int) -> None:
    if fault.get("rank") != rank:
        return
    import torch.distributed as dist
    import torch.distributed.checkpoint.filesystem as fs

    from lightning_sgl import checkpoint as ckpt
    from lightning_sgl.strategy import TorchRecStrategy

    step, point = fault["step"], fault["point"]
    state = {"armed": False, "duration": 0.05}
    save = TorchRecStrategy.save_checkpoint

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        state["armed"] = checkpoint.get("global_step") == step
        if state["armed"] and point == "random":  # a moment within the save (as long as the last)
            delay = random.Random(fault.get("seed", 0)).uniform(0.0, state["duration"])
            threading.Timer(delay, _die).start()
        t0 = time.perf_counter()
        out = save(self, checkpoint, filepath, storage_options)
        state["duration"] = time.perf_counter() - t0
        return out

    TorchRecStrategy.save_checkpoint = save_checkpoint

    def wrap(owner, name, before=True):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if state["armed"] and before:
                _die()
            out = original(*args, **kwargs)
            if state["armed"] and not before:
                _die()
            return out

        setattr(owner, name, wrapped)

    if point == "shards":
        wrap(fs.FileSystemWriter, "write_data", before=False)
    elif point == "before_metadata":
        wrap(fs.FileSystemWriter, "finish")
    elif point == "before_manifest":
        wrap(ckpt, "write_manifest")
    elif point == "before_publish":
        wrap(ckpt, "publish")
    elif point == "after_publish":
        wrap(ckpt, "publish", before=False)
    elif point == "before_gather":
        wrap(dist, "all_gather_object")
    elif point != "random":
        raise ValueError(f"unknown fault point {point!r}")
