"""Training throughput and model FLOPs utilisation, logged by every run: ``perf/images_per_sec``,
``perf/tflops_per_sec`` (the trained network's forward + backward), ``perf/frozen_tflops_per_sec`` (frozen
encoders: the VAE, a frozen text tower), ``perf/mfu`` and ``perf/peak_memory_gib`` (CUDA), per device.

FLOPs are counted, not estimated, once per input shape and off the training path: during the first batch of
each shape, global module hooks record the outermost calls into the LightningModule's submodules (the
denoiser, a text encoder, the VAE's encoder) with the shapes, dtypes and ``requires_grad`` of their inputs;
after the batch, each recorded module is cloned onto the meta device (no memory, no arithmetic) and run
under `torch.utils.flop_counter.FlopCounterMode` on meta inputs of those shapes, with a backward pass where
the live call built a graph through trainable parameters. Modules with trainable parameters make the
"trained network", the others the frozen encoders. Hooks that only read shapes leave the step's numerics
and random draws as they are (counting the live step instead would not: under a dispatch mode, convolution
gradients take another kernel), so a run is bitwise the same with or without this callback.

Speed is measured over windows of ``every`` batches (CUDA is synchronised only at window ends), restarted
after validation and after a counted batch. MFU is the trained network's FLOP/s over the device's peak: the
dense bf16/fp16 tensor-core peak for a 16-bit run, TF32 for a 32-bit one, looked up from the device name, or
``peak_tflops`` when given. On a CPU or an unknown GPU it is left out unless ``peak_tflops`` is given. A
module that cannot run on the meta device (data-dependent shapes) is left out of the count, with a warning.
Modules sharded by FSDP cannot be copied: under a strategy that shards parameters, the meta clones are made
before the model is sharded.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
import warnings

import lightning as L
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks in TFLOP/s: (16-bit, TF32), matched in order against the lower-cased
# device name; from the vendors' data sheets.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h100 pcie", 756.0, 378.0),
    ("h100 nvl", 835.0, 418.0),
    ("gh200", 989.0, 494.0),
    ("h200", 989.0, 494.0),
    ("h100", 989.0, 494.0),
    ("a100", 312.0, 156.0),
    ("l40s", 362.0, 183.0),
    ("l4", 121.0, 60.0),
    ("a10g", 70.0, 35.0),
    ("a10", 125.0, 62.5),
    ("rtx 4090", 165.0, 82.6),
    ("v100", 125.0, 15.7),  # fp16 tensor cores; no TF32: fp32 peak
)


def peak_tflops(device_name: str, sixteen_bit: bool) -> float | None:
    """The dense peak of a known device for 16-bit (bf16/fp16) or 32-bit (TF32) training, or None."""
    name = device_name.lower()
    for key, half, tf32 in PEAK_TFLOPS:
        if key in name:
            return half if sixteen_bit else tf32
    return None


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    shape: tuple
    dtype: torch.dtype
    requires_grad: bool


def _spec(value):
    """A call argument with each tensor replaced by its shape, dtype and requires_grad (nothing else kept)."""
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), value.dtype, value.requires_grad)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_spec(v) for v in value)
    if isinstance(value, dict):
        return {k: _spec(v) for k, v in value.items()}
    return value


def _meta(value, float_dtype: torch.dtype):
    """Meta tensors of the recorded specs; floating ones in the module's own dtype, because the live call may
    have run under autocast, which the meta device does not apply (the FLOPs do not depend on the dtype)."""
    if isinstance(value, _TensorSpec):
        dtype = float_dtype if value.dtype.is_floating_point else value.dtype
        return torch.empty(value.shape, dtype=dtype, device="meta", requires_grad=value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v, float_dtype) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v, float_dtype) for k, v in value.items()}
    return value


# modules that hold matrix products (the FLOPs counted); an outermost call without any (a dropout of
# conditioning, a normalisation) costs nothing worth counting and is not re-run
_COMPUTE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
            nn.MultiheadAttention, nn.Embedding)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors(getattr(value, f.name))


def _meta_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (their data is never copied)."""
    memo: dict[int, object] = {}
    for m in module.modules():  # the copy gets no hooks: DDP's, DeepSpeed's (ZeRO-3 gathers) are for training
        for name, value in vars(m).items():
            if name.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called")) and isinstance(value, dict):
                memo[id(value)] = type(value)()
    for t in itertools.chain(module.parameters(), module.buffers()):
        shape = tuple(getattr(t, "ds_shape", t.shape))  # a ZeRO-3 partition keeps its full shape there
        empty = torch.empty(shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(module, memo)


class _OutermostCalls:
    """Records the outermost calls into ``inside`` (a set of module ids) while active: (module, args, kwargs,
    grad mode), tensors kept as specs only."""

    def __init__(self, inside: set[int]):
        self.inside, self.calls, self._depth, self._handles = inside, [], 0, []

    def __enter__(self):
        def pre(module, args):
            if id(module) in self.inside:
                self._depth += 1

        def post(module, args, kwargs, output):
            if id(module) in self.inside:
                self._depth -= 1
                if self._depth == 0:
                    self.calls.append((module, _spec(args), _spec(kwargs), torch.is_grad_enabled()))

        self._handles = [register_module_forward_pre_hook(pre),
                         register_module_forward_hook(post, with_kwargs=True, always_call=True)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def count_flops(calls, clone_of=None) -> tuple[float, float]:
    """(trained, frozen) FLOPs of recorded calls, each re-run on a meta clone (backward where it had a graph).
    ``clone_of(module)`` gives a clone made before the module was sharded, where it cannot be copied now."""
    trained = frozen = 0.0
    for module, args, kwargs, grad in calls:
        if not any(isinstance(m, _COMPUTE) for m in module.modules()):
            continue
        trainable = any(p.requires_grad for p in module.parameters())
        float_dtype = next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), torch.float32)
        counter = FlopCounterMode(display=False)
        try:
            clone = (clone_of(module) if clone_of is not None else None) or _meta_clone(module)
            with counter, torch.set_grad_enabled(grad):
                out = clone(*_meta(args, float_dtype), **_meta(kwargs, float_dtype))
                ends = [t for t in _tensors(out) if t.requires_grad]
                if grad and trainable and ends:
                    torch.autograd.backward(ends, [torch.empty_like(t) for t in ends])
        except Exception as e:  # noqa: BLE001 - a module the meta device cannot run is left out, said once
            warnings.warn(f"Throughput: cannot count the FLOPs of {type(module).__name__} on the meta device "
                          f"({type(e).__name__}: {e}); perf/tflops_per_sec leaves it out", stacklevel=2)
            continue
        if trainable:
            trained += counter.get_total_flops()
        else:
            frozen += counter.get_total_flops()
    return float(trained), float(frozen)


