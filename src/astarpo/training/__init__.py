"""Stage 2: the training loop (``trainer.py``), the objectives it optimizes (A*-PO and the baselines, each beside
its formula: ``objectives.py``), the models it trains (``assembly.py``), a step's figures (``metrics.py``) and the
run's folder, checkpoints and resume (``checkpoint.py``)."""
