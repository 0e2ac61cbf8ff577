"""Hydra entry point: ``python -m lightning_oto.train [experiment=<name>] [key=value ...]``.

One run = build data + model, train with the OTOCallback (trace, DHSPG/H2SPG, construct, verify,
export), test the sub-network, write ``result.json`` into the run directory.  ``-m`` sweeps (e.g.
over ``oto.target_group_sparsity``) are aggregated with ``python -m lightning_oto.sweep <dir>``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lightning_oto.train")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; returns the result dict (also written to result.json)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("task", "oto") == "compofa":
        from .compofa import run_compofa

        ccfg = OmegaConf.to_container(cfg.compofa, resolve=True)
        ccfg.setdefault("output_dir", str(out_dir / "compofa"))
        ccfg.setdefault("seed", int(cfg.seed))
        summary = run_compofa(ccfg)
        result = {"experiment": "compofa", "seed": cfg.seed, "valid": True,
                  "num_architectures": summary.get("num_architectures"),
                  "teacher_test_accuracy": summary.get("teacher_test_accuracy"),
                  "pareto": summary.get("pareto"), "summary": str(Path(ccfg["output_dir"]) / "summary.json")}
        (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
        return result

    from .data import build_datamodule
    from .experiments.module import ClassifierModule
    from .lightning import OTOCallback
    from .models import build_model
    from .errors import InvalidSubnetError

    L.seed_everything(cfg.seed, workers=True)
    torch.set_num_threads(max(1, int(cfg.get("threads") or torch.get_num_threads())))
    dm = build_datamodule(**OmegaConf.to_container(cfg.data, resolve=True))
    net = build_model(cfg.model.name, num_classes=dm.num_classes, in_channels=cfg.model.in_channels,
                      image_size=cfg.model.image_size, **OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    g = torch.Generator().manual_seed(cfg.seed)
    example = torch.randn(2, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size, generator=g)
    module = ClassifierModule(net, dm.num_classes, example, **OmegaConf.to_container(cfg.optim, resolve=True))

    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None and "_target_" in c]
    oto_cfg = OmegaConf.to_container(cfg.oto, resolve=True)
    use_oto = bool(oto_cfg.pop("enabled", True))
    oto_cb = None
    if use_oto:
        oto_cb = OTOCallback(network_attr="net", export_dir=str(out_dir / "oto"), swap_subnet=True, **oto_cfg)
        callbacks.append(oto_cb)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)

    result: dict[str, Any] = {
        "experiment": cfg.get("experiment_name", "default"), "model": cfg.model.name, "data": cfg.data.name,
        "seed": cfg.seed, "mode": oto_cfg.get("mode") if use_oto else None,
        "optimizer": oto_cfg.get("optimizer") if use_oto else "sgd",
        "target_group_sparsity": oto_cfg.get("target_group_sparsity") if use_oto else 0.0,
        "valid": True, "error": None,
    }
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=dm)
    except InvalidSubnetError as e:  # Table 4 ablation: DHSPG without the hierarchy check
        result.update(valid=False, error=str(e).splitlines()[0])
        log.warning("invalid sub-network: %s", e)
    result["fit_seconds"] = round(time.time() - t0, 1)
    report_path = out_dir / "oto" / "oto_report.json"
    if report_path.exists():
        rep = json.loads(report_path.read_text())
        for k in ("params_full", "params_sub", "flops_full", "flops_sub", "param_ratio", "flop_ratio",
                  "group_sparsity", "num_zero_groups", "num_prunable_groups", "verification_max_abs_error"):
            result[k] = rep.get(k)
    elif not use_oto:
        from .subnet.report import count_flops

        result["params_full"] = result["params_sub"] = sum(p.numel() for p in net.parameters())
        result["flops_full"] = result["flops_sub"] = count_flops(net, (example,))
    if cfg.get("run_test", True) and result["valid"]:
        metrics = trainer.test(module, datamodule=dm, verbose=False)
        if metrics:
            result["test_acc"] = float(metrics[0].get("test_acc", float("nan")))
            result["test_loss"] = float(metrics[0].get("test_loss", float("nan")))
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if cfg.get("plot_curves", True) and logger:
        try:
            from .viz.curves import plot_training_curves

            csv = Path(trainer.logger.log_dir) / "metrics.csv"
            if csv.exists():
                result["curves_png"] = str(plot_training_curves(str(csv), str(out_dir / "training_curves.png")))
        except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
            log.warning("could not plot training curves: %s", e)
    log.info("result: %s", json.dumps(result, default=str))
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    result = run(cfg)
    acc = result.get("test_acc")
    return float(acc) if acc is not None else None


if __name__ == "__main__":
    main()
