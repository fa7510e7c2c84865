#!/usr/bin/env bash
# The GPU check, in one call of the device tool (about 8 minutes on an H100):
#   GPU-marked tests; a short training of the LDM stage under ddp and each DeepSpeed strategy (SD-sized UNet,
#   images/s, peak memory, MFU); UNet step time against diffusers (tiny and SD1.5 sizes, bf16); sampler overhead.
# Carry the wheels the device image lacks (see benchmarks/README.md) in .whl/. Each benchmark also writes its
# figures as JSON into $OUT/results (copy them into benchmarks/results/, then `python benchmarks/report.py write`).
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}:$PWD/tests PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
echo "== gpu tests"
python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests 2>&1 | tail -15
echo "== (the gpu tests include the tiny GLIDE cascade in bf16, and the tiny LDM under ZeRO-2/3 against plain training)"
echo "== LDM stage training throughput per strategy: SD-sized UNet (860M), 32x32x4 latents, bf16, batch 32"
echo "   (goal: MFU >= 35% under ddp on an H100; each strategy at most 100 s, all of them at most 240 s)"
python3 benchmarks/train_throughput.py --config sd --device cuda --batch 32 --steps 20 --warmup 5 --channels-last \
  --strategy ddp deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_2_offload deepspeed_stage_3 \
  deepspeed_stage_3_offload --timeout 100 --budget 240 --json "$OUT/results"
echo "== UNet train step vs diffusers"
python3 benchmarks/unet_step.py --config tiny --device cuda --dtype bf16 --batch 256 --steps 20 --json "$OUT/results"
python3 benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 10 --json "$OUT/results"
python3 benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 10 --channels-last --json "$OUT/results"
echo "== Efficient U-Net vs plain at equal parameters (SR, 256px)"
python3 benchmarks/efficient_unet.py --device cuda --dtype bf16 --side 256 --batch 32 --channels 128 --steps 10 --json "$OUT/results"
echo "== sampler"
python3 benchmarks/sampler.py --device cuda --batch 64 --json "$OUT/results"
echo "== report of this run's records: $OUT/performance.md"
python3 benchmarks/report.py write --results "$OUT/results" --out "$OUT/performance.md"
