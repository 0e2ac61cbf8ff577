"""Saliency proxies: which groups look redundant.

Every proxy maps a :class:`~lightning_oto.optim.group_index.GroupStats` (per-group tensors of
shape ``[G]``) to a score tensor ``[G]``.  Convention everywhere: **smaller score = more
redundant**.  Optimizers exponentially average the score over the warm-up steps and mark the
``K`` groups with the smallest average as redundant.

Built-in proxies (``rms_g = |x_g| / sqrt(numel_g)``, ``cos_g = <grad_g, x_g>/(|grad_g| |x_g|)``,
which equals the cosine between the negative gradient and the projection direction ``-x_g``):

* ``"default"`` (OTO/DHSPG style)::

      score_g = m_g * (1 - 0.5 * cos_g),     m_g = sqrt(|x_g|^2 / ref_g)

  ``m_g`` is the group's *layer-relative* magnitude: ``ref_g`` is the squared norm the group
  would have if each of its rows had the mean squared row norm of its parameter
  (:attr:`GroupStats.x_ref_sq`), so ``m_g = 1`` for a typical channel of its layer whatever
  the layer's scale (a global ranking of raw magnitudes would strip whole layers with large
  fan-in, since initial weight scale ~ 1/sqrt(fan_in)).  The factor ``1 - 0.5*cos_g`` (in
  ``[0.5, 1.5]``) discounts groups whose projection direction ``-x_g`` agrees with the descent
  direction ``-grad_g`` (moving them to zero *decreases* the loss to first order) and inflates
  groups for which the gradient pushes away from zero.  Groups with tiny magnitude always rank
  as redundant, whatever the (noisy) gradient direction.
* ``"magnitude"``: ``rms_g`` (global, not layer-normalised).
* ``"taylor"``: ``|<grad_g, x_g>|`` — the first-order estimate of the loss change caused by
  setting the group to zero.

Custom proxies: ``register_saliency("mine", fn)`` or pass a callable directly to the optimizer.
"""
from __future__ import annotations

from typing import Callable

import torch

from lightning_oto.optim.group_index import GroupStats

__all__ = [
    "SaliencyFn",
    "register_saliency",
    "get_saliency",
    "available_saliencies",
    "default_saliency",
    "magnitude_saliency",
    "taylor_saliency",
    "make_default_saliency",
]

SaliencyFn = Callable[[GroupStats], torch.Tensor]

_REGISTRY: dict[str, SaliencyFn] = {}


def _rms(stats: GroupStats) -> torch.Tensor:
    return stats.x_norm / stats.numel.clamp_min(1).sqrt()


def make_default_saliency(cos_weight: float = 0.5) -> SaliencyFn:
    """DHSPG-style proxy ``m * (1 - cos_weight * cos)``; ``cos_weight`` in ``[0, 1)``."""
    if not 0.0 <= cos_weight < 1.0:
        raise ValueError(f"cos_weight must be in [0, 1), got {cos_weight}")

    def fn(stats: GroupStats) -> torch.Tensor:
        return stats.relative_magnitude * (1.0 - cos_weight * stats.cosine)

    fn.__name__ = f"default_saliency(cos_weight={cos_weight})"
    return fn


default_saliency: SaliencyFn = make_default_saliency(0.5)


def magnitude_saliency(stats: GroupStats) -> torch.Tensor:
    """Per-element RMS magnitude of the group (size-independent)."""
    return _rms(stats)


def taylor_saliency(stats: GroupStats) -> torch.Tensor:
    """``|<grad_g, x_g>|``: first-order loss change when the group is zeroed."""
    return stats.dot.abs()


def register_saliency(name: str, fn: SaliencyFn, *, overwrite: bool = False) -> None:
    """Make ``fn`` available to optimizers as ``saliency=name``."""
    if not isinstance(name, str) or not name:
        raise ValueError("saliency name must be a non-empty string")
    if not callable(fn):
        raise ValueError(f"saliency {name!r}: fn must be callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"saliency {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = fn


def available_saliencies() -> list[str]:
    return sorted(_REGISTRY)


def get_saliency(name_or_fn: str | SaliencyFn) -> SaliencyFn:
    """Resolve a registered name or pass a callable through; unknown names list the valid ones."""
    if callable(name_or_fn):
        return name_or_fn
    if isinstance(name_or_fn, str) and name_or_fn in _REGISTRY:
        return _REGISTRY[name_or_fn]
    raise ValueError(
        f"unknown saliency {name_or_fn!r}; valid names: {', '.join(available_saliencies())} "
        "(or pass a callable taking GroupStats and returning a [num_groups] tensor)"
    )


register_saliency("default", default_saliency)
register_saliency("magnitude", magnitude_saliency)
register_saliency("taylor", taylor_saliency)
