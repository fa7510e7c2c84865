"""Conditioning dropout for classifier-free guidance (Ho & Salimans 2022).

During training each SAMPLE of the batch has its conditioning replaced by a "null" with probability
``p[key]``; the same model then learns both p(x | c) and p(x), and at sampling time
``null_like(cond)`` gives the fully unconditional `Cond` that guidance batches with ``cond``.

How a null is formed (per key):

- ``"zero"``: zeros of the sample's shape. For ``context`` the whole (L, D) sequence is zeroed and the
  mask of a dropped sample is set all True, so cross-attention sees L identical zero keys (its output is
  then the output projection's bias) and nothing about the caption survives, not even its length.
- ``"learned"``: an ``nn.Parameter``. For ``vector`` a (Dv,) vector; for ``context`` an (L_null, D) token
  sequence (``null_context_length`` tokens, default 1) with its own mask: it fills the first L_null
  positions of the sample's context, the rest is zeros and masked out (mask True for the first L_null
  positions only), so L_null <= L is required. Initialised N(0, ``init_std``²) and trained with the model.
- a tensor: a fixed null stored as a buffer, placed like a learned one. This is how the text null of
  frozen-encoder models (Stable Diffusion) is made: the encoding of the empty caption ``""``, e.g.
  ``e = encoder([""]); CondDropout({"context": .1}, null={"context": e.context[0]},
  null_context_mask=e.mask[0])`` (the mask keeps SOT and EOT only, as the UNet saw it in SD).
  With a TRAINABLE text encoder the empty caption's encoding changes during training; use "learned"
  (or drop the caption to "" before the encoder) instead.

``concat`` supports "zero" and a tensor only. Keys without a probability are never dropped, and
``null_like`` leaves them as they are (a super-resolution model keeps its low-resolution image).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from t2i.conditioning.cond import Cond

KEYS = ("context", "vector", "concat")


class CondDropout(nn.Module):
    """Per-sample, per-key conditioning dropout.

    Args:
        p: drop probability per key, e.g. ``{"context": 0.1, "vector": 0.1}``.
        null: per key "zero" (default), "learned" or a fixed tensor (see the module docstring).
        context_dim: D, needed for a learned context null.
        null_context_length: L_null of a learned context null.
        null_context_mask: (L_null,) bool mask of a fixed context null (default all True).
        vector_dim: Dv, needed for a learned vector null.
        joint: True (default): one uniform number u per sample is shared by all keys and a key is dropped
            when u < p[key], so with equal probabilities the caption's tokens and pooled vector are dropped
            together (a half-dropped caption would leak it into the "unconditional" branch); with unequal
            ones the drops are nested. False: every key draws its own numbers.
        init_std: standard deviation of the learned nulls' initialisation.

    ``forward(cond, generator=None, force=None)`` drops only in training mode unless ``force`` is given:
    True = drop every sample, False = none, a (B,) bool tensor = exactly those samples. The randomness
    comes from ``generator`` (a ``torch.Generator``; numbers are drawn on its device) or the global CPU RNG.
    """

    def __init__(self, p: Mapping[str, float], null: Mapping[str, str | torch.Tensor] | None = None, *,
                 context_dim: int | None = None, null_context_length: int = 1,
                 null_context_mask: torch.Tensor | None = None, vector_dim: int | None = None,
                 joint: bool = True, init_std: float = 0.02):
        super().__init__()
        null = dict(null or {})
        for key in set(p) | set(null):
            if key not in KEYS:
                raise ValueError(f"unknown conditioning key {key!r}; expected one of {KEYS}")
        for key, prob in p.items():
            if not 0.0 <= float(prob) <= 1.0:
                raise ValueError(f"drop probability of {key!r} must be in [0, 1], got {prob}")
        if set(null) - set(p):
            raise ValueError(f"null given for keys without a drop probability: {sorted(set(null) - set(p))}")
        self.p = {key: float(p[key]) for key in KEYS if key in p}
        self.joint = joint
        self.kinds: dict[str, str] = {}
        for key in self.p:
            spec = null.get(key, "zero")
            if isinstance(spec, torch.Tensor):
                self.kinds[key] = "fixed"
                self.register_buffer(f"null_{key}", spec.detach().clone())
            elif spec == "zero":
                self.kinds[key] = "zero"
            elif spec == "learned":
                self.kinds[key] = "learned"
                if key == "context":
                    if context_dim is None or null_context_length < 1:
                        raise ValueError("a learned context null needs context_dim and null_context_length >= 1")
                    shape = (null_context_length, context_dim)
                elif key == "vector":
                    if vector_dim is None:
                        raise ValueError("a learned vector null needs vector_dim")
                    shape = (vector_dim,)
                else:
                    raise ValueError("a learned null is not supported for 'concat' (use 'zero' or a tensor)")
                self.register_parameter(f"null_{key}", nn.Parameter(torch.randn(shape) * init_std))
            else:
                raise ValueError(f"null of {key!r} must be 'zero', 'learned' or a tensor, got {spec!r}")
        self._check_fixed_shapes(null_context_mask)

    def _check_fixed_shapes(self, null_context_mask: torch.Tensor | None) -> None:
        want = {"context": 2, "vector": 1, "concat": 3}
        for key, kind in self.kinds.items():
            if kind == "fixed" and getattr(self, f"null_{key}").ndim != want[key]:
                raise ValueError(f"a fixed {key} null must have {want[key]} dims (one sample, no batch dim)")
        if null_context_mask is not None:
            if self.kinds.get("context") != "fixed":
                raise ValueError("null_context_mask is only for a fixed (tensor) context null")
            mask = null_context_mask.detach().to(torch.bool).clone()
            if mask.shape != self.null_context.shape[:1] or not mask.any():
                raise ValueError(f"null_context_mask must be a (L_null,) bool mask with a True, got {tuple(mask.shape)}")
            self.register_buffer("null_context_mask", mask)
        else:
            self.null_context_mask = None

    # ------------------------------------------------------------------ drop masks
    def drop_masks(self, batch_size: int, device: torch.device | str | None = None,
                   generator: torch.Generator | None = None,
                   force: bool | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B,) bool per configured key: True = replace that sample's ``key`` by its null."""
        if isinstance(force, torch.Tensor):
            force = force.to(device=device, dtype=torch.bool)
            if force.shape != (batch_size,):
                raise ValueError(f"force mask must have shape ({batch_size},), got {tuple(force.shape)}")
            return {key: force for key in self.p}
        if force is not None:
            return {key: torch.full((batch_size,), bool(force), device=device) for key in self.p}
        rows = 1 if self.joint else len(self.p)
        rng_device = generator.device if generator is not None else "cpu"
        u = torch.rand((rows, batch_size), generator=generator, device=rng_device).to(device)
        return {key: u[0 if self.joint else i] < prob for i, (key, prob) in enumerate(self.p.items())}

    # ------------------------------------------------------------------ nulls
    def _context_null(self, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (L, D) null sequence and its (L,) mask for a batch whose contexts have L tokens."""
        seq = self.null_context.to(device=device, dtype=dtype)
        n = seq.shape[0]
        if n > length:
            raise ValueError(f"the context null has {n} tokens, more than the batch's context length {length}")
        mask = torch.zeros(length, dtype=torch.bool, device=device)
        if self.null_context_mask is not None:
            mask[:n] = self.null_context_mask.to(device)
        else:
            mask[:n] = True
        return nn.functional.pad(seq, (0, 0, 0, length - n)), mask

    def __call__(self, cond: Cond, generator: torch.Generator | None = None,
                 force: bool | torch.Tensor | None = None) -> Cond:
        """`cond` with the dropped samples' keys replaced by their nulls (see the class docstring)."""
        fields = super().__call__(cond, generator=generator, force=force)
        return cond.replace(**fields) if fields else cond

    def forward(self, cond: Cond, generator: torch.Generator | None = None,
                force: bool | torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """The replaced fields as a dict of tensors. Module hooks see plain tensors here, not a `Cond`: DeepSpeed
        ZeRO-3 attaches its backward hooks (which gather the learned nulls again for their gradients) to the
        tensors a module returns, and cannot look inside a dataclass."""
        if force is None and not self.training:
            return {}
        b = cond.batch_size
        if b is None or not self.p:
            return {}
        drops = self.drop_masks(b, cond.device, generator, force)
        out = {}
        for key, drop in drops.items():
            value = getattr(cond, key)
            if value is None:
                continue
            kind = self.kinds[key]
            if key == "context":
                out.update(self._drop_context(cond, drop, kind))
                continue
            if kind == "zero":
                null = torch.zeros((), dtype=value.dtype, device=value.device)
            else:
                null = getattr(self, f"null_{key}").to(device=value.device, dtype=value.dtype)
                if null.shape != value.shape[1:]:
                    raise ValueError(f"{key} null of shape {tuple(null.shape)} != sample shape {tuple(value.shape[1:])}")
            out[key] = torch.where(drop.view(-1, *[1] * (value.ndim - 1)), null, value)
        return out

    def _drop_context(self, cond: Cond, drop: torch.Tensor, kind: str) -> dict[str, torch.Tensor | None]:
        ctx, mask = cond.context, cond.context_mask
        b, length, dim = ctx.shape
        if kind == "zero":
            new_ctx = torch.where(drop[:, None, None], torch.zeros((), dtype=ctx.dtype, device=ctx.device), ctx)
            new_mask = None if mask is None else mask | drop[:, None]
            return {"context": new_ctx, "context_mask": new_mask}
        null, null_mask = self._context_null(length, ctx.dtype, ctx.device)
        if null.shape[1] != dim:
            raise ValueError(f"context null width {null.shape[1]} != context width {dim}")
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=ctx.device)
        return {"context": torch.where(drop[:, None, None], null, ctx),
                "context_mask": torch.where(drop[:, None], null_mask, mask)}

    def null_like(self, cond: Cond) -> Cond:
        """The fully unconditional Cond for sampling: every key with a drop probability replaced by its null
        (whatever the mode), the other keys unchanged. Batch with ``Cond.cat([cond, uncond])``."""
        return self(cond, force=True)

    def extra_repr(self) -> str:
        return f"p={self.p}, null={self.kinds}, joint={self.joint}"
