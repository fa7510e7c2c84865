#!/bin/bash
# The same job without SLURM: torchrun on each node (Lightning reads torchrun's RANK / LOCAL_RANK / WORLD_SIZE).
# On node i of N:  NODE_RANK=i MASTER_ADDR=<node 0> bash examples/slurm/train_ldm_torchrun.sh
# Send SIGTERM to stop cleanly: t2i writes last.ckpt at the next step boundary; rerun to resume.
set -euo pipefail
torchrun --nnodes="${NNODES:-4}" --nproc-per-node=8 --node-rank="${NODE_RANK:?}" \
    --master-addr="${MASTER_ADDR:?}" --master-port="${MASTER_PORT:-29500}" \
    -m t2i.cli.train experiment=ldm/ldm \
    data.train_manifest=/data/laion/shards/train data.val_manifest=/data/laion/shards/val \
    model.target.export=runs/ldm-vae/export model.text_encoder.checkpoint_path=/weights/open_clip_vit_h14.bin \
    trainer.num_nodes="${NNODES:-4}" trainer.devices=8 strategy=deepspeed_stage_2 global_batch_size=2048 ckpt_path=last