def _shape_key(batch) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (tuple(batch.shape),)
    if isinstance(batch, dict):
        return tuple((k, _shape_key(v)) for k, v in sorted(batch.items()) if isinstance(v, (torch.Tensor, dict)))
    if isinstance(batch, (list, tuple)):
        return tuple(_shape_key(v) for v in batch if isinstance(v, (torch.Tensor, dict, list, tuple)))
    return ()


def _images(pl_module: L.LightningModule, batch) -> int:
    count = getattr(pl_module, "batch_size", None)
    if callable(count):
        return int(count(batch))
    tensors = [v for v in (batch.values() if isinstance(batch, dict) else batch) if isinstance(v, torch.Tensor)]
    return int(tensors[0].shape[0]) if tensors else 0


class Throughput(L.Callback):
    def __init__(self, every: int = 20, peak_tflops: float | None = None):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if peak_tflops is not None and peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0 (or null: from the device name), got {peak_tflops}")
        self.every, self.peak_override = every, peak_tflops
        self.flops: dict[tuple, tuple[float, float]] = {}  # shape key -> (trained, frozen) FLOPs of one batch
        self._recorder: _OutermostCalls | None = None  # on while a batch of a new shape runs
        self._key: tuple = ()  # the shape key of the batch in progress
        self._window = [0, 0, 0.0, 0.0]  # batches, images, trained FLOPs, frozen FLOPs since the mark
        self._mark: float | None = None
        self.last: dict[str, float] = {}  # the latest logged figures

    # ---- counting -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """FSDP's sharded modules refuse to be copied: under a strategy that shards parameters, the meta clones
        are made here, before the model is sharded (``configure_model`` runs after this hook)."""
        self._pl_module = pl_module
        self._clones = {}
        if getattr(trainer.strategy, "shards_parameters", False):
            self._clones = {name: _meta_clone(child) for name, child in pl_module.named_children()}

    def _clone_of(self, module: nn.Module) -> nn.Module | None:
        clones = getattr(self, "_clones", None)
        if not clones:
            return None
        name = next((n for n, m in self._pl_module.named_modules() if m is module), None)
        if not name:
            return None
        head, _, rest = name.partition(".")
        clone = clones.get(head)
        return clone.get_submodule(rest) if clone is not None and rest else clone

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._key = _shape_key(batch)
        if self._key not in self.flops:
            inside = {id(m) for m in pl_module.modules() if m is not pl_module}
            self._recorder = _OutermostCalls(inside).__enter__()

    def _finish_count(self) -> None:
        recorder, self._recorder = self._recorder, None
        recorder.__exit__(None, None, None)
        self.flops[self._key] = count_flops(recorder.calls, self._clone_of)
        self._mark = None  # counting took time: the next window starts after it

    # ---- timing ---------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._recorder is not None:
            self._finish_count()
            return
        if self._mark is None:
            self._sync(pl_module)
            self._mark, self._window = time.perf_counter(), [0, 0, 0.0, 0.0]
            return
        trained, frozen = self.flops[self._key]
        w = self._window
        w[0], w[1], w[2], w[3] = w[0] + 1, w[1] + _images(pl_module, batch), w[2] + trained, w[3] + frozen
        if w[0] >= self.every:
            self._sync(pl_module)
            now = time.perf_counter()
            self._log(trainer, pl_module, now - self._mark)
            self._mark, self._window = now, [0, 0, 0.0, 0.0]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_counting()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_counting()  # a failure inside a counted batch must not leave the hooks on

    def _stop_counting(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _peak(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        if self.peak_override is not None:
            return self.peak_override
        if pl_module.device.type != "cuda":
            return None
        sixteen_bit = "16" in str(trainer.precision)  # bf16-mixed, 16-mixed, bf16-true
        return peak_tflops(torch.cuda.get_device_name(pl_module.device), sixteen_bit)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, seconds: float) -> None:
        _, images, trained, frozen = self._window
        figures = {"perf/images_per_sec": images / seconds, "perf/tflops_per_sec": trained / seconds / 1e12,
                   "perf/frozen_tflops_per_sec": frozen / seconds / 1e12}
        peak = self._peak(trainer, pl_module)
        if peak is not None:
            figures["perf/mfu"] = figures["perf/tflops_per_sec"] / peak
        if pl_module.device.type == "cuda":
            figures["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self.last = figures
        pl_module.log_dict(figures, on_step=True, on_epoch=False, rank_zero_only=True)
