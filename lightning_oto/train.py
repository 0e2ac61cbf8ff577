"""Hydra entry point: ``python -m lightning_oto.train [experiment=<name>] [key=value ...]``.

One run = build data + model, train with the OTOCallback (trace, DHSPG/H2SPG, BatchNorm
recalibration, construct, verify, export), validate and test the sub-network, write ``result.json``
into the run directory.  ``baseline=true`` also trains the same model densely (``<run>/baseline``,
its ``result.json`` has ``"baseline": true``); in a ``-m`` sweep the dense model is trained once, by the
first job, into ``<sweep dir>/baseline/<hash of the dense config>`` and reused by every later job with
the same dense config.  Sweeps (e.g. over ``oto.target_group_sparsity``) are aggregated with
``python -m lightning_oto.sweep <dir>``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("lightning_oto.train")

#: report fields copied into result.json (the sweep table reads them)
REPORT_FIELDS = ("params_full", "params_sub", "flops_full", "flops_sub", "param_ratio", "flop_ratio",
                 "params_removed_fraction", "flops_removed_fraction", "group_sparsity", "num_zero_groups",
                 "num_prunable_groups", "verification_max_abs_error", "phase_reached", "search_finished",
                 "removed_nothing", "bn_recalibration_batches_used", "zeroed_by_half_space", "forced_at_deadline",
                 "cut_norm_ratio", "metric_guard", "degraded")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment described by ``cfg``; returns the result dict (also written to result.json)."""
    from .lightning.terminal import quiet_terminal

    out_dir = Path(cfg.paths.output_dir)
    compofa = cfg.get("task", "oto") == "compofa"
    use_oto = not compofa and bool(cfg.oto.get("enabled", True))
    settings = _oto_settings(cfg, out_dir) if use_oto else None  # before quiet_terminal, which imports Lightning
    quiet_terminal()
    out_dir.mkdir(parents=True, exist_ok=True)
    if compofa:
        return _run_compofa(cfg, out_dir)
    result = _run_one(cfg, out_dir, settings)
    if cfg.get("baseline", False) and use_oto:
        base = _baseline(cfg, out_dir)
        result.update(baseline_test_acc=base.get("test_acc"), baseline_params=base.get("params_full"),
                      baseline_result=base["files"]["result"])
    _write_result(result, out_dir)
    if _is_rank_zero():
        log.info(_run_summary(result))
    return result


