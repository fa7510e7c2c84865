"""The noisy-image classifier stage of classifier guidance (Dhariwal & Nichol 2021, §4.1).

The classifier ``p_φ(y | x_t, t)`` is trained with cross-entropy on ``x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε``
(Ho et al. 2020, eq. 4) with ``t ~ U{0, ..., T-1}``, on the SAME schedule ``ᾱ`` as the diffusion model it
will guide: the guided sampler (`t2i.pipelines.classifier_guidance`) hands it the sampler's ``x_t`` and ``t``
and refuses a classifier trained on another schedule. Labels come from the captions through the stage's
``label_fn`` (caption -> ``{head: class name}``; on the shapes dataset `t2i.data.shapes.caption_attributes`);
a caption it cannot label, or that lacks a head, is an error.

Validation draws ``t`` and the noise from a generator seeded by the batch index (the same ``x_t`` at every
validation) and reports the accuracy of each head overall (``val/acc_<head>``, over uniform ``t``), per third
of the timestep range (``val/acc_<head>_t0``: ``t < T/3``; ``_t1``; ``_t2``: ``t >= 2T/3``, mostly noise)
and on the clean images at ``t = 0`` (``val/acc_<head>_clean``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F

from t2i.callbacks.nonfinite import SkippedStepsAware
from t2i.diffusion import make_schedule, q_sample, sample_timesteps
from t2i.diffusion.seeded_random import randn
from t2i.nn.noisy_classifier import NoisyImageClassifier
from t2i.pipelines.classifier_guidance import LabelFn

BUCKETS = 3  # timestep thirds for the per-noise-level accuracies; one more row counts the clean (t = 0) images


def caption_labels(captions: Sequence[str], labels: Mapping[str, Sequence[str]],
                   label_fn: LabelFn) -> dict[str, torch.Tensor]:
    """``{head: class indices (B,)}`` from captions: ``label_fn(caption)[head]`` of each caption, looked up in
    ``labels[head]`` (the head's class names in logit order)."""
    out: dict[str, list[int]] = {head: [] for head in labels}
    index = {head: {name: i for i, name in enumerate(names)} for head, names in labels.items()}
    for caption in captions:
        try:
            found = label_fn(caption)
        except ValueError as e:
            raise ValueError(f"the noisy classifier's label_fn cannot label caption {caption!r}: {e}") from e
        for head, classes in index.items():
            if head not in found:
                raise ValueError(f"caption {caption!r} has no {head} (label_fn gave {sorted(found)}); the "
                                 f"classifier's heads are {list(index)} (model.labels)")
            value = found[head]
            if value not in classes:
                raise ValueError(f"caption {caption!r} has {head} {value!r}, which is not among the classifier's "
                                 f"classes {list(classes)} (model.labels.{head})")
            out[head].append(classes[value])
    return {head: torch.tensor(v, dtype=torch.long) for head, v in out.items()}


class NoisyClassifierStage(SkippedStepsAware, L.LightningModule):
    """Cross-entropy training of a `NoisyImageClassifier` on noised pixel images (``batch["image"]`` in [-1, 1]).

    Args:
        classifier: the network; its ``heads`` must be ``{head: len(labels[head])}``.
        labels: ``{head: [class names]}``, e.g. ``{"shape": [circle, square, triangle]}``.
        label_fn: caption -> ``{head: class name}`` (shapes: `t2i.data.shapes.caption_attributes`).
        optimizer / lr_scheduler: partials taking the parameters / the optimizer (stepped every step).
        schedule: `t2i.diffusion.make_schedule` arguments; must equal the guided diffusion model's.
        image_size: the training resolution (the guided sampler checks it against the diffusion model's).

    The loss is the sum over heads of the cross-entropy (Dhariwal & Nichol train one classifier per label set;
    several heads share one trunk here).
    """

    stage_name = "classifier"

    def __init__(self, classifier: NoisyImageClassifier, labels: Mapping[str, Sequence[str]], optimizer: partial,
                 label_fn: LabelFn, lr_scheduler: partial | None = None, schedule: dict | None = None,
                 image_size: int = 64):
        super().__init__()
        labels = {str(k): [str(c) for c in v] for k, v in dict(labels).items()}
        for head, names in labels.items():
            if len(set(names)) != len(names):
                raise ValueError(f"labels.{head} repeats a class: {names}")
        expected = {head: len(names) for head, names in labels.items()}
        if dict(classifier.heads) != expected:
            raise ValueError(f"incompatible input: the classifier's heads {dict(classifier.heads)} do not match "
                             f"the labels' class counts {expected}; set model.classifier.heads to match "
                             f"model.labels")
        self.classifier, self.labels, self.label_fn = classifier, labels, label_fn
        self.register_buffer("alphas_cumprod", make_schedule(**(schedule or {})), persistent=False)
        self.image_size = image_size
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.accuracies: dict[str, float] = {}
        self._counts: torch.Tensor | None = None  # (heads, BUCKETS + 1, 2): correct, total; last row t = 0

    @property
    def T(self) -> int:  # the paper's symbol
        return int(self.alphas_cumprod.shape[0])

    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.classifier.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(opt), "interval": "step"}}

    def _forward(self, batch: dict, generator: torch.Generator | None = None):
        """(loss, logits, targets, t) on one batch: labels from the captions, ``x_t = q_sample(x_0, t, ε)``."""
        x0 = batch["image"]
        if x0.shape[-1] != self.image_size or x0.shape[-2] != self.image_size:
            raise ValueError(f"the classifier trains at {self.image_size}px (model.image_size) but the batch holds "
                             f"{tuple(x0.shape[-2:])} images; set data.resolution to match")
        targets = {k: v.to(self.device) for k, v in caption_labels(batch["caption"], self.labels, self.label_fn).items()}
        t = sample_timesteps(x0.shape[0], self.T, generator=generator, device=x0.device)
        noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        logits = self.classifier(q_sample(x0, t, noise, self.alphas_cumprod), t)
        loss = sum(F.cross_entropy(logits[h].float(), targets[h]) for h in self.labels)
        return loss, logits, targets, t

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        n = len(batch["caption"])
        if n == 0:  # every sample unusable: a zero step keeps DDP ranks in step
            return sum(p.sum() for p in self.classifier.parameters()) * 0.0
        loss, _, _, _ = self._forward(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._counts = torch.zeros(len(self.labels), BUCKETS + 1, 2, dtype=torch.long, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = len(batch["caption"])
        if n == 0:
            return
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)  # same t and noise each time
        loss, logits, targets, t = self._forward(batch, generator=gen)
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        bucket = (t * BUCKETS) // self.T
        clean = self.classifier(batch["image"], torch.zeros_like(t))
        for i, head in enumerate(self.labels):
            correct = logits[head].argmax(-1) == targets[head]
            for b in range(BUCKETS):
                in_bucket = bucket == b
                self._counts[i, b, 0] += (correct & in_bucket).sum()
                self._counts[i, b, 1] += in_bucket.sum()
            self._counts[i, BUCKETS, 0] += (clean[head].argmax(-1) == targets[head]).sum()
            self._counts[i, BUCKETS, 1] += n

    def on_validation_epoch_end(self) -> None:
        counts, self._counts = self._counts, None
        if counts is None:
            return
        if self.trainer.world_size > 1 and dist.is_initialized():
            dist.all_reduce(counts)
        if int(counts[0, :, 1].sum()) == 0:
            return
        acc: dict[str, float] = {}
        for i, head in enumerate(self.labels):
            correct, total = counts[i, :BUCKETS, 0], counts[i, :BUCKETS, 1]
            acc[f"val/acc_{head}"] = float(correct.sum() / total.sum())
            for b in range(BUCKETS):
                if total[b]:
                    acc[f"val/acc_{head}_t{b}"] = float(correct[b] / total[b])
            acc[f"val/acc_{head}_clean"] = float(counts[i, BUCKETS, 0] / counts[i, BUCKETS, 1])
        self.accuracies = acc
        self.log_dict(acc, sync_dist=True)  # every rank holds the same reduced counts

    # ---- export -------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}

    def export_metrics(self, datamodule=None) -> dict:
        """The last validation's accuracies and what the guided sampler checks (image size, T)."""
        return {**self.accuracies, "image_size": self.image_size, "T": self.T}
