"""train_throughput's run setup: the Hydra overrides of one benchmark run (the composition `python -m
t2i.cli.train` would do) and its synthetic inputs (shards with precomputed latents and text states, a tiny random
VAE export, random text-tower weights)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

CAPTION_WORDS = ("a", "small", "large", "red", "blue", "green", "circle", "square", "triangle", "in", "the",
                 "top", "left", "center", "on", "white", "black", "background")


# ---- configs ------------------------------------------------------------------------------------------------
def latent_side(config: str) -> int:
    return 32 if config == "sd" else 8


def overrides(args, work: Path, strategy: str) -> list[str]:
    """The Hydra overrides of one benchmark run (the same composition `python -m t2i.cli.train` would do)."""
    cuda = args.device.startswith("cuda")
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    common = [
        f"run_dir={work / 'runs' / strategy}", f"strategy={strategy}", "logger=csv", "callbacks.checkpoint=null",
        "export=false", "final_validation=false", f"data.train_manifest={work / 'data'}", "data.val_manifest=null",
        "data.resolution=0", f"data.batch_size={args.batch}", f"data.num_workers={args.workers}",
        f"data.pin_memory={str(cuda).lower()}", f"model.first_stage_export={work / 'vae'}",
        "model.latents_from=batch", "model.sample_every_n_steps=0", "model.sample_prompts=[]",
        f"trainer.accelerator={'gpu' if cuda else 'cpu'}", "trainer.devices=1", f"trainer.precision={precision}",
        f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
    ]
    if args.config == "tiny":
        specific = ["experiment=tiny/ldm", "data.array_fields=[latent.npy]"]
    else:
        heads = ([f"model.denoiser.num_head_channels={args.head_channels}"] if args.head_channels > 0
                 else ["model.denoiser.num_head_channels=-1", "model.denoiser.num_heads=8"])
        specific = ["experiment=ldm/ldm", "model.image_size=256",
                    "data.array_fields=[latent.npy,text_tokens.npy,text_mask.npy,text_pooled.npy]",
                    "model.text_encoder.arch=ViT-L-14", f"model.text_encoder.checkpoint_path={work / 'text.safetensors'}",
                    "model.text_encoder.layer=last", "model.text_encoder.context_length=77",
                    "model.denoiser.context_dim=768", "model.cond_dropout.context_dim=768", *heads]
    return [*specific, *common, *args.override]


def compose(args, work: Path, strategy: str, extra: tuple[str, ...] = ()):
    from t2i.cli.config import compose_config
    return compose_config([*overrides(args, work, strategy), *extra])


# ---- synthetic data -----------------------------------------------------------------------------------------
def write_vae_export(folder: Path, config: str) -> None:
    """A tiny random KL autoencoder export with 4 latent channels and the downsampling of the config's latents
    (tiny: 32px -> 8x8, f=4; sd: 256px -> 32x32, f=8): the stage loads it and checks the UNet's channels and the
    latents' shape against it, but never runs it when the latents come from the batch."""
    from t2i.exports import write_export
    from t2i.nn.autoencoder import AutoencoderKL
    node = {"_target_": "t2i.nn.autoencoder.AutoencoderKL", "in_channels": 3, "out_channels": 3, "base_channels": 8,
            "channel_mult": [1, 2, 2, 2] if config == "sd" else [1, 2, 2], "num_res_blocks": 1, "latent_channels": 4, "attn_in_mid": False,
            "num_groups": 4}
    vae = AutoencoderKL(**{k: v for k, v in node.items() if k != "_target_"})
    write_export(folder, "autoencoder", {f"autoencoder.{k}": v for k, v in vae.state_dict().items()},
                 {"model": {"autoencoder": node}}, metrics={"latent_scale": 0.18215})


def write_text_checkpoint(path: Path) -> None:
    """Random weights of the OpenCLIP ViT-L/14 text tower (SD 1.5's text width, 768) in a local file, for the
    frozen encoder of the sd config (its states are precomputed in the shards, so it never runs)."""
    from safetensors.torch import save_file

    from t2i.conditioning.text import OpenClipTextEncoder
    tower, _ = OpenClipTextEncoder._build_tower("ViT-L-14", False)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tower.state_dict().items()}, str(path))


def write_shards(folder: Path, config: str, n: int, shard_size: int = 64) -> None:
    """``n`` samples with a caption and a precomputed ``latent.npy`` (4 x side x side, float16); sd: plus the
    precomputed text states of a 768-wide encoder (77 tokens, all real, as SD conditions on all 77)."""
    import numpy as np

    from t2i.data.derived import npy_bytes, write_tar_atomic
    from t2i.data.manifest import ShardInfo, write_manifest
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side, infos = latent_side(config), []
    for s in range(math.ceil(n / shard_size)):
        samples = []
        for i in range(min(shard_size, n - s * shard_size)):
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 12))))
            fields = {"txt": caption.encode(),
                      "latent.npy": npy_bytes(rng.standard_normal((4, side, side), dtype=np.float32).astype(np.float16))}
            if config == "sd":
                fields["text_tokens.npy"] = npy_bytes(rng.standard_normal((77, 768), dtype=np.float32).astype(np.float16))
                fields["text_mask.npy"] = npy_bytes(np.ones(77, dtype=bool))
                fields["text_pooled.npy"] = npy_bytes(rng.standard_normal(768, dtype=np.float32))
            samples.append((f"s{s:04d}x{i:05d}", fields))
        path = folder / f"shard-{s:06d}.tar"
        write_tar_atomic(path, samples)
        infos.append(ShardInfo(str(path), len(samples)))
    write_manifest(folder, infos)


def prepare(args, work: Path) -> None:
    # one epoch holds every step: no loader restart inside the timed window
    write_shards(work / "data", args.config, args.batch * (args.warmup + args.steps + 2))
    write_vae_export(work / "vae", args.config)
    if args.config == "sd":
        write_text_checkpoint(work / "text.safetensors")
