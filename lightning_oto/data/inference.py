"""What inference needs to know about a model's inputs, read from a datamodule (saved with every export)."""
from __future__ import annotations

from typing import Any

from .datasets import adapt_stats


def inference_metadata(datamodule: Any = None, **extra: Any) -> dict[str, Any]:
    """What inference needs to know about the inputs, read from a (set-up) datamodule, plus ``extra``.

    Keys: ``data``, ``image_size``, ``in_channels``, ``mean`` / ``std`` (per input channel, as the
    datamodule's transform applies them: ``x = (image - mean) / std`` on images scaled to [0, 1]),
    ``num_classes`` and ``class_names`` where known, and ``preprocess`` (the recipe in words).
    """
    meta: dict[str, Any] = {}
    if datamodule is not None:
        meta.update(_datamodule_settings(datamodule))
    meta.update(extra)
    return meta


def _datamodule_settings(dm: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"data": getattr(dm, "name", type(dm).__name__)}
    for key in ("image_size", "in_channels", "num_classes"):
        if isinstance(getattr(dm, key, None), int):
            meta[key] = int(getattr(dm, key))
    # after setup the train-split statistics (datasets without fixed ones); before, the class defaults
    mean, std = getattr(dm, "_mean", None), getattr(dm, "_std", None)
    if mean is None or std is None:
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    if mean is not None and std is not None:
        channels = meta.get("in_channels", len(list(mean)))
        meta["mean"] = [float(v) for v in adapt_stats(mean, channels)]
        meta["std"] = [float(v) for v in adapt_stats(std, channels)]
        meta["preprocess"] = (f"images as floats in [0, 1] (uint8 / 255), {channels} channel(s), resized to "
                              f"{meta.get('image_size', '?')}x{meta.get('image_size', '?')}; then "
                              "x = (image - mean) / std per channel")
    classes = getattr(dm, "classes", None)
    if classes:
        meta["class_names"] = [str(c) for c in classes]
    return meta


__all__ = ["inference_metadata"]
