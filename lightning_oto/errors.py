"""Every exception lightning_oto raises on purpose; a leaf module that imports nothing of the package."""
from __future__ import annotations


class TraceError(RuntimeError):
    """The model could not be traced; the message quotes the tracer's reason."""


class SubnetMismatchError(RuntimeError):
    """The constructed sub-network's outputs differ from the full model's."""


class InvalidSubnetError(RuntimeError):
    """The zero groups cannot be erased without disconnecting the network (e.g. DHSPG on an erase space)."""


class IncompleteRemovalError(RuntimeError):
    """The sub-network still holds a variable of a zero group or an operator that cannot reach an output."""


class DynamicShapeError(ValueError):
    """A dimension the user asked to keep dynamic is pinned by the model; the message names it and why."""


class ConfigError(ValueError):
    """A setting is invalid (a Hydra value, or a control that names no module of the model); the message is
    the whole reason, so the Hydra entry point prints it alone."""


__all__ = ["ConfigError", "TraceError", "SubnetMismatchError", "InvalidSubnetError", "IncompleteRemovalError", "DynamicShapeError"]
