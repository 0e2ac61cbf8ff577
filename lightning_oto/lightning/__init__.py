"""Lightning integration: :class:`OTOCallback` (Trainer hooks), :class:`OTOMixin` (LightningModule), their
shared :class:`OTOSettings`, and :func:`load_checkpoint` for checkpoints saved after ``swap_subnet``."""
from .callback import OTOCallback
from .checkpointing import load_checkpoint
from ..subnet.load import OnnxModule
from .mixin import OTOMixin
from .run_report import PHASE_CODES
from .settings import OTOSettings

__all__ = ["OTOCallback", "OTOMixin", "OTOSettings", "PHASE_CODES", "load_checkpoint", "OnnxModule"]
