"""lightning_oto: automatic structured pruning / operator erasing (OTOv3) and CompOFA for Lightning."""
__version__ = "0.1.0"
