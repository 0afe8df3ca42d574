#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels benchmarks/gpu_check.sh installs on the lent GPU machine
# (Python 3.12, its own CUDA torch, no diffusers or torchao, no network): every package dopsd's real-scale check
# imports, except torch and the packages torch itself depends on, as cp312 manylinux (or pure-Python) wheels, into
# .whl/ (git-ignored; the device tool carries it with `carry: [".whl"]`, 64 MiB at most: this set is ~54 MiB).
#
#     bash benchmarks/gpu_wheels.sh          # once, here; then see docs/gpu-check.md
#     PYVER=3.11 DEST=/tmp/whl311 bash benchmarks/gpu_wheels.sh   # the same set for this machine's Python (a dry
#                                                                 # run of gpu_check.sh here: docs/gpu-check.md)
#
# Versions: constraints.txt's (what `make test` runs). torchao 0.18.0 although the GPU machine's torch is 2.11:
# dopsd.models.quantize imports `to_nf4` from torchao.quantization, which 0.16 and 0.17 lack (their compiled
# kernels are built for other torch versions anyway, and torchao skips loading them; int8 and float8 weight-only
# run in Python over torch ops). The list is what the check imports (the modules loaded by the tiny run, mapped to
# their distributions), plus the declared requirements of those packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
WHEELS=(
  accelerate==1.15.0 diffusers==0.42.1 huggingface_hub==2.5.0 peft==0.21.2 safetensors==0.8.0 tokenizers==0.23.3
  torchao==0.18.0 transformers==5.24.0
  # their requirements (torch brings filelock, fsspec, jinja2, networkx, sympy)
  anyio==4.16.0 certifi==2026.10.19.post1 charset-normalizer==3.5.3 h11==0.16.0 httpcore2==2.17.0 httpx2==2.17.0
  idna==3.21 numpy==2.4.6 packaging==26.4 pillow==13.0.0 psutil==7.2.2 PyYAML==6.0.4 regex==2026.12.2
  requests==2.34.2 sniffio==1.3.1 tqdm==4.70.1 truststore==0.10.5 typing_extensions==4.16.0 urllib3==2.8.0
)
PYVER="${PYVER:-3.12}"
DEST="${DEST:-.whl}"
rm -rf "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
ls "$DEST" | sed 's/^/  /'
echo "$(ls "$DEST" | wc -l) of ${#WHEELS[@]} wheels, $(du -sh "$DEST" | cut -f1) in $DEST (pip chose each for Python $PYVER: cp${PYVER/./}, abi3 or pure Python)"
[ "$(ls "$DEST" | wc -l)" -eq "${#WHEELS[@]}" ]
