"""The private attributes of Lightning / torch that lightning_oto.lightning.compat relies on: each test fails loudly
when a release renames one, so the one function in compat.py that reads it can be fixed."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_oto.lightning import compat


def test_ddp_strategy_keeps_its_start_method():
    from lightning.pytorch.strategies import DDPStrategy

    for method in ("spawn", "popen"):
        assert compat.strategy_start_method(DDPStrategy(start_method=method)) == method, (
            "DDPStrategy no longer stores `_start_method`: update compat.strategy_start_method")
    assert compat.strategy_start_method(object()) is None


def test_lightning_placeholder_optimizer_is_recognised():
    from lightning.pytorch.core import optimizer as lightning_optimizer

    mock_cls = getattr(lightning_optimizer, compat.MOCK_OPTIMIZER_CLASS, None)
    assert mock_cls is not None, "Lightning renamed its no-optimizer placeholder: update compat.MOCK_OPTIMIZER_CLASS"
    real = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert compat.real_optimizers([mock_cls(), real]) == [real]


def test_torch_schedulers_wrap_optimizer_step_as_compat_expects():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert getattr(opt.step, compat.SCHEDULER_WRAPPED_ATTR, False), (
        "torch's LRScheduler no longer marks the optimizer step it wraps: update compat.SCHEDULER_WRAPPED_ATTR")
    opt.step()
    assert getattr(opt, compat.OPTIMIZER_CALLED_ATTR, False), (
        "torch's LRScheduler no longer records optimizer.step calls: update compat.OPTIMIZER_CALLED_ATTR")


def test_a_scheduler_rebound_to_a_marked_optimizer_does_not_warn():
    """What mark_step_as_scheduler_wrapped is for: no 'scheduler.step() before optimizer.step()' warning."""
    p = nn.Parameter(torch.zeros(1))
    old, new = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(old, step_size=1)
    sched.optimizer = new
    compat.mark_step_as_scheduler_wrapped(new)
    new.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()


def test_chained_schedulers_keep_their_children():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    a = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2)
    b = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    assert compat.child_schedulers(torch.optim.lr_scheduler.ChainedScheduler([a, b])) == [a, b]
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [a, b], milestones=[2])
    assert compat.child_schedulers(seq) == [a, b], "SequentialLR renamed `_schedulers`"
    list_attrs = {k for k, v in vars(seq).items() if isinstance(v, list)}
    assert {"_schedulers", "_milestones"} <= list_attrs, "SequentialLR renamed its non-per-group list attributes"
    assert compat.child_schedulers(a) == []


def test_module_stores_are_the_live_registries():
    m = nn.Sequential(nn.BatchNorm1d(2))
    stores = compat.module_stores(m[0])
    assert set(stores) == set(compat.MODULE_STORES)
    assert stores["_parameters"]["weight"] is m[0].weight and stores["_buffers"]["running_mean"] is m[0].running_mean
    assert compat.module_stores(m)["_modules"]["0"] is m[0]
    stores["_parameters"]["weight"] = nn.Parameter(torch.ones(2))
    assert torch.equal(m[0].weight, torch.ones(2))  # writing the dict changes the module


def test_fit_loop_builds_the_train_dataloader_on_request():
    """At fit start (where OTOCallback plans its phases in steps) the train dataloader is not loaded yet."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    seen: list[tuple[bool, float]] = []

    class Probe(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            before = trainer.train_dataloader is None
            compat.load_train_dataloader(trainer)
            seen.append((before, trainer.num_training_batches))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=3,
                        limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(BoringModel())
    assert seen == [(True, 3)], (
        "Lightning's fit loop no longer loads the train dataloader with setup_data(): update compat.load_train_dataloader")


def test_no_other_module_reads_these_private_attributes():
    """compat.py is the only reader of other libraries' private attributes."""
    import re
    from pathlib import Path

    import lightning_oto

    private = re.compile(r"""[.'"](_start_method|_wrapped_by_lr_sched|_opt_called|_MockOptimizer|_schedulers|"""
                         r"""_milestones|fit_loop)\b""")
    root = Path(lightning_oto.__file__).parent
    offenders = {str(p.relative_to(root)): private.findall(p.read_text()) for p in root.rglob("*.py")
                 if p.name != "compat.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
