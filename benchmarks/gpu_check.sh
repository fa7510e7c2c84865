#!/usr/bin/env bash
# The GPU check, in one call of the device tool (about 5 minutes on an H100):
#   GPU-marked tests, UNet step time against diffusers (tiny and SD1.5 sizes, bf16), sampler overhead.
# Carry the wheels the device image lacks (see benchmarks/README.md) in .whl/.
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
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15
echo "== (the gpu tests include the tiny GLIDE cascade: base + SR train in bf16 and sample on the GPU)"
echo "== UNet train step vs diffusers"
python3 benchmarks/unet_step.py --config tiny --device cuda --dtype bf16 --batch 256 --steps 20
python3 benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 10
python3 benchmarks/unet_step.py --config sd15 --device cuda --dtype bf16 --batch 8 --steps 10 --channels-last
echo "== Efficient U-Net vs plain at equal parameters (SR, 256px)"
python3 benchmarks/efficient_unet.py --device cuda --dtype bf16 --side 256 --batch 32 --channels 128 --steps 10
echo "== sampler"
python3 benchmarks/sampler.py --device cuda --batch 64
