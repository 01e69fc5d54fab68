"""astarpo: A*-PO (policy optimization via optimal advantage regression, arXiv 2505.20686).

Pipeline: data -> rewards -> generation -> Stage 1 values -> Stage 2 training -> evaluation.
"""

from ._version import __version__
from .config import EvalConfig, TrainConfig, ValuesConfig
from .evaluate import evaluate
from .training.trainer import Trainer
from .values import compute_values, v_star

__all__ = ["EvalConfig", "TrainConfig", "Trainer", "ValuesConfig", "compute_values", "evaluate", "v_star",
           "__version__"]
