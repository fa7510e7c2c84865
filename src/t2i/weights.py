"""Reading weight files that a user gives (pretrained towers, LPIPS, imported checkpoints) safely:
safetensors, or torch files read with ``weights_only=True`` so that a file holding arbitrary pickled
objects is refused instead of run."""

from __future__ import annotations

from pathlib import Path

import torch


def load_tensor_file(path: str | Path, skip_prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from ``.safetensors`` or a ``torch.save`` file. A dict holding the
    weights under ``"state_dict"`` (training checkpoints) is unwrapped and a ``module.`` prefix removed;
    tensors whose names start with `skip_prefixes` are not read (safetensors) or dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys()  # a safe_open handle is not iterable
            sd = {k: f.get_tensor(k) for k in names if not k.startswith(skip_prefixes)}
    else:
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if type(e).__name__ == "UnpicklingError" or "weights_only" in str(e).lower():
                raise ValueError(f"refusing to load {path}: it holds more than tensors and plain containers "
                                 f"(loaded with weights_only=True): {e}") from e
            raise
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat dict of tensors (a state dict); got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if not k.startswith(skip_prefixes)} if skip_prefixes else sd


def check_state_dict(sd: dict[str, torch.Tensor], module: torch.nn.Module, what: str, source) -> None:
    """Raise a ValueError naming every missing key, unexpected key and shape mismatch of `sd` against
    ``module.state_dict()`` (a strict load that says everything that is wrong at once)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or bad_shapes:
        raise ValueError(f"checkpoint {source} does not match {what}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {bad_shapes}")
