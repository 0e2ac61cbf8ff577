"""lightning_oto: automatic structured pruning / operator erasing (OTOv3) and CompOFA for Lightning."""
from .errors import InvalidSubnetError, SubnetMismatchError, TraceError
from .oto import OTO
from .space.rules import register_rule

__version__ = "0.1.0"

__all__ = ["OTO", "OTOCallback", "OTOMixin", "OTOSettings", "load", "load_checkpoint", "register_rule", "TraceError",
           "SubnetMismatchError", "InvalidSubnetError"]


def __getattr__(name: str):  # lazy: importing Lightning is slow and not needed for the engine
    if name in ("OTOCallback", "OTOMixin", "OTOSettings", "load_checkpoint"):
        from . import lightning as _l

        return getattr(_l, name)
    if name == "load":  # lightning_oto.load(path): an exported sub-network as a plain nn.Module
        from .subnet.load import load

        return load
    raise AttributeError(name)
