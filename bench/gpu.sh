#!/usr/bin/env bash
# One GPU, one script, under 8 minutes (issue #11): is the device there, how fast does configs/small.toml train
# on it in bf16, and how fast is the train-step bench. Prints tokens/s, MFU against the device's bf16 peak
# (minidsv3/accounting.py: 989.4 TFLOP/s dense for an H100/H200) and peak device memory.
#
#     bash bench/gpu.sh                 # OUT=/tmp/minidsv3-gpu by default; STEPS=300
#
# Needs a CUDA build of jax (pip install "jax[cuda12]"); nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/minidsv3-gpu}"
STEPS="${STEPS:-300}"
mkdir -p "$OUT"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import jax
devices = jax.devices()
print(f"jax {jax.__version__}: {devices}")
if devices[0].platform != "gpu":
    raise SystemExit("error: JAX sees no GPU here; install a CUDA build of jax (pip install 'jax[cuda12]')")
PY

echo "== configs/small.toml, $STEPS pre-training steps in bf16 (batch 32 x 1024)"
# train.py's own log prints tokens/s and MFU per step and lays out Table 1 (device-hours, MFU) at the end.
timeout 330 python train.py configs/small.toml --train.pretrain_steps="$STEPS" --train.context_steps=0 \
    --train.sft_steps=0 --train.sample_tokens=0 --train.eval_every="$STEPS" --train.ckpt_every="$STEPS" \
    --train.out_dir="$OUT/small" 2>&1 | tail -n 25

echo "== train-step bench: small.toml at 32 x 1024 and 8 x 256, bf16"
timeout 90 python bench/train_step.py configs/small.toml --shapes 32x1024 --dtypes bfloat16 --steps 10
timeout 60 python bench/train_step.py --shapes 8x256 --dtypes bfloat16 --steps 10

echo "== MoE dispatch on the GPU (capacity buffers vs dense SwiGLU)"
timeout 60 python bench/moe.py --tokens 32x1024 --dtypes bfloat16 --steps 10
