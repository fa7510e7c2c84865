"""Helpers shared by the tests (importable as `t2i_testing`; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

from t2i.data.manifest import ShardInfo, write_manifest
from t2i.data.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec
from t2i.exports import read_export as _read_export

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
            "data.min_samples_for_check=100000", f"model.target.export={vae_export}",
            "model.denoiser.model_channels=16", "model.denoiser.num_head_channels=8", "model.denoiser.num_groups=4",
            "model.text_encoder.width=32", "model.text_encoder.output_dim=32", "model.text_encoder.heads=2",
            "model.sample_prompts=[]", "model.sampler.steps=3", "trainer.limit_val_batches=2", "logger=csv", *extra]


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


# ---- training runs in a subprocess (pre-emption and crash tests) -------------------------------------------------

class TrainProcess:
    """``python -m t2i.cli.train <overrides>`` in a subprocess (one intra-op thread), its output in a file that the
    test polls: progress is read from the progress bar (``Epoch 0:  10%|...| 3/30``; a resumed run's bar reads
    ``Training: |...| 5/?`` and counts from the restored step), never guessed with sleeps."""

    PROGRESS = re.compile(r"(?:Epoch \d+|Training):[^|\r\n]*\|[^|\r\n]*\| *(\d+)/")  # fresh or resumed run

    def __init__(self, overrides: list[str], log_path: Path, command: list[str] | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = Path(log_path)
        command = command or [sys.executable, "-m", "t2i.cli.train"]
        with open(self.log_path, "wb") as log:  # the child holds its own descriptor
            self.proc = subprocess.Popen([*command, *overrides], cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def progress(self) -> int:
        """The last batch count the progress bar showed; -1 before training started."""
        found = self.PROGRESS.findall(self.output())
        return int(found[-1]) if found else -1

    def wait_for_progress(self, at_least: int = 0, timeout: float = 180.0) -> int:
        """Poll until the progress bar shows `at_least` batches (0: training has started); the count seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = self.progress()
            if n >= at_least:
                return n
            if self.proc.poll() is not None:
                raise AssertionError(f"the run exited ({self.proc.returncode}) before batch {at_least}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"no batch {at_least} within {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the run did not exit within {timeout:.0f}s:\n{self.output()[-4000:]}") from None


def load_checkpoint(path: Path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict, atol: float = 1e-6, skip: tuple[str, ...] = ()) -> None:
    """Two Lightning checkpoints hold the same training state: step, weights (EMA included, unless `skip` names
    the prefix of its keys), optimizer moments and hyperparameters, LR schedulers, every rank's random states and
    the data position."""
    import torch
    assert a["global_step"] == b["global_step"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        if skip and k.startswith(skip):
            continue
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert len(a["optimizer_states"]) == len(b["optimizer_states"])
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        assert oa["state"].keys() == ob["state"].keys()
        for i in oa["state"]:
            for name, v in oa["state"][i].items():
                torch.testing.assert_close(v, ob["state"][i][name], rtol=0, atol=atol,
                                           msg=lambda m, i=i, name=name: f"optimizer state {i}.{name}: {m}")
        assert oa["param_groups"] == ob["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    ra, rb = a["callbacks"]["RngStateCallback"]["per_rank"], b["callbacks"]["RngStateCallback"]["per_rank"]
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        torch.testing.assert_close(x["torch"], y["torch"], rtol=0, atol=0)
        assert x["python"][0] == y["python"][0] and x["python"][2] == y["python"][2]
        assert torch.equal(x["python"][1], y["python"][1]), "python random state differs"
        assert x["numpy"][0] == y["numpy"][0] and x["numpy"][2:] == y["numpy"][2:]
        assert torch.equal(x["numpy"][1], y["numpy"][1]), "numpy random state differs"
    pa = a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert pa == b["loops"]["fit_loop"]["state_dict"]["combined_loader"]


class RecordStartStep(L.Callback):
    """``+callbacks.start._target_=t2i_testing.RecordStartStep +callbacks.start.path=FILE``: writes the global step
    that training started from (0, or the step a resume restored) to FILE."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(str(trainer.global_step))


class PoisonGradients(L.Callback):
    """``+callbacks.poison._target_=t2i_testing.PoisonGradients +callbacks.poison.steps=[1]``: one NaN in the first
    trainable parameter's gradient after the backward of those global steps (what a bad batch or an fp16
    overflow does), for the non-finite guard to find."""

    def __init__(self, steps: list[int], rank: int | None = None):
        self.steps, self.rank = set(steps), rank  # rank: poison on that rank only (its own shard under FSDP)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            grad = grad.to_local() if hasattr(grad, "to_local") else grad
            grad.view(-1)[0] = float("nan")


# DeepSpeed ZeRO-3 on the CPU with every parameter sharded (global recipe overrides; needs DS_ACCELERATOR=cpu)
ZERO3_CPU_OVERRIDES = ("strategy=deepspeed_stage_3", "strategy.pin_memory=false",
                       "+strategy.param_persistence_threshold=0", "trainer.precision=32-true")


def recipe_strategy_overrides(strategy: str, monkeypatch) -> list[str]:
    """Global recipe overrides that train every stage under `strategy` ("default" or "zero3_cpu")."""
    if strategy == "default":
        return []
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return list(ZERO3_CPU_OVERRIDES)


# ---- the tiny unCLIP stages (prior, decoder, upsampler) on CLIP-embedded small shapes shards ----
def clip_dims(clip) -> tuple[int, int]:
    export = _read_export(clip)
    return int(export.metrics["embed_dim"]), int(export.config["model"]["clip_config"]["text_cfg"]["width"])


def _common(run_dir, shards, clip, *extra):
    return [f"run_dir={run_dir}", f"data.train_manifest={shards}/train", f"data.val_manifest={shards}/val",
            "data.batch_size=8", "data.num_workers=0", "data.min_samples_for_check=100000", "logger=csv",
            f"model.text_encoder.export_dir={clip}", "trainer.limit_val_batches=2", *extra]


def prior_overrides(run_dir, shards, clip, *extra):
    embed, width = clip_dims(clip)
    return ["experiment=tiny/prior", *_common(run_dir, shards, clip), f"model.denoiser.embed_dim={embed}",
            f"model.denoiser.text_width={width}", "model.denoiser.width=32", "model.denoiser.layers=1",
            "model.denoiser.heads=2", "model.sampler.steps=3", "model.preview.batches=1", *extra]


def decoder_overrides(run_dir, shards, clip, *extra):
    embed, width = clip_dims(clip)
    return ["experiment=tiny/decoder", *_common(run_dir, shards, clip), f"model.denoiser.embed_dim={embed}",
            f"model.denoiser.text_width={width}", "model.denoiser.unet.model_channels=16",
            "model.denoiser.unet.num_head_channels=8", "model.denoiser.unet.num_groups=4",
            "model.denoiser.unet.context_dim=16", "model.sampler.steps=3", *extra]


def upsampler_overrides(run_dir, shapes, *extra):
    return ["experiment=tiny/upsampler", f"run_dir={run_dir}", f"data.train_manifest={shapes}/train",
            f"data.val_manifest={shapes}/val", "data.batch_size=8", "data.num_workers=0",
            "data.min_samples_for_check=100000", "logger=csv", "trainer.limit_val_batches=2",
            "model.denoiser.unet.model_channels=8", "model.denoiser.unet.num_head_channels=8",
            "model.denoiser.unet.num_groups=4", "model.sampler.steps=3", *extra]


# ---- the tiny Imagen / GLIDE cascade stages and the noisy classifier on small shapes (or text-state) shards ----
def _small(run_dir, train_shards, *extra):
    return [f"run_dir={run_dir}", f"data.train_manifest={train_shards}/train", f"data.val_manifest={train_shards}/val",
            "data.batch_size=8", "data.num_workers=0", "data.min_samples_for_check=100000", "logger=csv",
            "trainer.limit_val_batches=2", "model.sampler.steps=2", *extra]


def base_overrides(kind, run_dir, shards, clip, *extra):
    text = ([f"model.text_encoder.export_dir={clip}"] if kind == "imagen"
            else ["model.text_encoder.width=32", "model.text_encoder.layers=1", "model.text_encoder.output_dim=32"])
    return [f"experiment=tiny/{kind}_base", *_small(run_dir, shards), *text, "model.denoiser.model_channels=16",
            "model.denoiser.num_head_channels=8", "model.denoiser.num_groups=4", "model.denoiser.context_dim=32",
            "model.denoiser.vector_dim=32", *extra]


def sr_overrides(kind, run_dir, shards, clip, *extra):
    text = ([f"model.text_encoder.export_dir={clip}"] if kind == "imagen"
            else ["model.text_encoder.width=32", "model.text_encoder.layers=1", "model.text_encoder.output_dim=32"])
    return [f"experiment=tiny/{kind}_sr", *_small(run_dir, shards), *text, "model.denoiser.unet.model_channels=8",
            "model.denoiser.unet.num_head_channels=8", "model.denoiser.unet.num_groups=4",
            "model.denoiser.unet.context_dim=32", *extra]


def classifier_overrides(shapes, run_dir, *extra):
    return ["experiment=tiny/noisy_classifier", f"run_dir={run_dir}", f"data.train_manifest={shapes}/train",
            f"data.val_manifest={shapes}/val", "data.batch_size=8", "data.num_workers=0",
            "data.min_samples_for_check=100000", "logger=csv", "trainer.limit_val_batches=2",
            "model.classifier.model_channels=8", "model.classifier.num_groups=4", *extra]


def all_specs() -> list[ShapeSpec]:
    """Every attribute combination of the shapes dataset (972), without jitter."""
    return [ShapeSpec(sh, c, sz, p, b) for sh in SHAPES for c in COLORS for sz in SIZES
            for p in POSITIONS for b in BACKGROUNDS]


def assert_same_run_end(run: Path, reference: Path, steps: int, atol: float = 1e-6) -> None:
    """Two runs' last checkpoints (files, ZeRO or distributed-checkpoint folders) hold the same step, weights and
    EMA (the EMA having moved), and no temporary checkpoint folder is left behind."""
    import torch

    from t2i.cli.export import checkpoint_state
    ours, step = checkpoint_state(run / "checkpoints" / "last.ckpt")
    ref, ref_step = checkpoint_state(reference / "checkpoints" / "last.ckpt")
    assert step == ref_step == steps
    assert set(ours) == set(ref)
    for part in ("net.", "ema."):
        keys = [k for k in ref if k.startswith(part)]
        assert keys
        for k in keys:
            torch.testing.assert_close(ours[k].float(), ref[k].float(), rtol=0, atol=atol, msg=k)
    moved = max((ref[k] - ref["net." + k.removeprefix("ema.module.")]).abs().max().item()
                for k in ref if k.startswith("ema.module.") and ref[k].is_floating_point())
    assert moved > 1e-7, "the EMA equals the raw weights: the test would not see a missing EMA update"
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, f"temporary checkpoint directories left behind: {leftovers}"


def assert_export_holds_the_ema(run: Path, reference: Path, tmp_path: Path, atol: float = 1e-6) -> None:
    """The export written after sharded training holds `reference`'s EMA weights, and `t2i.cli.export` converts
    the run's checkpoint folder to the same export again, from the run folder alone."""
    import torch
    from safetensors.torch import load_file

    from t2i.cli.export import checkpoint_state
    exported = load_file(run / "export" / "model.safetensors")
    ref, _ = checkpoint_state(reference / "checkpoints" / "last.ckpt")
    assert exported and all(f"ema.module.{k}" in ref for k in exported)
    for k, v in exported.items():
        torch.testing.assert_close(v, ref[f"ema.module.{k}"], rtol=0, atol=atol, msg=k)
    proc = subprocess.run([sys.executable, "-m", "t2i.cli.export", f"run_dir={run}", f"out={tmp_path / 'again'}"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)
