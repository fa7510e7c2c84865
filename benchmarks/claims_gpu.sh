#!/usr/bin/env bash
# docs/claims.md on one GPU, in one call of the device tool: the tiny recipes' stages (their evaluation
# steps skipped) with every training stage on the GPU in bf16, then benchmarks/claims.py --device cuda.
# On a 2-core CPU the same takes hours (AVX2-only hosts train in fp32); on a GPU it should take minutes: time it
# with CLAIMS_BUDGET_S (the script stops starting new work past it). Carry the wheels the device image lacks in
# .whl/ (see benchmarks/README.md). Results: $OUT/claims.md, $OUT/claims.json, $OUT/images/claims_*.png
# (copy them into docs/), and each recipe's log in $OUT/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/claims_gpu}; mkdir -p "$OUT/logs"
BUDGET=${CLAIMS_BUDGET_S:-480}
START=$(date +%s)
GPU=(trainer.accelerator=gpu trainer.devices=1 trainer.precision=bf16-mixed data.num_workers=6)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run_recipe() {  # recipe, then its step names in order (the evaluate step left out)
  local recipe=$1; shift
  for step in "$@"; do
    if (( $(date +%s) - START > BUDGET )); then echo "budget spent before $recipe:$step"; return 1; fi
    local t=$(date +%s)
    python3 -m t2i.cli.recipe "recipes/$recipe.yaml" --only "$step" "${GPU[@]}" >> "$OUT/logs/$recipe.log" 2>&1 \
      || { echo "$recipe:$step failed (tail of $OUT/logs/$recipe.log):"; tail -20 "$OUT/logs/$recipe.log"; return 1; }
    echo "$recipe:$step $(( $(date +%s) - t )) s"
  done
}
run_recipe ldm data vae latents_train latents_val ldm || exit 1
ONLY=(ddim_ddpm cfg latent_pixel)
if run_recipe imagen clip text_train text_val base sr classifier; then
  ONLY+=(thresholding noise_augmentation classifier_vs_cfg)
  run_recipe unclip embed_train embed_val prior decoder && ONLY+=(unclip_prior)
  run_recipe glide base && ONLY+=(frozen_vs_joint)
fi
echo "== claims: ${ONLY[*]}"
PLOTS=(); python3 -c "import matplotlib" 2>/dev/null || PLOTS=(--no-plots)  # then: claims.py --replot here
python3 benchmarks/claims.py "${PLOTS[@]}" --device cuda --prompts 300 --minutes "${LATENT_PIXEL_MINUTES:-1}" --only "${ONLY[@]}" --out "$OUT/claims.md" \
  2>&1 | grep -E "^\[claims\]|Error|error" | tail -20
echo "total $(( $(date +%s) - START )) s"
