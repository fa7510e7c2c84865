"""OpenCLIP text encoders: a frozen pretrained tower (Stable Diffusion 2) or a tiny trainable one (LDM's τθ).

Both return ``TextEncoding(context (B, L, D), mask (B, L) bool, pooled (B, Dp))``:

- ``context``: per-token hidden states for cross-attention, from the last layer (after ``ln_final``) or,
  with ``layer="penultimate"``, from the input of the last block. Stable Diffusion 2's
  ``FrozenOpenCLIPEmbedder`` applies ``ln_final`` to the penultimate states too and so do we by default
  (``penultimate_ln=True``); SDXL's ``FrozenOpenCLIPEmbedder2`` (non-legacy) returns them without it
  (``penultimate_ln=False``).
- ``mask``: True up to and including the EOT token (padding id 0 after it is False). The tower is causal,
  so a token's state never depends on the padding after it.
- ``pooled``: the EOT token's last-layer state after ``ln_final``, projected by ``text_projection``,
  exactly as open_clip's ``CLIP.encode_text`` (unnormalised).

Nothing is downloaded: the BPE vocabulary ships inside open_clip and weights come from a local file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.utils.checkpoint
from open_clip import get_model_config
from open_clip.model import CLIPTextCfg, _build_text_tower
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer, text_global_pool
from torch import nn

from t2i.conditioning.clip import STAGE as CLIP_STAGE
from t2i.conditioning.clip import clip_export_model_config
from t2i.conditioning.text_encoding import TextEncoding
from t2i.exports import Export, read_export
from t2i.weights import check_state_dict, load_tensor_file

_IGNORED_PREFIXES = ("visual.",)  # the image tower of a full CLIP checkpoint
_IGNORED_KEYS = ("logit_scale", "logit_bias")


@functools.lru_cache(maxsize=4)
def _simple_tokenizer(clean: str) -> SimpleTokenizer:
    return SimpleTokenizer(clean=clean)


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` (CLIP BPE, vocabulary inside the package) to fixed-length ids.

    ``tok(texts) -> (ids (B, L) long, mask (B, L) bool)``: ``[SOT, bpe..., EOT, 0, ...]``; the mask is True
    up to and including EOT. A text longer than L is truncated as open_clip does: the first L tokens are
    kept and the last one is replaced by EOT, so EOT is always present (and the mask is then all True).
    """

    def __init__(self, context_length: int = 77, clean: str = "lower"):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = context_length
        self.clean = clean
        self._tok = _simple_tokenizer(clean)
        self.sot_id: int = self._tok.sot_token_id
        self.eot_id: int = self._tok.eot_token_id
        self.pad_id = 0
        self.vocab_size: int = self._tok.vocab_size

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("OpenClipTokenizer takes a string or a sequence of strings")
        ids = self._tok(texts, context_length=self.context_length)
        return ids, self.mask_of(ids)

    def mask_of(self, ids: torch.Tensor) -> torch.Tensor:
        """True up to and including each row's first EOT (all True for a row without EOT)."""
        is_eot = ids == self.eot_id
        last = torch.where(is_eot.any(-1), is_eot.int().argmax(-1), ids.shape[-1] - 1)
        return torch.arange(ids.shape[-1], device=ids.device)[None] <= last[:, None]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Texts of (B, L) ids, without SOT, EOT and padding (as cleaned: lower case, one space)."""
        skip = {self.pad_id, self.sot_id, self.eot_id}
        return [self._tok.decode([int(i) for i in row if int(i) not in skip]).strip() for row in ids]

    # share the (immutable after construction) BPE tables when copied, e.g. by an EMA's deepcopy
    def __getstate__(self):
        return {"context_length": self.context_length, "clean": self.clean}

    def __setstate__(self, state):
        self.__init__(**state)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP checkpoint file, without its image tower (see `t2i.weights`)."""
    return load_tensor_file(path, skip_prefixes=_IGNORED_PREFIXES)


def _text_tower_state(sd: dict[str, torch.Tensor], tower: nn.Module, path) -> dict[str, torch.Tensor]:
    """The text-tower entries of a CLIP state dict, checked strictly against ``tower``."""
    if "token_embedding.weight" not in sd and any(k.startswith("text.") for k in sd):
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}  # CustomTextCLIP layout
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES) and k not in _IGNORED_KEYS}
    check_state_dict(sd, tower, "the text tower", path)
    return sd


