#!/usr/bin/env bash
# The GPU check, in one call of the device tool (run tool: timeout_s 600, carry [".whl"]). A deadline
# (GPU_CHECK_SECONDS, default 550 s from the start, install included) guards every part: what no longer fits is
# skipped with a line saying so, and the report is always written. Parts, in priority order:
#   tests         GPU-marked tests (at most 75 s)
#   sd2_256       the SD2-base LDM stage (865.9M-parameter UNet, ViT-H/14 text states precomputed) training at 256^2
#                 (4x32x32 latents, batch 64/GPU), bf16, one GPU, under ddp and fsdp (FSDP2), switch sets plain and
#                 channels_last+fused+compile: images/s, peak memory, MFU (goal >= 40%). Runs in that order
#                 (ddp plain, ddp fast, fsdp plain, fsdp fast); the last ones are skipped when the part's 200 s end
#   unet          our UNet's train step against diffusers' UNet2DConditionModel, sd2-256 (batch 64) and sd2-512
#                 (batch 16), bf16, channels_last + fused AdamW, eager (goal: ours / diffusers <= 0.8); 50 s each
#   sd2_512       the sd2_256 part at 512^2 (4x64x64 latents, batch 16/GPU) under ddp: plain,
#                 channels_last+fused+compile, and that + checkpointing (last: the first to go); at most 200 s
#   unet_compile  the unet part with both models' blocks compiled (--compile blocks)
#   deepspeed     ZeRO-1/2/3 at sd2 256^2, plain. Dropped from the earlier sweep: the two offload strategies (each
#                 AdamW step runs on the CPU over 866M parameters: seconds per step, and the table in
#                 docs/scaling.md shows SD2-base fits an 80 GB GPU without offload; run them by hand), and the
#                 SD1.5-sized `--config sd` sweep and sd15 unet_step lines (sd2 is the issue's size)
#   extras        tiny UNet step vs diffusers, Efficient U-Net vs plain, sampler overhead
# Expect tests, sd2_256, unet and sd2_512 to fit one call on an H100 (the compiles are the unknown: each compiled run
# spends its first step compiling the UNet's blocks); the rest in a second call:
#   GPU_CHECK_PARTS="unet_compile deepspeed extras" bash benchmarks/gpu_check.sh
# Carry the wheels the device image lacks (see benchmarks/README.md) in .whl/. Each benchmark also writes its
# figures as JSON into $OUT/results (copy them into benchmarks/results/, then `python benchmarks/report.py write`).
set -uo pipefail
cd "$(dirname "$0")/.."
END=$((SECONDS + ${GPU_CHECK_SECONDS:-550}))
REPORT_S=15  # kept for the report at the end
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}:$PWD/tests PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
want() { [[ -z "${GPU_CHECK_PARTS:-}" || " $GPU_CHECK_PARTS " == *" $1 "* ]]; }
left() { echo $((END - SECONDS - REPORT_S)); }
# guarded CAP CMD...: run CMD for at most CAP seconds and never past the deadline; skipped when under 30 s
# (and under CAP) are left
guarded() {
  local cap=$1 t; shift; t=$(left); (( t > cap )) && t=$cap
  if (( t < 30 && t < cap )); then echo "   skipped: $(left) s left before the deadline: ${*:2:4} ..."; return 0; fi
  timeout -k 10 "$t" "$@"; local rc=$?
  (( rc == 124 || rc == 137 )) && echo "   timed out after $t s: ${*:2:4} ..."
  return 0
}
# a train_throughput call: its --budget is BUDGET or what is left, whichever is less; the outer timeout adds 30 s
# (the script stops starting runs at its budget, then prints its table and writes its JSON)
throughput() {
  local budget=$1 b; shift; b=$(( $(left) - 30 )); (( b > budget )) && b=$budget
  if (( b < 60 )); then echo "   skipped: $(left) s left before the deadline"; return 0; fi
  guarded $((b + 30)) python3 benchmarks/train_throughput.py --budget "$b" "$@"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
if want tests; then
  echo "== gpu tests (at most 75 s)"
  guarded 75 python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests 2>&1 | tail -15
  echo "== (the gpu tests include the tiny GLIDE cascade in bf16, and the tiny LDM under ZeRO-2/3 against plain training)"
fi
SD2=(--config sd2 --device cuda --workers 4 --json "$OUT/results")
if want sd2_256; then
  echo "== SD2-base LDM stage training, 256^2 (4x32x32 latents), bf16, batch 64/GPU: ddp and fsdp x plain and"
  echo "   channels_last+fused+compile (goal: MFU >= 40%; this part at most 200 s, each run at most 170 s) [$(left) s left]"
  throughput 200 "${SD2[@]}" --side 256 --batch 64 --steps 15 --warmup 3 --timeout 170 \
    --strategy ddp fsdp --switches plain channels_last+fused+compile
fi
UNET=(--device cuda --dtype bf16 --channels-last --fused --json "$OUT/results")
if want unet; then
  echo "== UNet train step vs diffusers, SD2-base, bf16, channels_last, fused AdamW, eager (goal: ratio <= 0.8) [$(left) s left]"
  guarded 50 python3 benchmarks/unet_step.py --config sd2-256 --batch 64 --steps 10 "${UNET[@]}"
  guarded 50 python3 benchmarks/unet_step.py --config sd2-512 --batch 16 --steps 10 "${UNET[@]}"
fi
if want sd2_512; then
  echo "== SD2-base LDM stage training, 512^2 (4x64x64 latents), bf16, batch 16/GPU, ddp: plain, channels_last+fused+compile,"
  echo "   + checkpointing (goal: MFU >= 40%; this part at most 200 s, each run at most 170 s) [$(left) s left]"
  throughput 200 "${SD2[@]}" --side 512 --batch 16 --steps 15 --warmup 3 --timeout 170 \
    --strategy ddp --switches plain channels_last+fused+compile channels_last+fused+compile+checkpointing
fi
if want unet_compile; then
  echo "== the same, both models' blocks compiled (each call compiles two UNets) [$(left) s left]"
  guarded 240 python3 benchmarks/unet_step.py --config sd2-256 --batch 64 --steps 10 --compile blocks "${UNET[@]}"
  guarded 240 python3 benchmarks/unet_step.py --config sd2-512 --batch 16 --steps 10 --compile blocks "${UNET[@]}"
fi
if want deepspeed; then
  echo "== SD2-base at 256^2, batch 64, DeepSpeed ZeRO-1/2/3 (offload variants dropped, see the top) [$(left) s left]"
  throughput 150 "${SD2[@]}" --side 256 --batch 64 --steps 10 --warmup 3 --timeout 70 \
    --strategy deepspeed_stage_1 deepspeed_stage_2 deepspeed_stage_3 --tag "ZeRO sweep"
fi
if want extras; then
  echo "== UNet train step vs diffusers, tiny [$(left) s left]"
  guarded 40 python3 benchmarks/unet_step.py --config tiny --device cuda --dtype bf16 --batch 256 --steps 20 --json "$OUT/results"
  echo "== Efficient U-Net vs plain at equal parameters (SR, 256px)"
  guarded 60 python3 benchmarks/efficient_unet.py --device cuda --dtype bf16 --side 256 --batch 32 --channels 128 --steps 10 --json "$OUT/results"
  echo "== sampler"
  guarded 60 python3 benchmarks/sampler.py --device cuda --batch 64 --json "$OUT/results"
fi
echo "== report of this run's records: $OUT/performance.md ($((END - SECONDS)) s before the deadline)"
python3 benchmarks/report.py write --results "$OUT/results" --out "$OUT/performance.md"
