#!/usr/bin/env bash
# One short accelerator check: the training step and PGD-50 in float32 and bfloat16, plus the
# variants whose speed depends on the backend (attack loop form, FPCM filter implementation).
#
#     bash benchmarks/gpu_check.sh results/gpu      # JSON lines -> results/gpu/*.jsonl
#
# Each benchmark prints one JSON line (images_per_second, compile_seconds, flops_per_step,
# achieved_tflops, peak_rss_mb). Then PGD-50 at batch EVAL_BATCH (512) for its compile time,
# and the test suite under JAX_PLATFORMS=TEST_PLATFORMS (cuda) into OUT/tests.txt (TESTS=0
# skips it). MODEL, BATCH and STEPS override the defaults (resnet18, 128, 5), e.g.
# MODEL=wrn-10-1 BATCH=8 STEPS=1 EVAL_BATCH=8 TEST_PLATFORMS=cpu for a smoke run on CPU.
# OFFICIAL_REPO=/path/to/official-checkout also times the official PyTorch step on the same
# GPU in the same call (reference/official_train_step.py --device cuda, with and without FPCM,
# at the same batch; TORCH_PYTHON picks the python with torch, default the same one) into
# OUT/official_train_step.jsonl: the side-by-side figures of compare_official.md. OFFICIAL_DEVICE
# (default cuda) lets the smoke run use cpu.
# Takes about 8 minutes on one GPU (mostly compilation and the tests); the python in PATH
# must have the project's requirements.
set -euo pipefail
out="${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_FOLDER}"
model="${MODEL:-resnet18}"
batch="${BATCH:-128}"
steps="${STEPS:-5}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
mkdir -p "$out"
"$python" -c "import jax; print(jax.devices())" > "$out/devices.txt"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$out/nvidia_smi.csv" \
    2>/dev/null || true

step() { "$python" "$here/train_step.py" --model "$model" --batch "$batch" --steps "$steps" "$@" \
    | tee -a "$out/train_step.jsonl"; }
attack() { "$python" "$here/attacks.py" --model "$model" --batch "$batch" --attack pgd50 \
    --repeats "$steps" "$@" | tee -a "$out/attacks.jsonl"; }

step --dtype float32
step --dtype bfloat16
step --dtype float32 --no-fpcm
step --dtype bfloat16 --no-fpcm
step --dtype float32 --loop unrolled
step --dtype float32 --loop fori
step --dtype float32 --fpcm-lowpass matmul
step --dtype float32 --fpcm-lowpass fft
attack --dtype float32
attack --dtype bfloat16
if [ -n "${OFFICIAL_REPO:-}" ]; then
  for variant in "" --no-fpcm; do
    "${TORCH_PYTHON:-$python}" "$here/reference/official_train_step.py" \
        --official-repo "$OFFICIAL_REPO" --device "${OFFICIAL_DEVICE:-cuda}" --batch "$batch" \
        --steps "$steps" $variant | tee -a "$out/official_train_step.jsonl"
  done
fi
# Issue 10: PGD-50 as users evaluate (batch 512, fori_loop on GPU) must compile in seconds.
"$python" "$here/attacks.py" --model "$model" --batch "${EVAL_BATCH:-512}" --attack pgd50 \
    --repeats 1 | tee -a "$out/attacks.jsonl"
# The test suite on the accelerator (the 4-device tests skip; multi-process ones use CPUs).
if [ "${TESTS:-1}" = "1" ]; then
  status=0
  (cd "$here/.." && JAX_PLATFORMS="${TEST_PLATFORMS:-cuda}" timeout "${TEST_TIMEOUT:-420}" \
      "$python" -m pytest -q -p no:cacheprovider "${TEST_ARGS:-tests}") > "$out/tests.txt" 2>&1 \
      || status=$?
  echo "pytest exit code $status" >> "$out/tests.txt"
  tail -n 3 "$out/tests.txt"
fi
echo "results in $out"
