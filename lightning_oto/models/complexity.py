"""Measure every registered model's size and cost against the papers' baselines.

Run ``python -m lightning_oto.models.complexity`` to print the Markdown table kept in
``models/README.md``; the tests assert the same numbers stay within tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import MODEL_NAMES, build_model
from ..subnet.report import count_macs, count_params


@dataclass(frozen=True)
class PaperTarget:
    """A baseline from the papers: params and MACs ("FLOPs" there) at the stated input size."""

    params: float | None
    macs: float | None
    source: str


# Baselines reported by ASGSSD / OTOv3 (Tables 1, 4, 5 and Sec. 4).  None: not reported.
PAPER_TARGETS: dict[str, PaperTarget] = {
    "demonet": PaperTarget(0.82e6, 209e6, "DemoNet, Fashion-MNIST 1x28x28 (Table 1)"),
    "stacked_unets": PaperTarget(0.80e6, 184e6, "StackedUnets, SVHN 3x32x32 (Table 1)"),
    "super_resnet": PaperTarget(2.0e6, None, "SuperResNet, CIFAR-10 3x32x32 (Table 2: searched sub-net)"),
    "darts8": PaperTarget(4.05e6, 614e6, "DARTS 8 cells, STL-10 3x96x96 (Table 5)"),
    "regnet_800m": PaperTarget(6.60e6, None, "RegNet-800M, CIFAR-10 3x32x32 (Table 4)"),
}


def measure(name: str) -> tuple[int, int, tuple[int, ...]]:
    """(params, MACs per image, input shape) of a default-configured registered model."""
    model = build_model(name).eval()
    x = model.example_input(1)
    with torch.no_grad():
        return count_params(model), count_macs(model, x), tuple(x.shape[1:])


def markdown_table(names: tuple[str, ...] = MODEL_NAMES) -> str:
    """The measured-vs-paper table as Markdown."""
    rows = [
        "| model | input | params | MACs | paper params | paper MACs |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        params, macs, shape = measure(name)
        tgt = PAPER_TARGETS.get(name)

        def fmt(value: float | None, ref: float | None, digits: int) -> str:
            if value is None or ref is None:
                return "—"
            return f"{ref / 1e6:.{digits}f}M ({(value / ref - 1) * 100:+.1f}%)"

        rows.append(
            f"| {name} | {'x'.join(map(str, shape))} | {params / 1e6:.3f}M | {macs / 1e6:.1f}M | "
            f"{fmt(params, tgt.params if tgt else None, 2)} | {fmt(macs, tgt.macs if tgt else None, 0)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
