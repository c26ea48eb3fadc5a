#!/usr/bin/env bash
# The main job on the bundled default model and the built-in demo data:
# train → side-by-side answers (base vs steered) → adapter saved → ONNX export → onnxruntime answers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart}
FSTEER=${FSTEER:-.venv/bin/fsteer}
mkdir -p "$OUT"
"$FSTEER" train --data demo:harmful --general demo:benign --out "$OUT/adapter" --overwrite
"$FSTEER" inspect "$OUT/adapter"
"$FSTEER" generate --adapter "$OUT/adapter" --prompts-file examples/prompts.txt --compare --max-new-tokens 40
"$FSTEER" export onnx --adapter "$OUT/adapter" --out "$OUT/onnx" --overwrite
"$FSTEER" generate --onnx "$OUT/onnx" --prompts-file examples/prompts.txt --max-new-tokens 40 --json
echo "adapter: $OUT/adapter   onnx: $OUT/onnx"
