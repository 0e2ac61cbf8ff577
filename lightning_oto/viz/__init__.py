"""Pictures of a compression run: Graphviz drawings of an OTO (trace, search space, redundant set,
sub-network) and training curves (loss / accuracy / group sparsity vs step with the phases marked)."""
from .curves import plot_training_curves
from .graphviz import visualize

__all__ = ["visualize", "plot_training_curves"]
