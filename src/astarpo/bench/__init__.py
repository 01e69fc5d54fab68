"""The tools that measure the pipeline rather than run it: ``astarpo bench`` (:mod:`.compare`, A*-PO against the
baselines side by side, with TRL's trainers as external rows: :mod:`.trl`), ``astarpo plan`` (:mod:`.plan`,
per-GPU memory; ``--time``: :mod:`.cost`, hours per method) and ``astarpo report`` (:mod:`.report`).

``astarpo.bench.bench(BenchConfig(...))`` is the ``bench`` command.
"""

from .compare import BenchError, bench, markdown

__all__ = ["BenchError", "bench", "markdown"]
