"""astarpo: A*-PO (policy optimization via optimal advantage regression, arXiv 2505.20686).

Pipeline: data -> rewards -> generation -> Stage 1 values -> Stage 2 training -> evaluation.
"""

__version__ = "0.1.0"

from .config import EvalConfig, TrainConfig, ValuesConfig  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .trainer import Trainer  # noqa: E402
from .values import compute_values, v_star  # noqa: E402

__all__ = ["EvalConfig", "TrainConfig", "Trainer", "ValuesConfig", "compute_values", "evaluate", "v_star",
           "__version__"]
