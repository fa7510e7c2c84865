"""Classifier-guided sampling (Dhariwal & Nichol 2021) of a pixel-space text-to-image base model with a
noisy-image classifier export (`t2i.stages.noisy_classifier`).

At every sampler step the base model's x̂0 is shifted along ``∇_{x_t} log p_φ(y | x_t, t)`` (their eq. 14 /
Algorithm 2: ``ε̂' = ε̂ - sqrt(1-ᾱ_t)·s·∇``, `t2i.diffusion.classifier_guidance.classifier_guidance`), where
``log p_φ(y | x_t, t) = Σ_heads log softmax(logits_head)[y_head]`` (independent heads: the joint label's
log-probability is the sum). The shift comes before thresholding (static/dynamic clipping acts on the
guided x̂0), through `t2i.pipelines.sampling.sample`'s ``x0_wrapper``.

Two modes:

- ``conditional=False``: the base's jointly trained unconditional model (its learned null conditioning,
  ``cond_dropout.null_like``), guided by the classifier alone: the paper's setting (an unconditional model
  plus a classifier);
- ``conditional=True``: the prompts' conditioning with classifier-free guidance at ``settings.guidance_scale``
  (Ho & Salimans 2022), plus classifier guidance (the paper's §5 conditional model + classifier, here with
  CFG as the conditional model).

The classifier must have been trained on the base's schedule (its ``x_t`` are the sampler's ``x_t``) and at
the base's resolution; both are checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from t2i.conditioning.cond import Cond
from t2i.data.shapes import caption_attributes
from t2i.diffusion import classifier_guidance, logp_grad, make_schedule
from t2i.exports import ExportError, read_export
from t2i.nn.noisy_classifier import NoisyImageClassifier
from t2i.pipelines.build import build_from_config, load_module
from t2i.pipelines.sampling import SamplerSettings, sample
from t2i.pipelines.text_to_image import TextToImagePipeline

LabelFn = Callable[[str], Mapping[str, str]]  # caption -> {head: class name}


def load_classifier(export_dir: str | Path) -> tuple[NoisyImageClassifier, dict[str, list[str]], torch.Tensor, int,
                                                    LabelFn]:
    """(classifier, labels ``{head: class names}``, its schedule ᾱ, its image size, its label function) from a
    classifier export. An export whose config names no ``label_fn`` was trained on shapes captions."""
    export = read_export(export_dir, stage="classifier")
    model = export.config["model"]
    classifier = load_module(export, "classifier", "classifier")
    labels = {str(k): [str(c) for c in v] for k, v in model["labels"].items()}
    node = model.get("label_fn")
    label_fn = build_from_config(node, export.path / "config.yaml", "model.label_fn") if node else caption_attributes
    return classifier, labels, make_schedule(**model.get("schedule", {})), int(model["image_size"]), label_fn


class ClassifierGuidedPipeline:
    """A pixel-space base `TextToImagePipeline` (``first_stage`` None) guided by a `NoisyImageClassifier`.

    ``label_fn`` reads a caption's labels (caption -> ``{head: class}``; shapes captions by default).
    ``classifier_alphas_cumprod`` / ``classifier_image_size``: the schedule and resolution the classifier was
    trained at; a mismatch with the base is refused here (a classifier of ``x_t`` from another schedule, or of
    another image size, would give meaningless gradients).
    """

    def __init__(self, base: TextToImagePipeline, classifier: NoisyImageClassifier,
                 labels: Mapping[str, Sequence[str]], classifier_alphas_cumprod: torch.Tensor,
                 classifier_image_size: int, label_fn: LabelFn = caption_attributes):
        if base.first_stage is not None:
            raise ValueError("classifier guidance needs a pixel-space base model (its classifier sees pixels), "
                             "but this base decodes latents with a first stage")
        ac, cac = base.alphas_cumprod.double().cpu(), classifier_alphas_cumprod.double().cpu()
        if ac.shape != cac.shape or not torch.allclose(ac, cac, rtol=1e-6, atol=1e-9):
            raise ValueError(f"incompatible classifier: it was trained on another noise schedule than the base "
                             f"model's (T={cac.shape[0]} vs T={ac.shape[0]}, max |Δᾱ|="
                             f"{(ac - cac).abs().max().item() if ac.shape == cac.shape else float('nan'):.3g}); "
                             f"train it with model.schedule equal to the base's")
        if int(classifier_image_size) != int(base.image_size):
            raise ValueError(f"incompatible classifier: it was trained on {classifier_image_size}px images, the base "
                             f"model makes {base.image_size}px images")
        in_channels = base.net["denoiser"].in_channels
        if classifier.in_channels != in_channels:
            raise ValueError(f"incompatible classifier: it takes {classifier.in_channels}-channel images, the base "
                             f"makes {in_channels}-channel images")
        labels = {str(k): [str(c) for c in v] for k, v in labels.items()}
        if {h: len(v) for h, v in labels.items()} != dict(classifier.heads):
            raise ValueError(f"the labels {labels} do not match the classifier's heads {dict(classifier.heads)}")
        self.base, self.labels, self.label_fn = base, labels, label_fn
        self.classifier = classifier.eval().requires_grad_(False).to(base.device)

    @classmethod
    def from_exports(cls, base_export: str | Path | TextToImagePipeline, classifier_export: str | Path,
                     base_stage: str = "base", device: str | torch.device = "cpu") -> ClassifierGuidedPipeline:
        """``base_export``: a pixel text-to-image export of stage type ``base_stage`` (or a loaded pipeline)."""
        base = base_export
        if not isinstance(base, TextToImagePipeline):
            base = TextToImagePipeline.from_export(base_export, stage=base_stage, device=device)
        classifier, labels, ac, size, label_fn = load_classifier(classifier_export)
        try:
            return cls(base.to(device), classifier, labels, ac, size, label_fn)
        except ValueError as e:
            raise ExportError(f"{classifier_export} cannot guide {base_export}: {e}") from e

    # ---- labels -------------------------------------------------------------------------------
    def labels_of(self, prompt: str) -> dict[str, str]:
        """The classifier's labels of a caption (every head), read by its ``label_fn``."""
        try:
            found = self.label_fn(prompt)
        except ValueError as e:
            raise ValueError(f"classifier guidance cannot label caption {prompt!r}: {e}") from e
        missing = sorted(set(self.labels) - set(found))
        if missing:
            raise ValueError(f"caption {prompt!r} has no {missing} (the classifier's heads are {list(self.labels)})")
        return {head: found[head] for head in self.labels}

    def _targets(self, labels: Sequence[Mapping[str, str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{head: (class index (B,), whether the sample names this head (B,))}``; a sample may name a subset
        of the heads (only those guide it)."""
        for i, sample_labels in enumerate(labels):
            unknown = sorted(set(sample_labels) - set(self.labels))
            if unknown:
                raise ValueError(f"labels[{i}] names {unknown}, the classifier has heads {list(self.labels)}")
            for head, value in sample_labels.items():
                if value not in self.labels[head]:
                    raise ValueError(f"labels[{i}]: {head} {value!r} is not one of {self.labels[head]}")
        device = self.base.device
        return {head: (torch.tensor([names.index(s[head]) if head in s else 0 for s in labels], device=device),
                       torch.tensor([head in s for s in labels], device=device))
                for head, names in self.labels.items()}

    def log_prob_fn(self, labels: Sequence[Mapping[str, str]]):
        """``(x_t, t) -> Σ_heads log p_φ(y_head | x_t, t)`` of shape (B,), for `t2i.diffusion.logp_grad`."""
        targets = self._targets(labels)

        def log_prob(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            logits = self.classifier(x_t, t)
            total = torch.zeros(x_t.shape[0], device=x_t.device)
            for head, (index, named) in targets.items():
                lp = torch.log_softmax(logits[head].float(), dim=-1).gather(1, index[:, None])[:, 0]
                total = total + torch.where(named, lp, torch.zeros_like(lp))
            return total

        return log_prob

    # ---- sampling -----------------------------------------------------------------------------
    def _unconditional(self, n: int) -> Cond:
        """The base's learned null conditioning for ``n`` samples (what it learned as p(x))."""
        dropout = self.base.net["cond_dropout"]
        cond = self.base.condition([""] * n)
        leaking = [k for k in cond.set_fields() if k != "context_mask" and k not in dropout.p]
        if leaking:
            raise ValueError(f"the base model has no unconditional model for {leaking}: its conditioning dropout "
                             f"only drops {sorted(dropout.p)} (train it with those dropped too)")
        return dropout.null_like(cond)

    @torch.no_grad()
    def __call__(self, labels: Sequence[Mapping[str, str]] | Sequence[str], scale: float,
                 conditional: bool = False, settings: SamplerSettings | None = None, seed: int = 0,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W), guided towards ``labels``: one ``{head: class}`` dict per sample
        (a subset of the heads is fine), or shapes captions (every head's label read from the caption).

        ``scale``: the classifier scale s (0: no classifier guidance). ``conditional``: sample from the prompts'
        conditioning under classifier-free guidance (``settings.guidance_scale``) instead of the unconditional
        model; needs captions. ``noise`` (x_T) overrides the seed.
        """
        items = list(labels)
        if not items:
            raise ValueError("nothing to sample: no labels or prompts given")
        if all(isinstance(x, str) for x in items):
            prompts: list[str] | None = items
            targets = [self.labels_of(p) for p in items]
        elif all(isinstance(x, Mapping) for x in items):
            prompts, targets = None, items
        else:
            raise TypeError("labels must be all {head: class} dicts or all caption strings")
        if conditional and prompts is None:
            raise ValueError("conditional=True samples from the prompts' conditioning: pass captions, not dicts")
        settings = settings or SamplerSettings()
        base, n = self.base, len(items)
        if conditional:
            cond = base.condition(prompts)
            if not cond.set_fields():
                raise ValueError("conditional=True, but the base model takes no text conditioning")
            uncond = base.net["cond_dropout"].null_like(cond) if base.net["cond_dropout"].p else None
        else:
            cond, uncond = self._unconditional(n), None
        ac = base.alphas_cumprod.to(base.device)
        grad_fn = logp_grad(self.log_prob_fn(targets))

        def guide(x0_fn):
            return classifier_guidance(x0_fn, grad_fn, scale, ac)

        x = sample(base.net["denoiser"], ac, base.prediction, base.latent_shape(n), cond, uncond, settings,
                   generator=torch.Generator().manual_seed(seed), noise=noise,
                   x0_wrapper=guide if scale != 0 else None)
        return x.clamp(-1, 1)