class OpenClipTextEncoder(nn.Module):
    """OpenCLIP text tower -> ``TextEncoding(context, mask, pooled)``.

    ``OpenClipTextEncoder(arch, checkpoint_path)`` is the FROZEN pretrained encoder: the text tower of
    open_clip model ``arch`` (e.g. "ViT-H-14" for SD2, "ViT-B-32") is built from its config, alone (the
    image tower is never instantiated), and loaded strictly from the local checkpoint (a full CLIP state
    dict, possibly under "state_dict"; the image tower's keys and logit scale/bias are skipped). Its
    parameters have ``requires_grad=False``, it stays in eval mode whatever ``.train()`` says, and it runs
    under ``torch.no_grad()``. ``context_length`` may be shorter than the model's (77): thanks to the causal
    mask the states of the kept tokens are unchanged.

    ``OpenClipTextEncoder.from_clip_export(export_dir)`` is the FROZEN text tower of a CLIP stage export
    (unCLIP's CLIP), built from the export's open_clip model config and loaded strictly from its weights.

    ``OpenClipTextEncoder.from_config(...)`` builds a randomly initialised TRAINABLE tower (the LDM paper's
    τθ, trained jointly with the UNet) from the same open_clip ``TextTransformer``.

    ``forward(text)`` takes a string, a list of strings (tokenized inside) or token ids (B, L') with
    L' <= the model's context length.

    Stable Diffusion's text conditioning, for imported SD weights: ``attend_to_padding=True`` returns an
    all-True mask (SD's UNet cross-attends to all 77 states, padding included), and ``pad_with_eot=True`` pads
    with the end-of-text token instead of 0 (SD 1.x's transformers tokenizer does; SD 2.x's open_clip pads 0).
    """

    def __init__(self, arch: str | None = None, checkpoint_path: str | Path | None = None, *,
                 layer: str = "last", penultimate_ln: bool = True, context_length: int | None = None,
                 force_quick_gelu: bool = False, tower: TextTransformer | None = None,
                 attend_to_padding: bool = False, pad_with_eot: bool = False):
        super().__init__()
        self.attend_to_padding, self.pad_with_eot = attend_to_padding, pad_with_eot
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if tower is None:
            if arch is None or checkpoint_path is None:
                raise ValueError("give arch and checkpoint_path (frozen pretrained), or use "
                                 "OpenClipTextEncoder.from_config(...) for a trainable tower")
            tower, tokenizer_kwargs = self.build_tower(arch, force_quick_gelu)
            sd = _text_tower_state(load_state_dict_file(checkpoint_path), tower, checkpoint_path)
            tower.load_state_dict(sd, strict=True)
            self.frozen = True
        else:
            tokenizer_kwargs = {}
            self.frozen = False
        if not tower.transformer.batch_first:
            raise ValueError("expected a batch-first open_clip Transformer")
        self.tower = tower
        self.layer = layer
        self.penultimate_ln = penultimate_ln
        if layer == "penultimate" and len(tower.transformer.resblocks) < 2:
            raise ValueError("layer='penultimate' needs a tower with at least 2 layers")
        self.context_length = context_length or tower.num_pos
        if self.context_length > tower.num_pos:
            raise ValueError(f"context_length {self.context_length} > the model's {tower.num_pos}")
        self.tokenizer = OpenClipTokenizer(self.context_length, **tokenizer_kwargs)
        if self.tokenizer.vocab_size > tower.vocab_size:
            raise ValueError(f"vocab_size {tower.vocab_size} < the tokenizer's {self.tokenizer.vocab_size}")
        if self.frozen:
            self._freeze()

    def _freeze(self) -> None:
        self.frozen = True
        self.tower.requires_grad_(False)
        self.tower.eval()

    @staticmethod
    def build_tower(arch: str, force_quick_gelu: bool) -> tuple[TextTransformer, dict]:
        if ":" in arch:  # "hf-hub:..." would fetch a config from the network, "local-dir:..." runs its json
            raise ValueError(f"open_clip model {arch!r}: only registered config names are used (no hf-hub: or "
                             f"local-dir: names; nothing is downloaded); register a config with "
                             f"open_clip.add_model_config")
        cfg = get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {arch!r} (open_clip.list_models() lists them; register "
                             f"your own with open_clip.add_model_config)")
        return OpenClipTextEncoder._tower_from_model_config(cfg, arch, force_quick_gelu)

    @staticmethod
    def _tower_from_model_config(cfg: dict, arch: str, force_quick_gelu: bool = False
                                 ) -> tuple[TextTransformer, dict]:
        text_cfg = CLIPTextCfg(**cfg["text_cfg"])
        if text_cfg.hf_model_name or text_cfg.hf_tokenizer_name or text_cfg.embed_cls:
            raise ValueError(f"{arch}: only open_clip's own causal text transformer with the CLIP BPE "
                             f"tokenizer is supported (no HF text models or tokenizers, no CoCa)")
        tower = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=cfg.get("quick_gelu", False)
                                  or force_quick_gelu)
        clean = (text_cfg.tokenizer_kwargs or {}).get("clean", "lower")
        return tower, {"clean": clean}

    @classmethod
    def from_config(cls, width: int = 128, layers: int = 2, heads: int = 4, context_length: int = 32,
                    vocab_size: int = 49408, output_dim: int | None = 128, mlp_ratio: float = 4.0,
                    quick_gelu: bool = False, layer: str = "last", penultimate_ln: bool = True
                    ) -> OpenClipTextEncoder:
        """A randomly initialised trainable tower (open_clip's init). ``output_dim`` None: no projection,
        pooled = the EOT state (Dp = width)."""
        tower = TextTransformer(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                                layers=layers, mlp_ratio=mlp_ratio, output_dim=output_dim,
                                act_layer=QuickGELU if quick_gelu else nn.GELU)
        return cls(tower=tower, layer=layer, penultimate_ln=penultimate_ln)

    @classmethod
    def from_clip_export(cls, export_dir: str | Path | Export, layer: str = "last",
                         context_length: int | None = None, penultimate_ln: bool = True) -> OpenClipTextEncoder:
        """The FROZEN text tower of a CLIP stage export (``stage="clip"``): built from the export's open_clip
        model config and loaded strictly from its weights; ``pooled`` is the export's ``encode_text``."""
        export = export_dir if isinstance(export_dir, Export) else read_export(export_dir, CLIP_STAGE)
        tower, tokenizer_kwargs = cls._tower_from_model_config(clip_export_model_config(export), str(export.path))
        tower.load_state_dict(_text_tower_state(export.state_dict(), tower, export.path), strict=True)
        encoder = cls(tower=tower, layer=layer, penultimate_ln=penultimate_ln, context_length=context_length)
        encoder.tokenizer = OpenClipTokenizer(encoder.context_length, **tokenizer_kwargs)
        encoder._freeze()
        return encoder

    # ------------------------------------------------------------------ properties
    @property
    def width(self) -> int:
        """D, the context (per-token state) width."""
        return self.tower.width

    @property
    def pooled_dim(self) -> int:
        proj = self.tower.text_projection
        if proj is None:
            return self.tower.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def zero3_external_parameters(self) -> list[nn.Parameter]:
        """The tower's parameters that `_encode` reads directly (not through a submodule call): DeepSpeed ZeRO-3
        must gather them for this module's forward (`t2i.distributed.deepspeed.register_external_parameters`)."""
        t = self.tower
        return [p for p in (t.positional_embedding, t.text_projection) if isinstance(p, nn.Parameter)]

    def parameters_unused_without_pooled(self) -> list[nn.Parameter]:
        """Parameters that only the pooled embedding depends on (the projection; with penultimate-layer states, the
        last block and the final norm too). A stage whose UNet takes no pooled vector freezes them: they would get
        no gradient, which DDP reports as an error."""
        t = self.tower
        proj = t.text_projection
        params = list(proj.parameters()) if isinstance(proj, nn.Module) else ([proj] if proj is not None else [])
        if self.layer != "last":
            params += list(t.transformer.resblocks[-1].parameters())
            if not self.penultimate_ln:
                params += list(t.ln_final.parameters())
        return params

    def train(self, mode: bool = True) -> OpenClipTextEncoder:
        super().train(mode)
        if self.frozen:
            self.tower.eval()  # frozen forever: no dropout, whatever the parent module does
        return self

    # ------------------------------------------------------------------ encoding
    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer(texts)

    def forward(self, text: str | Sequence[str] | torch.Tensor) -> TextEncoding:
        if isinstance(text, torch.Tensor):
            ids = text
            if ids.ndim != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(f"token ids must be an integer (B, L) tensor, got {ids.dtype} {tuple(ids.shape)}")
            mask = self.tokenizer.mask_of(ids)
        else:
            ids, mask = self.tokenizer(text)
        device = self.tower.positional_embedding.device
        ids, mask = ids.to(device=device, dtype=torch.long), mask.to(device)
        if self.pad_with_eot:
            ids = torch.where(mask, ids, torch.full_like(ids, self.tokenizer.eot_id))
        if self.attend_to_padding:
            mask = torch.ones_like(mask)
        with torch.no_grad() if self.frozen else torch.enable_grad():
            context, pooled = self._encode(ids)
        return TextEncoding(context, mask, pooled)

    def _encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tower
        n = ids.shape[1]
        if n > t.num_pos:
            raise ValueError(f"{n} tokens > the model's context length {t.num_pos}")
        cast_dtype = t.transformer.get_cast_dtype()
        x = t.token_embedding(ids).to(cast_dtype) + t.positional_embedding[:n].to(cast_dtype)
        attn_mask = None if t.attn_mask is None else t.attn_mask[:n, :n]
        blocks = t.transformer.resblocks
        penultimate = None
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x
            if t.transformer.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        last = t.ln_final(x)
        pooled = text_global_pool(last, ids, t.pool_type, eos_token_id=getattr(t, "eos_id", None))
        if isinstance(t.text_projection, nn.Linear):
            pooled = t.text_projection(pooled)
        elif t.text_projection is not None:
            pooled = pooled @ t.text_projection
        if self.layer == "last":
            context = last
        else:
            context = t.ln_final(penultimate) if self.penultimate_ln else penultimate
        return context, pooled
