"""Helpers shared by the tests (importable as `t2i_testing`; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from t2i.data.manifest import ShardInfo, write_manifest

REPO = Path(__file__).resolve().parents[1]


def png_bytes(value: int, size: int = 8, mode: str = "RGB") -> bytes:
    arr = np.full((size, size, 3), value % 256, dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, fields in samples:
            for name, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shard_set(folder: Path, sizes: list[int], image_size: int = 8) -> Path:
    """Shards with the given sample counts; sample key ``s{shard}x{i}`` with caption = key and an
    image whose pixel value encodes its global index."""
    folder.mkdir(parents=True, exist_ok=True)
    infos, g = [], 0
    for s, n in enumerate(sizes):
        samples = []
        for i in range(n):
            key = f"s{s:03d}x{i:05d}"
            samples.append((key, {"png": png_bytes(g, image_size), "txt": key.encode()}))
            g += 1
        path = folder / f"shard-{s:06d}.tar"
        write_tar(path, samples)
        infos.append(ShardInfo(str(path), n))
    return write_manifest(folder, infos)


def load_data_prep(name: str):
    """data_prep/ holds scripts, not a package: import one from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", REPO / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(shapes: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make the tiny VAE experiment run in seconds on a small shapes set."""
    return ["experiment=tiny/vae", f"run_dir={run_dir}", f"data.train_manifest={shapes}/train",
            f"data.val_manifest={shapes}/val", "data.batch_size=8", "data.num_workers=0",
            "data.min_samples_for_check=100000", "model.autoencoder.base_channels=8",
            "model.autoencoder.num_groups=4", "trainer.limit_val_batches=2", "logger=csv", *extra]


def tiny_ldm_overrides(shapes: Path, vae_export: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides that make the tiny LDM experiment run in seconds."""
    return ["experiment=tiny/ldm", f"run_dir={run_dir}", f"data.train_manifest={shapes}/train",
            f"data.val_manifest={shapes}/val", "data.batch_size=8", "data.num_workers=0",
            "data.min_samples_for_check=100000", f"model.first_stage_export={vae_export}",
            "model.denoiser.model_channels=16", "model.denoiser.num_head_channels=8", "model.denoiser.num_groups=4",
            "model.text_encoder.width=32", "model.text_encoder.output_dim=32", "model.text_encoder.heads=2",
            "model.denoiser.context_dim=32", "model.cond_dropout.context_dim=32", "model.sample_prompts=[]",
            "model.sampler.steps=3", "trainer.limit_val_batches=2", "logger=csv", *extra]


TINY_CLIP_CONFIG = ("{embed_dim:32,quick_gelu:false,"
                    "vision_cfg:{image_size:32,patch_size:8,width:32,layers:1,head_width:16,mlp_ratio:2.0},"
                    "text_cfg:{context_length:24,vocab_size:49408,width:32,heads:2,layers:1,mlp_ratio:2.0}}")


def tiny_clip_overrides(shapes: Path, run_dir: Path, *extra: str, experiment: str = "tiny/clip") -> list[str]:
    """Overrides that make a CLIP experiment (tiny/clip, or clip/pretrained) run in seconds on a small
    shapes set: a 1-layer, 32-wide CLIP (embed_dim 32) on 32px images."""
    return [f"experiment={experiment}", f"run_dir={run_dir}", f"data.train_manifest={shapes}/train",
            f"data.val_manifest={shapes}/val", "data.resolution=32", "data.batch_size=16", "data.num_workers=0",
            "data.pin_memory=false", "data.min_samples_for_check=100000", "model.arch=null",
            f"model.clip_config={TINY_CLIP_CONFIG}", "trainer.limit_val_batches=2", "logger=csv", *extra]


# a recipe's training stages at toy size (slow end-to-end recipe tests)
TOY_STAGE_OVERRIDES = ("data.batch_size=8", "data.num_workers=0", "data.min_samples_for_check=100000", "logger=csv",
                       "trainer.max_steps=2", "trainer.limit_val_batches=1", "final_validation=false")


def load_toy_recipe(name: str) -> tuple[dict, dict]:
    """(recipe, its steps by name) of recipes/<name>.yaml, its data step replaced by a no-op (tests bring data)."""
    import yaml
    recipe = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())
    steps = {s["name"]: s for s in recipe["steps"]}
    steps["data"]["run"] = ["python", "-c", "print('data ready')"]
    return recipe, steps
