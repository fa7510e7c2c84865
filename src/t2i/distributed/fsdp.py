"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as a Lightning strategy: ``strategy=fsdp``.

Weights, gradients and AdamW states are sharded over every rank (like ZeRO-3): each UNet block (every
``EmbedSequential``) and a jointly trained text encoder is one unit, gathered for its forward and backward
and freed after; the rest of the trained network is the root unit. The EMA copy is sharded the same way, so
its update is elementwise on each rank's shard (exact, no communication). Frozen parts (the VAE, a frozen text
encoder) are not trained and stay whole on every rank.

Built on Lightning's `ModelParallelStrategy` with a 1-D data-parallel mesh over all ranks (no tensor
parallelism). Checkpoints are PyTorch distributed checkpoints (a folder: each rank writes its shards, rank 0
the trainer state in ``meta.pt``); they load on any number of ranks (DCP reshards), and `t2i.cli.export`
turns one into a stage export. A save is atomic: written next to the checkpoint, then swapped in, with the
previous checkpoint kept as ``<name>.prev`` (as for ZeRO folders).

``trainer.precision=bf16-mixed`` is bf16 autocast over fp32 weights (as under every strategy);
``param_dtype: bfloat16`` additionally gathers the weights in bf16 (FSDP's MixedPrecisionPolicy: half the
all-gather traffic) with gradients reduced in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from t2i.checkpoint_files import DCP_META
from t2i.distributed.sharded_checkpoint import remove_folder_checkpoint, save_folder_atomically


def dcp_client_state(path: str | Path) -> dict:
    """The Lightning fields (global_step, loops, callbacks, our metadata) of a distributed checkpoint."""
    return torch.load(Path(path) / DCP_META, map_location="cpu", weights_only=True)


def dcp_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full, unsharded model state dict of a distributed checkpoint, read in one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    model = state.get("state_dict")
    if not isinstance(model, dict):
        from t2i.checkpointing import CheckpointError
        raise CheckpointError(f"{path}: the distributed checkpoint holds no 'state_dict'")
    return model


def optimizer_param_groups(params: list[nn.Parameter]) -> list[nn.Parameter] | list[dict]:
    """``params`` as the optimizer's argument: one group, or, when FSDP shards some of them (DTensors) and leaves
    others whole, one group of each. Fused and foreach AdamW run one kernel per group and refuse a group that mixes
    the two kinds; with a single group a checkpoint's optimizer state keeps the layout it has always had."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded or len(sharded) == len(params):
        return params
    return [{"params": sharded}, {"params": [p for p in params if not isinstance(p, DTensor)]}]


class FSDP2Strategy(ModelParallelStrategy):
    """``fully_shard`` of the units, roots and whole modules the stage hands to ``shard`` (its
    ``configure_model``), on a 1-D mesh of all ranks."""

    shards_parameters = True  # a forward of a sharded module is a collective: every rank must run it

    def __init__(self, reshard_after_forward: bool = True, param_dtype: str | None = None,
                 save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = getattr(torch, param_dtype) if param_dtype else None
        if self.param_dtype is not None and not self.param_dtype.is_floating_point:
            raise ValueError(f"strategy.param_dtype must be a floating dtype name, got {param_dtype!r}")

    def setup_environment(self) -> None:
        # every rank is a data-parallel rank (Lightning's default would make the processes of a node a tensor-
        # parallel group)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, units: list[nn.Module], roots: list[nn.Module], whole: list[nn.Module] = ()) -> None:
        """``fully_shard`` each unit, then each root (which takes the parameters no unit under it holds). The
        modules in ``whole`` stay unsharded on every rank; their gradients are averaged after each backward."""
        import torch.distributed as dist
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fully_shard keeps each rank's slice of its own copy: start every rank from rank 0's weights
        for module in [*roots, *whole]:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
        mesh = self.device_mesh["data_parallel"]
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward}
        if self.param_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32)
        for unit in units:
            fully_shard(unit, **options)
        for root in roots:
            fully_shard(root, **options)
        self._whole_params = [p for module in whole for p in module.parameters() if p.requires_grad]

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        self._average_whole_gradients()
        return loss

    def _average_whole_gradients(self) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in getattr(self, "_whole_params", []) if p.grad is not None]
        if not grads or self.world_size == 1:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_gradients(self, parameters: list[torch.Tensor], clip_val: float | None, algorithm: str | None) -> None:
        """Clip by global norm (or value) over the sharded gradients and the whole ones together: torch's
        ``clip_grad_norm_`` refuses a mix of DTensors and plain tensors."""
        from torch.distributed.tensor import DTensor

        if not clip_val:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        if str(algorithm or "norm").lower().endswith("value"):
            for g in grads:
                g.clamp_(-clip_val, clip_val)
            return
        sharded = [g for g in grads if isinstance(g, DTensor)]
        plain = [g for g in grads if not isinstance(g, DTensor)]
        squares = torch.zeros((), device=self.root_device)
        if sharded:
            squares = squares + torch.nn.utils.get_total_norm(sharded).full_tensor().float() ** 2
        if plain:
            squares = squares + torch.nn.utils.get_total_norm(plain).float() ** 2
        coefficient = clip_val / (float(squares.sqrt()) + 1e-6)  # torch's clip_grad_norm_ formula
        if coefficient < 1.0:
            for group in (sharded, plain):
                if group:
                    torch._foreach_mul_(group, coefficient)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        save_folder_atomically(self, filepath,
                               lambda tmp: super(FSDP2Strategy, self).save_checkpoint(checkpoint, tmp, storage_options))

    def remove_checkpoint(self, filepath) -> None:
        remove_folder_checkpoint(self, filepath)
