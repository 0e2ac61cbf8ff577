"""Experiment glue: the classification LightningModule, the Hydra run and sweep aggregation."""
from .module import ClassifierModule

__all__ = ["ClassifierModule"]
