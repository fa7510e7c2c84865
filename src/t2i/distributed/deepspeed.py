"""DeepSpeed ZeRO under Lightning, with checkpoints that a crash cannot corrupt, and the conversion of a ZeRO
checkpoint directory into one flat state dict (what `t2i.cli.export` and exports after sharded training use).

A ZeRO checkpoint is a directory (one shard file per rank for stage 3). Lightning's `DeepSpeedStrategy` writes
it in place, so a crash while saving leaves a half-written ``last.ckpt/``. Here every rank writes into
``<path>.tmp/``; after a barrier rank 0 fsyncs it and puts it in place, the previous one becoming
``<path>.prev/`` (`t2i.checkpoint_files.replace_keeping_previous`): ``last.ckpt`` or ``last.ckpt.prev`` is a
complete checkpoint at every instant, and a resume takes ``.prev`` when ``last.ckpt`` is damaged.

DeepSpeed is imported lazily: exports, pipelines and CPU training never need it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from t2i.checkpoint_files import (
    is_zero_checkpoint,
)
from t2i.distributed.sharded_checkpoint import remove_folder_checkpoint, save_folder_atomically

log = logging.getLogger("t2i.deepspeed")


class AutocastDeepSpeedPrecision(DeepSpeedPrecision):
    """bf16 autocast over fp32 weights inside the DeepSpeed engine: the numerics of ``bf16-mixed`` under DDP.

    DeepSpeed's own bf16 mode casts the whole module to bf16, including buffers and frozen parts: the noise
    schedule (ᾱ near 1 keeps ~3 significant digits in bf16), the frozen VAE and text encoder (whose fp32 inputs
    then mismatch) and the EMA (an update of weight 1e-4 vanishes in bf16). Here the engine runs in fp32 (its
    config has no ``bf16`` section) and the forward runs under ``torch.autocast(bfloat16)``; ZeRO shards fp32
    gradients and optimizer states.
    """

    def __init__(self) -> None:
        super().__init__("32-true")
        self.autocast_dtype = torch.bfloat16

    def forward_context(self):
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` whose checkpoint directories are written to a temporary name and swapped in, with
    ``precision=bf16-mixed`` meaning bf16 autocast over fp32 weights (`AutocastDeepSpeedPrecision`).

    ``param_persistence_threshold`` (ZeRO-3): parameters with at most this many elements stay whole on every
    rank instead of being gathered for each use (DeepSpeed's default 1e5; 0 shards everything).
    """

    def __init__(self, *args, param_persistence_threshold: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if kwargs.get("offload_optimizer") or kwargs.get("offload_parameters"):
            # the stage's own optimizer (torch AdamW) steps the offloaded fp32 states on the CPU; DeepSpeed would
            # otherwise insist on its compiled DeepSpeedCPUAdam (faster: set model.optimizer._target_ to
            # deepspeed.ops.adam.DeepSpeedCPUAdam where its extension builds)
            self.config["zero_force_ds_cpu_optimizer"] = False
        if param_persistence_threshold is not None:
            if param_persistence_threshold < 0:
                raise ValueError(f"param_persistence_threshold must be >= 0, got {param_persistence_threshold}")
            self.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = int(
                param_persistence_threshold)

    @property
    def precision_plugin(self):
        return DeepSpeedStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if isinstance(plugin, DeepSpeedPrecision) and plugin.precision == "bf16-mixed":
            plugin = AutocastDeepSpeedPrecision()
        elif isinstance(plugin, DeepSpeedPrecision) and plugin.precision not in ("32-true", "32"):
            raise ValueError(f"t2i's DeepSpeed strategies train with precision bf16-mixed (autocast over fp32 "
                             f"weights) or 32-true, got {plugin.precision!r}: DeepSpeed's half-precision modes "
                             f"would cast the noise schedule, frozen parts and the EMA")
        DeepSpeedStrategy.precision_plugin.fset(self, plugin)

    def _setup_model_and_optimizer(self, model, *args, **kwargs):
        if self.zero_stage_3:
            register_external_parameters(model)
        with _broadcastable_scalar_parameters():
            return super()._setup_model_and_optimizer(model, *args, **kwargs)

    def setup_environment(self) -> None:
        """Lightning refuses DeepSpeed without CUDA. DeepSpeed itself runs on the CPU (its CPU accelerator, gloo),
        which is how the tests exercise ZeRO on machines without a GPU; that needs the CPU accelerator chosen
        explicitly (``DS_ACCELERATOR=cpu``), so that a GPU job never falls back to the CPU by accident."""
        if self._on_cpu():
            if os.environ.get("DS_ACCELERATOR") != "cpu":
                raise RuntimeError("DeepSpeed strategies need CUDA GPUs; to run ZeRO on the CPU (tests, debugging) "
                                   "set DS_ACCELERATOR=cpu and trainer.accelerator=cpu")
            DDPStrategy.setup_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if self._on_cpu():  # Lightning's device-index check assumes CUDA devices
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # DeepSpeed reads the device index as its rank on the node; a CPU device has none
        return torch.device("cpu", self.local_rank) if device.type == "cpu" else device

    def _on_cpu(self) -> bool:
        return self.accelerator is not None and self.accelerator.__class__.__name__ == "CPUAccelerator"

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        save_folder_atomically(self, filepath,
                               lambda tmp: super(AtomicDeepSpeedStrategy, self).save_checkpoint(checkpoint, tmp, storage_options))

    def remove_checkpoint(self, filepath) -> None:
        remove_folder_checkpoint(self, filepath)


def register_external_parameters(model: torch.nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters when its forward runs. A module that reads parameters of its
    children directly (not by calling them) lists them in ``zero3_external_parameters()``; they are registered
    with DeepSpeed so that they are gathered for its forward too. `nn.MultiheadAttention` is one such module
    (it reads ``out_proj.weight`` without calling ``out_proj``; open_clip's towers use it). Returns how many
    were registered."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    count = 0
    for module in model.modules():
        params = list(getattr(module, "zero3_external_parameters", list)())
        if isinstance(module, torch.nn.MultiheadAttention):
            params += list(module.out_proj.parameters())
        for param in params:
            register_external_parameter(module, param)
            count += 1
    return count


@contextlib.contextmanager
def _broadcastable_scalar_parameters():
    """DeepSpeed broadcasts rank 0's parameters as bytes with ``p.data.view(torch.uint8)``, which fails for a 0-dim
    parameter (CLIP's ``logit_scale``), both when the engine starts (`DeepSpeedEngine._broadcast_model`) and when
    ZeRO-3 partitions parameters (`Init._zero_init_param`). Inside this context both broadcast a flat view of
    the same storage instead (``p.data.reshape(-1)``, identical bytes); nothing else changes."""
    import deepspeed.comm as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    original_broadcast_model, original_zero_init_param = DeepSpeedEngine._broadcast_model, Init._zero_init_param

    def broadcast_model(engine) -> None:
        scalars = [p for p in engine.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original_broadcast_model(engine)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    def zero_init_param(init, param) -> None:
        if param.dim() != 0:
            return original_zero_init_param(init, param)
        init._convert_to_deepspeed_param(param)
        group = init.get_partition_dp_group(param)
        src = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(-1).view(torch.uint8), src, group)
        param.partition()

    DeepSpeedEngine._broadcast_model, Init._zero_init_param = broadcast_model, zero_init_param
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = original_broadcast_model, original_zero_init_param


def zero_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 ``state_dict`` of the LightningModule in a ZeRO checkpoint directory, on the CPU, without
    GPUs or a process group; frozen parameters (the EMA, frozen encoders) included.

    Stages 1 and 2 keep whole parameters on every rank, and rank 0's model-states file holds the module's whole
    state dict (fp32: t2i's engines run fp32 weights under autocast). Stage 3 shards parameters, so they are
    gathered from every rank's files with DeepSpeed's `zero_to_fp32`.
    """
    path = Path(path)
    if not is_zero_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a DeepSpeed checkpoint directory (no 'latest' file inside)")
    state = zero_client_state(path)
    module = state.get("module")
    sharded = not module or any(t.numel() == 0 for t in module.values() if isinstance(t, torch.Tensor))
    if not sharded:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        tag = (path / "latest").read_text().strip()
        with _weights_only_torch_load():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=False)
    prefix = "_forward_module."  # Lightning's wrapper inside the DeepSpeed engine
    return {(k.removeprefix(prefix)): v for k, v in sd.items()}


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's converter unpickles its files with full pickle loading; a checkpoint a user points us at must
    not run code, so every load inside is forced to ``weights_only=True`` (the files hold tensors and plain
    containers, plus DeepSpeed's ZeRO stage enum and loss-scaler records, which are allow-listed)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def zero_client_state(path: str | Path) -> dict:
    """The Lightning checkpoint fields (global_step, loops, callbacks, our metadata) of a ZeRO checkpoint: rank
    0's model-states file, read with ``weights_only=True``."""
    path = Path(path)
    tag = (path / "latest").read_text().strip()
    files = sorted((path / tag).glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{path / tag}: no model-states file")
    return torch.load(files[0], map_location="cpu", weights_only=True)
