"""An open_clip text tower -> a transformers ``CLIPTextModel`` + ``CLIPTokenizer`` folder pair (the text encoder of
a diffusers ``StableDiffusionPipeline``), what diffusers' ``convert_open_clip_checkpoint`` does for SD 2's OpenCLIP-H:
``token_embedding`` -> ``text_model.embeddings.token_embedding``, ``positional_embedding`` ->
``...position_embedding.weight``, ``resblocks.i.attn.in_proj_{weight,bias}`` split into ``q/k/v_proj``,
``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1/ln_2`` -> ``layer_norm1/2``, ``mlp.c_fc/c_proj`` ->
``mlp.fc1/fc2``, ``ln_final`` -> ``final_layer_norm``; ``text_projection`` is dropped (CLIPTextModel has none and
StableDiffusionPipeline uses only the token states). ``layer: penultimate`` is written as SD 2 does: the last
block is left out (``num_hidden_layers = layers - 1``), so the model's ``last_hidden_state`` is our context.

transformers is imported lazily, only to write and check the folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEXT_ENCODER_CLASS = "CLIPTextModel"
TOKENIZER_CLASS = "CLIPTokenizer"
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"  # open_clip pads with id 0, which is "!"
_OPEN_CLIP_SPECIALS = {"<start_of_text>": BOS, "<end_of_text>": EOS}
_PROBE_PROMPTS = ["a photograph of an astronaut riding a horse", "", "A small  BLUE square, in the center.",
                  " ".join(["a very long prompt that is cut at the context length"] * 12)]
_BANG_PROMPT = "wow! a red circle!!"  # "!" is the "!"-padded tokenizer's pad token (see clip_tokenizer_files)
_TEXT_CHECK_TOL = 1e-3


class DiffusersExportError(ValueError):
    """An export that cannot become a StableDiffusionPipeline folder / SD single file."""


class TextEncoderUnsupported(ValueError):
    """A text tower that transformers' CLIPTextModel cannot hold (the reason is the message)."""