def _baseline(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The dense reference run's result: trained here, or read back when another job of the sweep
    already trained the same dense config (a lock keeps parallel launchers from training it twice)."""
    base_dir = _baseline_dir(cfg, out_dir)
    base_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(base_dir.parent / f".{base_dir.name}.lock"):
        saved = base_dir / "result.json"
        if saved.exists():
            log.info("dense baseline: reusing %s (trained once per sweep)", saved)
            return json.loads(saved.read_text())
        log.info("dense baseline: training into %s", base_dir)
        return _run_one(_dense_copy(cfg, base_dir), base_dir, settings=None)


def _baseline_dir(cfg: DictConfig, out_dir: Path) -> Path:
    """``<run>/baseline`` for a single run; in a multirun one folder per dense config under the sweep dir."""
    sweep_dir = _multirun_sweep_dir()
    if sweep_dir is None:
        return out_dir / "baseline"
    return sweep_dir / "baseline" / dense_fingerprint(cfg)


def _multirun_sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir)


def dense_fingerprint(cfg: DictConfig) -> str:
    """A short hash of everything that shapes the dense run: the config without ``oto``, ``baseline`` and
    the output paths (unresolved, so per-job folders do not count); equal for jobs that only vary ``oto.*``."""
    content = OmegaConf.to_container(cfg, resolve=False)
    for key in ("oto", "baseline", "paths", "hydra"):
        content.pop(key, None)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock (POSIX; elsewhere jobs of a parallel launcher may both train)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _dense_copy(cfg: DictConfig, out_dir: Path) -> DictConfig:
    """``cfg`` for the dense reference run: no OTO, everything written below ``out_dir``."""
    dense = cfg.copy()
    with open_dict(dense):
        dense.paths.output_dir = str(out_dir)
        dense.oto.enabled = False
        dense.baseline = False
    return dense


def asked_budget(oto_cfg: dict[str, Any]) -> dict[str, float] | None:
    """The ``oto.budget`` keys that are set (the config lists every key as null), or None."""
    budget = {k: v for k, v in (oto_cfg.get("budget") or {}).items() if v is not None}
    return budget or None


def _run_one(cfg: DictConfig, out_dir: Path, settings: Any) -> dict[str, Any]:
    """Train (compressing with an OTOCallback of ``settings``; None: dense), validate and test; the result dict."""
    import lightning as L
    import torch

    from .errors import InvalidSubnetError

    use_oto = settings is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_num_threads(max(1, int(cfg.get("threads") or torch.get_num_threads())))
    with _config_errors():
        dm, module = _data_and_module(cfg)
        oto_cb, trainer = _trainer(cfg, out_dir, settings)
    oto_cfg = OmegaConf.to_container(cfg.oto, resolve=True)
    result: dict[str, Any] = {
        "experiment": cfg.get("experiment_name", "default"), "model": cfg.model.name, "data": cfg.data.name,
        "seed": cfg.seed, "baseline": not use_oto, "mode": oto_cfg.get("mode") if use_oto else None,
        "optimizer": oto_cfg.get("optimizer") if use_oto else "sgd",
        "target_group_sparsity": (None if asked_budget(oto_cfg) else oto_cfg.get("target_group_sparsity"))
        if use_oto else 0.0,
        "budget": asked_budget(oto_cfg) if use_oto else None, "budget_reached": None,
        "valid": True, "error": None, "files": {"result": str(out_dir / "result.json")},
        # FLOPs in this file count one forward pass over the example input: this many images
        "example_batch_size": int(module.example_input_array.shape[0]),
    }
    t0 = time.time()
    try:
        trainer.fit(module, datamodule=dm)
    except InvalidSubnetError as e:  # Table 4 ablation: DHSPG without the hierarchy check
        result.update(valid=False, error=str(e).splitlines()[0])
        log.warning("invalid sub-network: %s", e)
    result["fit_seconds"] = round(time.time() - t0, 1)
    if oto_cb is not None and result["valid"]:
        _report_in_launcher(oto_cb, trainer, result, since=t0)
    if oto_cb is not None and oto_cb.report is not None:
        result.update({k: oto_cb.report.get(k) for k in REPORT_FIELDS})
        reached = oto_cb.report.get("budget") or {}
        result["budget_reached"] = {k: v["reached"] for k, v in reached.items()} or None
        result.setdefault("tested_network", "sub-network" if oto_cb.full_network is not None else "full network")
    elif not use_oto:
        result.update(_dense_size(module))
    if cfg.get("run_test", True) and result["valid"]:
        result.update(_evaluate(trainer, module, dm))
    if oto_cb is not None and oto_cb.report is not None:  # the report now holds the metrics too
        result["val_before_recalibration"] = oto_cb.report["metrics"].get("val_before_recalibration")
        result["files"].update({k: v for k, v in oto_cb.report.get("files", {}).items() if v})
        result["files"]["export_dir"] = oto_cb.report["export_dir"]
    elif cfg.get("plot_curves", True) and trainer.logger is not None:
        result["files"]["curves"] = _plot_dense_curves(trainer, out_dir)
    result["curves_png"] = result["files"].get("curves")
    _write_result(result, out_dir)  # rank 0 only
    return result


@contextmanager
def _config_errors() -> Iterator[None]:
    """Errors raised while the run's objects are built from the config are bad settings: a ``ConfigError``
    (carrying the original as its cause).  Errors after that (training, export) stay what they are.
    Lightning's ``MisconfigurationException`` counts only once Lightning is loaded (the settings are
    checked before it is)."""
    from hydra.errors import InstantiationException

    from .errors import ConfigError

    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    bad = (ValueError, TypeError, KeyError, InstantiationException) + (
        (lightning_errors.MisconfigurationException,) if lightning_errors is not None else ())
    try:
        yield
    except ConfigError:
        raise
    except bad as e:
        reason = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(reason.strip() or type(e).__name__) from e


def _report_in_launcher(oto_cb: Any, trainer: Any, result: dict[str, Any], since: float) -> None:
    """Make sure the compression report reached this process, or say that the run has none.

    With ``strategy=ddp`` (the configs' choice) this process is rank 0 and holds the report.  With
    ``ddp_spawn`` the workers trained and rank 0 wrote ``oto_report.json``, but nothing of the callback comes
    back: read that file, and record that the test runs the full model (its zero groups make it compute what
    the sub-network computes, within ``verification_max_abs_error``).
    """
    from .lightning.compat import strategy_start_method
    from .lightning.run_report import REPORT_FILE

    if oto_cb.report is not None or not _is_rank_zero():
        return
    path = Path(oto_cb.settings.export_dir) / REPORT_FILE
    if path.is_file() and path.stat().st_mtime >= since:
        oto_cb.report = json.loads(path.read_text())
        if strategy_start_method(trainer.strategy) in ("spawn", "fork", "forkserver"):
            result["tested_network"] = ("full network with its zero groups (ddp_spawn returns the weights, not the "
                                        "sub-network; use trainer=ddp to test the sub-network itself)")
        return
    result.update(valid=False, error="no compression report reached the launching process (fit ended without "
                                     f"writing {path})")
    log.warning("no compression report: %s", result["error"])


def _data_and_module(cfg: DictConfig) -> tuple[Any, Any]:
    """The datamodule and the classifier around the model built for the input the data implies."""
    import torch

    from .data import build_datamodule
    from .experiments.module import ClassifierModule
    from .models import build_model

    dm = build_datamodule(**OmegaConf.to_container(cfg.data, resolve=True))
    net = build_model(cfg.model.name, num_classes=dm.num_classes, in_channels=dm.in_channels,
                      image_size=dm.image_size, **OmegaConf.to_container(cfg.model.kwargs, resolve=True))
    g = torch.Generator().manual_seed(int(cfg.seed))  # what OTO traces and Lightning's summary counts FLOPs on
    example = torch.randn(2, dm.in_channels, dm.image_size, dm.image_size, generator=g)
    module = ClassifierModule(net, dm.num_classes, example, **OmegaConf.to_container(cfg.optim, resolve=True))
    return dm, module


def _trainer(cfg: DictConfig, out_dir: Path, settings: Any) -> tuple[Any, Any]:
    from hydra.utils import instantiate

    from .lightning import OTOCallback

    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None and "_target_" in c]
    oto_cb = None
    if settings is not None:
        oto_cb = OTOCallback(settings=settings)
        callbacks.append(oto_cb)
        _refuse_fsdp1(cfg.trainer)
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    return oto_cb, trainer


def _oto_settings(cfg: DictConfig, out_dir: Path) -> Any:
    """The run's ``OTOSettings`` (the ``oto`` group, the run's export folder, the swap), checked before Lightning
    is even imported: a bad value is refused seconds sooner."""
    from .lightning.settings import OTOSettings

    oto_cfg = OmegaConf.to_container(cfg.oto, resolve=True)
    oto_cfg.pop("enabled", None)
    oto_cfg["budget"] = asked_budget(oto_cfg)
    if oto_cfg["budget"]:  # a budget set on the command line replaces the config's default sparsity
        oto_cfg.pop("target_group_sparsity", None)
    oto_cfg.setdefault("plot_curves", bool(cfg.get("plot_curves", True)))
    with _config_errors():
        return OTOSettings.from_kwargs(network_attr="net", export_dir=str(out_dir / "oto"), swap_subnet=True,
                                       **oto_cfg)


def _refuse_fsdp1(trainer_cfg: DictConfig) -> None:
    """FSDP1 (``strategy=fsdp`` / ``FSDPStrategy``) is refused by name before Lightning's own error (on CPU it only
    says FSDP needs a GPU), pointing to the FSDP2 configs OTOCallback supports."""
    from .errors import ConfigError

    strategy = trainer_cfg.get("strategy")
    name = strategy if isinstance(strategy, str) else str((strategy or {}).get("_target_", ""))
    if name.lower() in ("fsdp", "fsdp_cpu_offload") or name.endswith("FSDPStrategy"):
        raise ConfigError(f"trainer.strategy={name}: OTOCallback does not support FSDPStrategy (FSDP1). Use FSDP2 "
                          "through ModelParallelStrategy: trainer=fsdp (GPUs) or trainer=fsdp_sim (2 CPU processes).")


def _evaluate(trainer: Any, module: Any, dm: Any) -> dict[str, Any]:
    """Validation (quietly: it feeds the report's after-recalibration row) and the test with its table."""
    out: dict[str, Any] = {}
    val = trainer.validate(module, datamodule=dm, verbose=False)
    test = trainer.test(module, datamodule=dm)
    for metrics in (val[0] if val else {}, test[0] if test else {}):
        out.update({k: float(v) for k, v in metrics.items()})
    return out


def _dense_size(module: Any) -> dict[str, Any]:
    from .subnet.report import count_flops, count_params

    params, flops = count_params(module.net), count_flops(module.net, (module.example_input_array,))
    return {"params_full": params, "params_sub": params, "flops_full": flops, "flops_sub": flops,
            "param_ratio": 1.0, "flop_ratio": 1.0}


def _plot_dense_curves(trainer: Any, out_dir: Path) -> str | None:
    from .viz.curves import plot_training_curves

    csv = Path(trainer.logger.log_dir) / "metrics.csv"
    if not csv.exists():
        return None
    try:
        return str(plot_training_curves(str(csv), str(out_dir / "training_curves.png")))
    except Exception as e:  # noqa: BLE001 - a plot must not fail a finished run
        log.warning("could not plot training curves: %s", e)
        return None


def _write_result(result: dict[str, Any], out_dir: Path) -> None:
    """Rank 0 writes (under DDP / FSDP2 with Lightning's subprocess launcher every rank runs this script, and only
    rank 0 holds the OTO report)."""
    if not _is_rank_zero():
        return
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def _run_summary(result: dict[str, Any]) -> str:
    """One line: size next to accuracy (and the dense reference when there is one)."""
    head = f"{result['model']} on {result['data']}, " + (f"{result['mode']} mode" if result["mode"] else "dense")
    size = (f"params {result.get('params_full') or 0:,} -> {result.get('params_sub') or 0:,} "
            f"({_pct(result.get('params_removed_fraction') or 0.0)} removed)")
    if result.get("removed_nothing"):
        size += f", NOTHING REMOVED (search ended in the {result.get('phase_reached')} phase)"
    acc = f"test_acc {_pct(result.get('test_acc'))}, val_acc {_pct(result.get('val_acc'))}"
    if result.get("baseline_test_acc") is not None:
        acc += f" (dense baseline test_acc {_pct(result['baseline_test_acc'])})"
    if result.get("degraded"):
        guard = result.get("metric_guard") or {}
        acc += (f"; DEGRADED: {guard.get('monitor')} fell by more than max_metric_drop="
                f"{guard.get('max_metric_drop')} from the end of warm-up")
    return f"{head}: {size}; {acc}; {result['files']['result']}"


def _run_compofa(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """The CompOFA pipeline with the Hydra trainer config (accelerator, devices, strategy, precision)."""
    from .compofa import run_compofa

    ccfg = OmegaConf.to_container(cfg.compofa, resolve=True)
    ccfg.setdefault("output_dir", str(out_dir / "compofa"))
    ccfg.setdefault("seed", int(cfg.seed))
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) if cfg.get("trainer") else {}
    summary = run_compofa(ccfg, trainer_kwargs=trainer_kwargs)
    result = {"experiment": "compofa", "seed": cfg.seed, "valid": True,
              "num_architectures": summary.get("num_architectures"),
              "teacher_test_accuracy": summary.get("teacher_test_accuracy"),
              "pareto": summary.get("pareto"), "summary": str(Path(ccfg["output_dir"]) / "summary.json")}
    _write_result(result, out_dir)
    return result


def exit_on_config_error(error: Exception) -> None:
    """A bad setting: print its reason alone and exit with status 2 (``HYDRA_FULL_ERROR=1``: re-raise, so
    Hydra prints the full traceback)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"lightning_oto.train: invalid configuration: {error}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from .errors import ConfigError

    try:
        result = run(cfg)
    except ConfigError as e:
        exit_on_config_error(e)
    acc = result.get("test_acc")
    return float(acc) if acc is not None else None


if __name__ == "__main__":
    main()
