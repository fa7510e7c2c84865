"""The Hydra ``_target_``s that a config read from a file (a stage export's ``config.yaml``, a run's config
trained again) may name: an explicit list, and nothing else.

A config may come from anywhere, and instantiating a node calls what it names with the arguments it gives.
A prefix rule (anything under ``t2i.`` or ``torch.``) admits constructors with side effects: tensorboard's
``torch.utils.tensorboard.SummaryWriter(log_dir=...)`` creates folders and files. So each allowed name is
listed: t2i's networks, conditioning, stages and schedules, and the optimizers they are trained with
(`MODEL_TARGETS`, what a stage export's ``model`` section holds), plus the data module, trainer parts,
callbacks and loggers of a training run (`RUN_TARGETS`). `check_targets` checks a config against a list
without importing or calling anything.

A model of your own is allowed with `allow` (e.g. ``allow("mypackage.nets.MyUNet")``, run by your own code
before it loads its exports).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_TARGETS: set[str] = {
    # networks
    "t2i.nn.autoencoder.AutoencoderKL",
    "t2i.nn.discriminator.PatchDiscriminator",
    "t2i.nn.embedding_scale.EmbeddingScale",
    "t2i.nn.image_embedding_unet.ImageEmbeddingUNet",
    "t2i.nn.noise_level_unet.NoiseLevelUNet",
    "t2i.nn.noisy_classifier.NoisyImageClassifier",
    "t2i.nn.prior.PriorTransformer",
    "t2i.nn.unet.UNet",
    "t2i.losses.lpips.LPIPS.from_files",
    # conditioning
    "t2i.conditioning.dropout.CondDropout",
    "t2i.conditioning.lowres.LowResDegradation",
    "t2i.conditioning.text.OpenClipTextEncoder",
    "t2i.conditioning.text.OpenClipTextEncoder.from_clip_export",
    "t2i.conditioning.text.OpenClipTextEncoder.from_config",
    # label functions (caption -> labels) of a noisy classifier
    "t2i.data.shapes.caption_attributes",
    # stages and their schedules
    "t2i.stages.autoencoder.AutoencoderStage",
    "t2i.stages.clip.ClipStage",
    "t2i.stages.diffusion.DiffusionStage",
    "t2i.stages.noisy_classifier.NoisyClassifierStage",
    # the diffusion stage's parts
    "t2i.diffusion.objective.DiffusionObjective",
    "t2i.stages.targets.Pixels",
    "t2i.stages.targets.VaeLatents",
    "t2i.stages.targets.ClipImageEmbedding",
    "t2i.stages.conditioners.Text",
    "t2i.stages.conditioners.ClipText",
    "t2i.stages.conditioners.ClipImage",
    "t2i.stages.conditioners.LowRes",
    "t2i.stages.previews.PromptGrid",
    "t2i.stages.previews.DecoderGrid",
    "t2i.stages.previews.UpsamplerGrid",
    "t2i.stages.previews.EmbeddingCosine",
    "t2i.stages.lr.warmup_constant",
    "t2i.stages.lr.warmup_cosine",
    # optimizers (DeepSpeedCPUAdam: docs/scaling.md, for ZeRO offload)
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "deepspeed.ops.adam.DeepSpeedCPUAdam",
}

RUN_TARGETS: set[str] = {
    "t2i.data.datamodule.ShardDataModule",
    "t2i.callbacks.data_stats.DataStatsLogger",
    "t2i.callbacks.nonfinite.NonFiniteGuard",
    "t2i.callbacks.preemption.PreemptionCheckpoint",
    "t2i.callbacks.sample_metrics.SampleMetrics",
    "t2i.callbacks.throughput.Throughput",
    "t2i.cli.loggers.tensorboard_or_csv",
    "t2i.distributed.deepspeed.AtomicDeepSpeedStrategy",
    "t2i.distributed.fsdp.FSDP2Strategy",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.strategies.DDPStrategy",
}


class TargetError(RuntimeError):
    """A config names a ``_target_`` that is not on the list (or hides one in an interpolation)."""


def allow(*names: str, run_only: bool = False) -> None:
    """Add targets of your own to the list: to `MODEL_TARGETS` (what exports may build), or with ``run_only``
    to `RUN_TARGETS`."""
    (RUN_TARGETS if run_only else MODEL_TARGETS).update(names)


def check_targets(config: Any, source: str | Path, allowed: set[str] | frozenset[str],
                  path: str = "") -> list[tuple[str, str]]:
    """Raise `TargetError` (naming `source`, the key path and the target) when `config` names a ``_target_``
    outside `allowed` anywhere - nested, in lists, ``_partial_`` or not - or holds a ``${...}`` interpolation
    (a resolver could create a node no check saw); else return every (key path, target) it names. Imports
    nothing, calls nothing. ``path``: where `config` sits in its file (for messages)."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    if not (isinstance(value, str) and value in allowed):
                        raise TargetError(
                            f"{source}: refusing to build {where}={value!r}: not one of the classes and functions "
                            f"a t2i config may name (t2i.allowed_targets; allow a model of your own with "
                            f"t2i.allowed_targets.allow). Is this file from a source you trust?")
                    found.append((where, value))
                walk(value, where)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str) and "${" in node:
            raise TargetError(f"{source}: refusing {path}={node!r}: a config read from a file must be resolved, "
                              f"without ${{...}} interpolations (one could create a target no check saw)")

    walk(config, path)
    return found


def check_run_config(config: dict, source: str | Path) -> None:
    """A whole training config read from a file (to train it again): its ``model`` section may name only
    `MODEL_TARGETS`, the rest `MODEL_TARGETS` and `RUN_TARGETS`."""
    check_targets({"model": config.get("model")}, source, MODEL_TARGETS)
    check_targets({k: v for k, v in config.items() if k != "model"}, source, MODEL_TARGETS | RUN_TARGETS)
