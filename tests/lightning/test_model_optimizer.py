"""``ModelOptimizer`` (what ``group_optimizers`` returns) behaves as a ``torch.optim`` optimizer:
hooks fire, schedulers reach every part; ``TorchRecStrategy`` passes DDP keyword arguments to
DMP's DDP wrapper and refuses what it cannot honour."""

import pytest
import torch

from lightning_sgl import GroupAdam, TorchRecStrategy, mark_embedding
from lightning_sgl.factory import ModelOptimizer


def _model_optimizer():
    table = mark_embedding(torch.nn.Parameter(torch.randn(5, 3)))
    mlp = torch.nn.Linear(3, 1)
    opt = ModelOptimizer([("tables", GroupAdam([table], lr=0.1, lambda21=0.1)),
                          ("dense", torch.optim.SGD(mlp.parameters(), lr=0.5))])
    return opt, table, mlp


def _closure(table, mlp):
    def closure():
        loss = mlp(table).pow(2).mean()
        loss.backward()
        return loss
    return closure


def test_step_and_state_dict_hooks_fire():
    opt, table, mlp = _model_optimizer()
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items()
                                                         if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.step(_closure(table, mlp))
    assert calls == ["pre", "post"] and opt.closure_calls == 1
    sd = opt.state_dict()
    assert sd["extra"] == 1 and set(sd) == {"tables", "dense", "extra"}
    opt.load_state_dict(sd)  # the pre hook drops "extra"
    assert calls[-2:] == ["sd-pre", "load-post"]


def test_scheduler_reaches_every_part():
    opt, table, mlp = _model_optimizer()
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.step(_closure(table, mlp))
    sched.step()
    assert [g["lr"] for g in opt.parts["tables"].param_groups] == [0.05]
    assert [g["lr"] for g in opt.parts["dense"].param_groups] == [0.25]


def test_refused_load_changes_nothing():
    opt, table, mlp = _model_optimizer()
    opt.step(_closure(table, mlp))
    before = {k: v.clone() for k, v in opt.parts["tables"].state[table].items()}
    with pytest.raises(ValueError, match=r"Invalid state_dict: no state for parts \['dense'\]"):
        opt.load_state_dict({"tables": opt.parts["tables"].state_dict()})
    assert all(torch.equal(before[k], v) for k, v in opt.parts["tables"].state[table].items())


@pytest.mark.parametrize("arg", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper",
                                 "model_averaging_period"])
def test_strategy_refuses_ddp_options_dmp_cannot_honour(arg):
    with pytest.raises(ValueError, match=rf"Invalid argument {arg}: TorchRecStrategy does not "
                                         "support DDP communication hooks"):
        TorchRecStrategy(**{arg: object()})


def test_strategy_passes_ddp_kwargs_to_dmp():
    wrapper = TorchRecStrategy(find_unused_parameters=True, bucket_cap_mb=7,
                               init_sync=False)._ddp_wrapper()
    assert wrapper._find_unused_parameters is True and wrapper._bucket_cap_mb == 7
    assert wrapper._ddp_kwargs == {"init_sync": False}
    assert TorchRecStrategy()._ddp_wrapper() is None


def test_strategy_ignores_ddp_defaults_as_lightning_cli_passes_them():
    """LightningCLI resolves ``**kwargs`` into every DDP argument with its default: DMP's own
    DDP settings win (this used to fail with 'multiple values for broadcast_buffers')."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    defaults = {k: p.default for k, p in
                inspect.signature(DistributedDataParallel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert TorchRecStrategy(**defaults)._ddp_wrapper() is None


def test_strategy_refuses_ddp_arguments_dmp_fixes():
    with pytest.raises(ValueError, match=r"Invalid argument gradient_as_bucket_view: "
                                         "DistributedModelParallel sets it itself"):
        TorchRecStrategy(gradient_as_bucket_view=True)
