"""Lightning integration: :class:`OTOCallback` (Trainer hooks) and :class:`OTOMixin` (LightningModule)."""
from ._common import PHASE_CODES, OnnxModule, load_compressed
from .callback import OTOCallback
from .mixin import OTOMixin

__all__ = ["OTOCallback", "OTOMixin", "PHASE_CODES", "load_compressed", "OnnxModule"]
