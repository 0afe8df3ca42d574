#!/usr/bin/env bash
# The GPU check, as one command on the lent GPU machine as it is handed over (Python 3.12, its own CUDA torch, no
# diffusers or torchao, no network): install the carried wheels (.whl/, from benchmarks/gpu_wheels.sh) beside that
# torch, print the versions that run, and run benchmarks/gpu_real_scale.py on the full-size Z-Image-Turbo and
# FLUX.2-klein-4B transformers (bf16, int8 and float8 bases; SFT and D-OPSD steps with their learning invariants;
# the trainer's sampling) into $OUT/gpu_real_scale.json, with its log beside it. About 7 minutes at most on one
# H100: runs are started until BUDGET_S (default 300 s) is spent, the JSON is written after each, and the whole
# check is stopped at LIMIT_S (default 450 s). Exit status: gpu_real_scale's (1 when an invariant fails), 124 when
# it was stopped at LIMIT_S (the JSON keeps the runs that finished). docs/gpu-check.md has the exact command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
SITE="${DOPSD_SITE:-/tmp/dopsd-site}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
WHEELS="${WHEELS:-.whl}"
if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "gpu_check: no wheels in $WHEELS/; run 'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry .whl" >&2
  exit 2
fi
started=$(date +%s)
"$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl 2>&1 \
  | grep -v "^WARNING: Target directory" || true
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the wheels first, then dopsd from this working tree
"$PY" - <<'EOF' || exit 2
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "torchao", "huggingface_hub", "numpy"):
    module = importlib.import_module(name)
    print(f"  {name} {module.__version__} from {module.__file__.rsplit('/', 2)[0]}")
import dopsd
print(f"  dopsd from {dopsd.__file__.rsplit('/', 2)[0]}")
EOF
echo "gpu_check: wheels installed and imports checked in $(( $(date +%s) - started )) s"
TINY=()
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: no CUDA GPU here: a dry run of this script with --tiny on the CPU"
  TINY=(--tiny --steps 1)
}
timeout --signal=TERM --kill-after=15 "${LIMIT_S:-450}" "$PY" benchmarks/gpu_real_scale.py "${TINY[@]}" \
  --budget-s "${BUDGET_S:-300}" --out "$OUT/gpu_real_scale.json" "$@" 2>&1 | tee "$OUT/gpu_real_scale.log"
status=${PIPESTATUS[0]}
echo "gpu_check: exit $status after $(( $(date +%s) - started )) s; results in $OUT/gpu_real_scale.json"
exit "$status"
