"""Erase mode end to end on a ResNet-50-sized and a BERT-base-sized model: seconds per stage.

Stages: ``OTO(...)`` (trace + search space), ``construct_subnet()`` (verified), ``compression_report``,
``export`` (torch program; ONNX with ``--onnx``).  Half of the erasable structures are zeroed
(a valid random set).  The parameter ratio shows that the zeroed structures are really gone.
Run it on two commits to compare (the numbers are wall-clock seconds on this machine).

    python benchmarks/bench_erase_construct.py [--models resnet50 bert-base] [--onnx]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from bench_engine import ResNet50
from lightning_oto import OTO


class HiddenStates(torch.nn.Module):
    """A transformers encoder returning its last hidden state as a plain tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).last_hidden_state


def bert_base() -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="sdpa"))  # 12 layers, hidden 768, 12 heads: 110M parameters
    return HiddenStates(model).eval(), torch.randint(0, 30522, (2, 64))


def resnet50() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ResNet50().eval(), torch.randn(2, 3, 224, 224)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(name: str, onnx: bool) -> None:
    model, x = {"resnet50": resnet50, "bert-base": bert_base}[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oto, t_init = timed(lambda: OTO(model, x, mode="erase"))
        zeroed = oto.random_set_zero_groups(0.5, seed=0)
        sub, t_construct = timed(oto.construct_subnet)
        rep, t_report = timed(lambda: oto.compression_report(sub))
        with tempfile.TemporaryDirectory() as d:
            _, t_export = timed(lambda: oto.export(sub, d, formats=("torch", "onnx") if onnx else ("torch",)))
    print(f"{name:<10} params {rep['params_full'] / 1e6:6.1f}M -> {rep['params_sub'] / 1e6:6.1f}M "
          f"({len(zeroed)}/{len(oto.prunable_groups)} structures erased)  "
          f"OTO() {t_init:5.1f}s  construct {t_construct:5.1f}s  report {t_report:5.1f}s  export {t_export:5.1f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["resnet50", "bert-base"])
    ap.add_argument("--onnx", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        run(name, args.onnx)


if __name__ == "__main__":
    main()
