"""Built-in synthetic tasks: generated on the fly, no download, deterministic from a seed."""

from .arithmetic import ArithmeticTask

TASKS = {"arithmetic": ArithmeticTask}

__all__ = ["ArithmeticTask", "TASKS"]