# ---- open_clip text tower -> transformers CLIPTextModel ---------------------------------------------------------
def _activation_name(act: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise TextEncoderUnsupported(f"the MLP activation {type(act).__name__} has no transformers CLIP equivalent")


def clip_text_model_from_open_clip(encoder: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, state dict)`` of the transformers ``CLIPTextModel`` whose ``last_hidden_state`` is
    `encoder`'s context (an :class:`t2i.conditioning.text.OpenClipTextEncoder`). Raises TextEncoderUnsupported
    naming what CLIPTextModel cannot hold. Pure tensors: transformers is not needed."""
    tower = getattr(encoder, "tower", None)
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if tower is None or blocks is None:
        raise TextEncoderUnsupported(f"{type(encoder).__name__} is not an open_clip text tower")
    layer, post_ln = getattr(encoder, "layer", "last"), getattr(encoder, "penultimate_ln", True)
    problems = []
    if getattr(tower, "attn_mask", None) is None:
        problems.append("a bidirectional (non-causal) tower")
    if getattr(tower, "cls_emb", None) is not None:
        problems.append("a CLS embedding (CoCa)")
    if layer == "penultimate" and not post_ln:
        problems.append("penultimate-layer states without ln_final (penultimate_ln=false, SDXL's OpenCLIP-G way)")
    width, heads, n_layers = int(tower.width), int(tower.heads), len(blocks)
    keep = n_layers - 1 if layer == "penultimate" else n_layers
    sd = {k: v for k, v in tower.state_dict().items()}
    expected = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    per_block = ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias")
    expected |= {f"transformer.resblocks.{i}.{p}" for i in range(n_layers) for p in per_block}
    optional = {"text_projection", "text_projection.weight", "text_projection.bias"}  # dropped
    unexpected = sorted(set(sd) - expected - optional)
    missing = sorted(expected - set(sd))
    if unexpected or missing:
        problems.append(f"open_clip block options CLIPTextModel does not have (unexpected tensors {unexpected[:8]}, "
                        f"missing {missing[:8]})")
    norms = {m.eps for m in tower.modules() if isinstance(m, nn.LayerNorm)}
    if len(norms) != 1:
        problems.append(f"LayerNorms with different eps {sorted(norms)}")
    if not all(isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
        problems.append("a custom attention module")
    try:
        act = _activation_name(blocks[0].mlp.gelu)
    except (AttributeError, TextEncoderUnsupported) as e:
        problems.append(str(e) or "an MLP without a GELU")
        act = "gelu"
    if problems:
        raise TextEncoderUnsupported("; ".join(problems))
    out: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
    }
    renames = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
               ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
    for i in range(keep):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part in per_block:
            value = sd[src + part]
            if part.startswith("attn.in_proj_"):
                kind = part.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{dst}self_attn.{name}.{kind}"] = chunk
                continue
            old, new = next(r for r in renames if part.startswith(r[0]))
            out[dst + new + part[len(old):]] = value
    mlp_width = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    tokenizer = getattr(encoder, "tokenizer", None)
    config = {
        "architectures": [TEXT_ENCODER_CLASS], "model_type": "clip_text_model",
        "vocab_size": int(sd["token_embedding.weight"].shape[0]), "hidden_size": width,
        "intermediate_size": mlp_width, "projection_dim": int(getattr(encoder, "pooled_dim", width)),
        "num_hidden_layers": keep, "num_attention_heads": heads,
        "max_position_embeddings": int(sd["positional_embedding"].shape[0]), "hidden_act": act,
        "layer_norm_eps": float(norms.pop()), "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0,
        "pad_token_id": int(getattr(tokenizer, "pad_id", 0)), "bos_token_id": int(getattr(tokenizer, "sot_id", 49406)),
        "eos_token_id": int(getattr(tokenizer, "eot_id", 49407)), "torch_dtype": "float32",
    }
    return config, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def clip_pad_token(encoder: nn.Module) -> str:
    """The CLIPTokenizer pad token for `encoder`. open_clip pads with id 0, the token "!"; a CLIPTokenizer whose pad
    token is "!" (SD 2's diffusers tokenizer) pads the same but also reads every "!" of a prompt as that special
    token (id 0, where open_clip's BPE gives "!</w>" = 256 or a merge). So: "!" only where the padding states
    matter (the encoder's mask lets the UNet attend to them, the SD 2 way); where t2i masks the padding out of
    cross-attention (t2i's default), or pads with end-of-text (SD 1), the pad token is "<|endoftext|>" and every
    real token matches open_clip's."""
    tok = encoder.tokenizer
    if int(getattr(tok, "pad_id", 0)) == int(tok.eot_id):
        return EOS
    return PAD if attends_to_padding(encoder) else EOS


def clip_tokenizer_files(encoder: nn.Module) -> dict[str, str]:
    """``{file name: text}`` of a transformers ``CLIPTokenizer`` folder that tokenizes as `encoder`'s open_clip
    tokenizer (the CLIP BPE shipped inside open_clip; pad token from :func:`clip_pad_token`)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = getattr(encoder, "tokenizer", None)
    if tok is None or getattr(tok, "clean", "lower") != "lower":
        raise TextEncoderUnsupported(f"open_clip tokenizer cleaning {getattr(tok, 'clean', None)!r}: CLIPTokenizer "
                                     f"always lower-cases")
    simple: SimpleTokenizer = tok._tok
    specials_ok = all(simple.encoder.get(k) == i for k, i in (("<start_of_text>", 49406), ("<end_of_text>", 49407)))
    if len(simple.encoder) != 49408 or not specials_ok:
        raise TextEncoderUnsupported(f"a tokenizer with {len(simple.encoder)} tokens (CLIPTokenizer holds the "
                                     f"49408-token CLIP BPE with <|startoftext|>/<|endoftext|> at 49406/49407)")
    vocab = {_OPEN_CLIP_SPECIALS.get(k, k): int(v) for k, v in simple.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    pad = clip_pad_token(encoder)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    tokenizer_config = {"tokenizer_class": TOKENIZER_CLASS, "model_max_length": int(tok.context_length),
                        "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
                        "clean_up_tokenization_spaces": False, **specials}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"}


def transformers_problem() -> str | None:
    """None when transformers can be imported, else why not (monkeypatched by tests)."""
    try:
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        return f"transformers is not importable ({type(e).__name__}: {e})"
    return None


@torch.no_grad()
def check_text_encoder_folder(encoder: nn.Module, text_dir: Path, tokenizer_dir: Path) -> float:
    """Load the written CLIPTextModel / CLIPTokenizer with transformers and compare them with `encoder` on probe
    prompts: the token ids must be equal and ``last_hidden_state`` our context wherever our mask lets the UNet
    see a token (everywhere for an encoder that attends to padding); returns the max abs difference."""
    from transformers import CLIPTextModel, CLIPTokenizer

    model = CLIPTextModel.from_pretrained(str(text_dir), local_files_only=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    prompts = _PROBE_PROMPTS + ([_BANG_PROMPT] if tokenizer.pad_token != PAD else [])
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.long()
    ours_ids, mask = encoder.tokenizer(prompts)
    if ids.shape != ours_ids.shape or not torch.equal(ids[mask], ours_ids[mask].long()):
        raise DiffusersExportError(f"the written CLIPTokenizer does not tokenize as t2i's open_clip tokenizer: "
                                   f"{ids[:, :12].tolist()} vs {ours_ids[:, :12].tolist()}")
    theirs = model(ids).last_hidden_state.float()
    ours = encoder(ours_ids).context.float()
    return float((theirs - ours)[mask].abs().max())


def write_text_encoder(encoder: nn.Module, folder: Path, *, verify: bool = True) -> float | None:
    """Write ``<folder>/text_encoder`` (config.json + model.safetensors) and ``<folder>/tokenizer`` for
    `encoder`; with `verify`, load them back with transformers and return the max abs difference of the token
    states (raising DiffusersExportError beyond 1e-3). Raises TextEncoderUnsupported when it cannot be held."""
    from safetensors.torch import save_file

    config, state = clip_text_model_from_open_clip(encoder)
    tokenizer_files = clip_tokenizer_files(encoder)
    try:
        from transformers import __version__ as tf_version
    except Exception:  # noqa: BLE001
        tf_version = None
    if tf_version:
        config["transformers_version"] = tf_version
    text_dir, tok_dir = folder / "text_encoder", folder / "tokenizer"
    text_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(text_dir / "model.safetensors"), metadata={"format": "pt"})
    (text_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, text in tokenizer_files.items():
        (tok_dir / name).write_text(text, encoding="utf-8")
    if not verify:
        return None
    diff = check_text_encoder_folder(encoder, text_dir, tok_dir)
    if diff > _TEXT_CHECK_TOL:
        raise DiffusersExportError(f"the converted CLIPTextModel's states differ from t2i's text encoder by {diff:.2e}")
    return diff


def attends_to_padding(encoder: nn.Module | None) -> bool:
    """Whether `encoder`'s mask lets the UNet attend to the padding (all True), as diffusers always does."""
    if encoder is None:
        return False
    try:
        with torch.no_grad():
            return bool(encoder(["a"]).mask.all())
    except Exception:  # noqa: BLE001 - only used to word the README
        return False
