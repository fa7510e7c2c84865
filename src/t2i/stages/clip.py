"""The CLIP stage of unCLIP: an open_clip ``CLIP`` trained contrastively on image-caption pairs, or a
user's pretrained open_clip checkpoint exported as is (``checkpoint_path`` with ``trainer.max_steps=0``).

The export holds the open_clip model's own state dict (``visual.*``, ``token_embedding.weight``,
``transformer.*``, ``ln_final.*``, ``text_projection``, ``logit_scale``, ...); ``config.yaml`` names the
model (``model.arch`` or ``model.clip_config``), so `t2i.conditioning.clip` rebuilds it without Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss

from t2i.callbacks.nonfinite import SkippedStepsAware
from t2i.conditioning.clip import build_clip, clip_preprocess, clip_spec
from t2i.conditioning.text import OpenClipTokenizer
from t2i.eval.retrieval import retrieval_recall
from t2i.weights import check_state_dict, load_tensor_file

MAX_LOGIT_SCALE = math.log(100.0)  # open_clip clamps the learned temperature at 100


def _no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's exclusion: gains, biases, norms and the logit scale get no weight decay."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


class ClipStage(SkippedStepsAware, L.LightningModule):
    """Contrastive training (open_clip's `ClipLoss`, learned logit scale clamped to 100) of an open_clip
    model given by name (``arch``) or by a custom config dict (``clip_config``).

    Images go through `t2i.conditioning.clip.clip_preprocess` (the one preprocessing `ClipImageEncoder`
    uses too). Under DDP the loss uses every rank's features (local loss, gathered with gradient); a batch
    that lost samples to skipping is trimmed to the smallest batch across ranks, since the gather needs
    equal sizes (the trimmed samples are counted in ``train/samples_trimmed``). Validation is zero-shot retrieval over the validation set (up to ``val_max_samples``):
    ``val/i2t_r1``, ``val/i2t_r5``, ``val/t2i_r1``, ``val/t2i_r5``, where a retrieved item is correct when
    its caption equals the query's caption (shapes has many samples with identical captions, see
    `t2i.eval.retrieval.retrieval_recall`), and ``val/loss`` (the contrastive loss within each batch).
    """

    stage_name = "clip"

    def __init__(self, optimizer: partial, arch: str | None = None, clip_config: Mapping | None = None,
                 checkpoint_path: str | None = None, lr_scheduler: partial | None = None,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 val_max_samples: int = 10_000, grad_checkpointing: bool = False):
        super().__init__()
        self.spec = clip_spec(arch, clip_config, image_mean, image_std)
        self.clip = build_clip(self.spec)
        if checkpoint_path:
            sd = load_tensor_file(checkpoint_path)
            check_state_dict(sd, self.clip, f"open_clip model {arch or 'clip_config'}", checkpoint_path)
            self.clip.load_state_dict(sd, strict=True)
        if grad_checkpointing:
            self.clip.set_grad_checkpointing(True)
        clean = (self.spec.model_config["text_cfg"].get("tokenizer_kwargs") or {}).get("clean", "lower")
        self.tokenizer = OpenClipTokenizer(self.spec.context_length, clean=clean)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.val_max_samples = val_max_samples
        self.loss_fn, self.val_loss_fn = ClipLoss(), ClipLoss()
        self.retrieval: dict[str, float] = {}
        self._val: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []

    def setup(self, stage: str) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:  # every rank's features are negatives; the gradient flows through the gather
            self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                    rank=self.global_rank, world_size=world)

    def configure_optimizers(self):
        named = [(n, p) for n, p in self.clip.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if not _no_weight_decay(n, p)]},
                  {"params": [p for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0}]
        opt = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def embed(self, images: torch.Tensor, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (image, text) embeddings, float32."""
        x = clip_preprocess(images, self.spec.image_size, self.spec.mean, self.spec.std)
        ids, _ = self.tokenizer(list(captions))
        img = self.clip.encode_image(x, normalize=True)
        txt = self.clip.encode_text(ids.to(self.device), normalize=True)
        return img.float(), txt.float()

    def _common_batch_size(self, n: int) -> int:
        if self._trainer is None or self.trainer.world_size == 1 or not dist.is_initialized():
            return n
        size = torch.tensor([n], device=self.device)
        dist.all_reduce(size, op=dist.ReduceOp.MIN)
        return int(size.item())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = self._common_batch_size(len(batch["caption"]))
        if n == 0:  # every sample unusable (here or on another rank): a zero step keeps ranks in step
            return sum(p.sum() for p in self.clip.parameters() if p.requires_grad) * 0.0
        img, txt = self.embed(batch["image"][:n], batch["caption"][:n])
        scale = self.clip.logit_scale.exp()
        loss = self.loss_fn(img, txt, scale.float())
        self.log_dict({"train/loss": loss, "train/logit_scale": scale}, prog_bar=True, batch_size=n)
        # samples left out to equalise the gathered batch under DDP (only after skips): counted, not silent
        self.log("train/samples_trimmed", float(len(batch["caption"]) - n), reduce_fx="sum", batch_size=n)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # as open_clip does after every optimizer step (before checkpoints are written)
            self.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = len(batch["caption"])
        if n == 0:
            return
        img, txt = self.embed(batch["image"], batch["caption"])
        self.log("val/loss", self.val_loss_fn(img, txt, self.clip.logit_scale.exp().float()), sync_dist=True,
                 batch_size=n)
        room = self.val_max_samples // self.trainer.world_size - sum(len(c) for _, _, c in self._val)
        if room > 0:
            self._val.append((img[:room].cpu(), txt[:room].cpu(), list(batch["caption"][:room])))

    def on_validation_epoch_end(self) -> None:
        parts = [self._val]
        if self.trainer.world_size > 1 and dist.is_initialized():
            parts = [None] * self.trainer.world_size
            dist.all_gather_object(parts, self._val)
        chunks = [c for rank_part in parts for c in rank_part]
        self._val = []
        if not chunks:
            return
        img, txt = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        captions = [t for c in chunks for t in c[2]]
        self.retrieval = {**retrieval_recall(img, txt, captions), "samples": len(captions)}
        # every rank computed the same numbers from the same gathered embeddings
        self.log_dict({f"val/{k}": float(v) for k, v in self.retrieval.items()}, sync_dist=True)

    # ---- export -------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.clip.state_dict())

    def export_metrics(self, datamodule=None) -> dict:
        """The last validation's retrieval recalls and the widths later stages check."""
        return {**{f"val/{k}": v for k, v in self.retrieval.items()}, "embed_dim": self.spec.embed_dim,
                "image_size": self.spec.image_size[0], "context_length": self.spec.context_length}
