"""``astarpo ARGS`` whose process 1 pushes into its vLLM engine a tensor the engine does not know (one renamed on
the way): the failed-push test of test_hybrid.py. Every other part is the real command."""

import os
import sys

from astarpo import engines
from astarpo.cli import main

if os.environ.get("RANK") == "1":
    pushed = engines.policy_weights

    def renamed(*args, **kwargs):
        for name, tensor in pushed(*args, **kwargs):
            yield ("model.no_such_layer.weight" if name.endswith("layers.0.mlp.up_proj.weight") else name), tensor

    engines.policy_weights = renamed
sys.exit(main(sys.argv[1:]))
