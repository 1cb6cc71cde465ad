#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run moefx on the bundled example model (a small LLaMA in
# examples/models/tiny-llama): inspect it, convert its FFNs to top-2-of-8 MoE layers, and export it to ONNX
# with one fused com.microsoft.MoE node per layer (checked against torch in ONNX Runtime), then benchmark it
# against the dense model in torch and ONNX Runtime (table, out/demo-bench.json, out/demo-bench.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=PASSIVE
MOEFX=.venv/bin/moefx
OUT="${OUT:-out/demo}"
mkdir -p "$(dirname "$OUT")"
set -x
$MOEFX inspect examples/models/tiny-llama
$MOEFX convert examples/models/tiny-llama --experts 8 --top-k 2 -o "$OUT" --force
$MOEFX inspect "$OUT"
$MOEFX export "$OUT" -o "$OUT.onnx" --force
$MOEFX bench "$OUT" --batch 1,8 --seq 64 --json "$OUT-bench.json" --plot "$OUT-bench.png" --force
