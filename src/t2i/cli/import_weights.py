"""Import Stable Diffusion weights from local files into t2i's formats (nothing is downloaded):

    python -m t2i.cli.import_weights source=/weights/v2-1_512-ema-pruned.safetensors preset=sd/v2 out=runs/sd-v2-import
    python -m t2i.cli.import_weights source=/weights/stable-diffusion-2-1-base preset=sd/v2 out=...   # diffusers folder

`source` is a single-file CompVis/SD checkpoint (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``: a
file holding pickled objects is refused) or a diffusers pipeline folder (``unet/``, ``vae/``, ``text_encoder/``).
`out` receives:

- ``vae/``: a VAE stage export (``model.target.export``), latent scale 0.18215 (or the folder's);
- ``unet.safetensors``: the UNet in t2i's names (``model.denoiser_init``), checked strictly against the preset's
  UNet (`preset`: an experiment name, ``sd/v1`` or ``sd/v2``): a checkpoint of another architecture is an
  error listing the mismatched keys and shapes;
- ``text_encoder.safetensors``: the text tower in open_clip's names (``model.text_encoder.checkpoint_path``);
- ``import.json``: what was written from where, and the overrides to train from it.

``ema=true`` takes a single-file checkpoint's EMA UNet (``model_ema.*``). ``what=unet|vae|text`` imports one part.
open_clip towers need no import: any open_clip architecture's local checkpoint file is read directly
(``model.text_encoder.arch=<name> model.text_encoder.checkpoint_path=<file>``; ``experiment=clip/pretrained``
turns one into a CLIP stage export).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from t2i.cli.config import compose_config
from t2i.interop import sd_unet, sd_unet_io, sd_vae, sd_vae_compvis, sd_vae_io
from t2i.interop.single_file import read_checkpoint, read_diffusers_text_encoder, split_sd_checkpoint
from t2i.nn.autoencoder import AutoencoderKL

PARTS = ("unet", "vae", "text")


def preset_unet_kwargs(preset: str) -> dict:
    """The UNet constructor kwargs of an experiment preset (e.g. ``sd/v2``)."""
    node = OmegaConf.to_container(compose_config([f"experiment={preset}"]).model.denoiser, resolve=True)
    return {k: v for k, v in node.items() if not k.startswith("_")}


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)
    return path


def _read_source(source: Path, ema: bool, unet_kwargs: dict | None) -> dict:
    """{"unet": t2i-named UNet sd, "vae": (model, kwargs, scale), "text": open_clip sd or None}."""
    if source.is_dir():
        if not (source / "unet").is_dir() or not (source / "vae").is_dir():
            raise FileNotFoundError(f"{source} is a folder but not a diffusers pipeline (no unet/ and vae/)")
        unet, _ = sd_unet_io.load_diffusers_unet(source / "unet")
        unet_sd = unet.state_dict()
        if unet_kwargs is not None:  # the strict check against the preset's architecture
            unet_sd = sd_unet.compvis_unet_state_dict(sd_unet.compvis_checkpoint_state_dict(unet_sd), unet_kwargs)
        text = read_diffusers_text_encoder(source / "text_encoder") if (source / "text_encoder").is_dir() else None
        return {"unet": unet_sd, "vae": sd_vae_io.load_diffusers_vae(source / "vae"), "text": text}
    sd = read_checkpoint(source)
    parts = split_sd_checkpoint(sd)
    unet_sd = sd_unet.compvis_unet_state_dict(sd, unet_kwargs, ema=ema)
    vae_sd = sd_vae_compvis.compvis_vae_state_dict(sd)
    vae_kwargs = sd_vae_compvis.autoencoder_kwargs_from_compvis_state_dict(vae_sd)
    vae = AutoencoderKL(**vae_kwargs)
    sd_vae.check_t2i_vae_state_dict(vae_sd, vae_kwargs, str(source))
    vae.load_state_dict(vae_sd, strict=True)
    return {"unet": unet_sd, "vae": (vae.eval(), vae_kwargs, sd_vae.SD_SCALING_FACTOR), "text": parts["text"]}


def import_stable_diffusion(source: str | Path, out: str | Path, preset: str | None = None, ema: bool = False,
                            what: str = "all") -> dict:
    """Write the parts of `source` into `out` (see the module docstring); returns what ``import.json`` records."""
    source, out = Path(source), Path(out)
    if what not in ("all", *PARTS):
        raise ValueError(f"what must be all, unet, vae or text, got {what!r}")
    unet_kwargs = preset_unet_kwargs(preset) if preset else None
    parts = _read_source(source, ema, unet_kwargs)
    written, overrides = {}, []
    if what in ("all", "unet"):
        written["unet"] = str(_save(parts["unet"], out / "unet.safetensors"))
        overrides.append(f"model.denoiser_init={written['unet']}")
    if what in ("all", "vae"):
        model, kwargs, scale = parts["vae"]
        written["vae"] = str(sd_vae_io.write_vae_export(model, kwargs, scale, out / "vae", str(source)))
        overrides.append(f"model.target.export={written['vae']}")
    if what in ("all", "text"):
        if parts["text"] is None:
            if what == "text":
                raise ValueError(f"{source} holds no text encoder")
        else:
            written["text"] = str(_save(parts["text"], out / "text_encoder.safetensors"))
            overrides.append(f"model.text_encoder.checkpoint_path={written['text']}")
    record = {"source": str(source), "preset": preset, "ema": ema, "written": written,
              "train_overrides": ([f"experiment={preset}"] if preset else []) + overrides}
    out.mkdir(parents=True, exist_ok=True)
    (out / "import.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="+", help="source=PATH out=DIR [preset=sd/v1|sd/v2] [ema=true] [what=all]")
    kv = dict(a.split("=", 1) for a in parser.parse_args(argv).args)
    unknown = set(kv) - {"source", "out", "preset", "ema", "what"}
    if unknown or not {"source", "out"} <= set(kv):
        parser.error(f"expected source=PATH out=DIR [preset=] [ema=] [what=], got {sorted(kv)}")
    record = import_stable_diffusion(kv["source"], kv["out"], kv.get("preset"),
                                     kv.get("ema", "false").lower() in ("1", "true", "yes"), kv.get("what", "all"))
    for part, path in record["written"].items():
        print(f"[t2i] {part}: {path}")
    print("[t2i] train from it:  python -m t2i.cli.train " + " ".join(record["train_overrides"]) +
          " data.train_manifest=... data.val_manifest=...")


if __name__ == "__main__":
    main()
