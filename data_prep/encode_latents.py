"""Precompute VAE latents into new shards: every field of each sample is kept and ``latent.npy``
(the scaled posterior mean, float32, C x h x w) is added. One output shard per input shard, written
atomically, so an interrupted run resumes where it stopped (finished shards are skipped).

    python data_prep/encode_latents.py --vae runs/tiny-vae/export --shards data/shapes/train \
        --out data/shapes_latents/train --resolution 32 [--batch 256] [--device cpu]

Train the LDM on them with ``data.array_fields=[latent.npy]`` and ``model.latents_from=batch``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from t2i.data.decode import BadSample, DecodeConfig, decode_image
from t2i.data.manifest import ShardInfo, load_manifest, write_manifest
from t2i.data.tar_reader import read_samples
from t2i.pipelines.autoencoder import load_autoencoder


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for name in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mtime, info.mode = len(fields[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(fields[name]))
    tmp.replace(path)


@torch.no_grad()
def encode_shard(vae, url: str, n: int, cfg: DecodeConfig, batch: int, device: str, out: Path) -> tuple[int, int]:
    kept, skipped, pending = [], 0, []

    def flush():
        if not pending:
            return
        x = torch.stack([img for _, _, img in pending]).to(device).float().div(127.5).sub(1)
        z = vae.encode(x).float().cpu().numpy()
        for (key, fields, _), latent in zip(pending, z):
            kept.append((key, {**fields, "latent.npy": _npy(latent)}))
        pending.clear()

    for raw in read_samples(url, 0, n):
        if raw.error:
            skipped += 1
            continue
        name = next((f for f in cfg.image_fields if f in raw.fields), None)
        try:
            if name is None:
                raise BadSample("no image")
            pending.append((raw.key, raw.fields, decode_image(raw.fields[name], cfg)))
        except BadSample:
            skipped += 1
            continue
        if len(pending) == batch:
            flush()
    flush()
    _write_tar(out, kept)
    return len(kept), skipped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="VAE stage export folder")
    p.add_argument("--shards", required=True, help="manifest.json or the folder holding it")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True, help="image side the VAE was trained at")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    vae = load_autoencoder(args.vae).to(args.device)
    manifest = load_manifest(args.shards)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DecodeConfig(resolution=args.resolution, caption_required=False)
    infos, start = [], time.time()
    for i, shard in enumerate(manifest.shards):
        target = out / Path(shard.url).name
        done = out / (target.name + ".done.json")
        if target.is_file() and done.is_file():
            count = json.loads(done.read_text())["kept"]
            print(f"[{i + 1}/{len(manifest.shards)}] {target.name}: done earlier ({count} samples)")
        else:
            count, skipped = encode_shard(vae, shard.url, shard.num_samples, cfg, args.batch, args.device, target)
            done.write_text(json.dumps({"kept": count, "skipped": skipped}))
            print(f"[{i + 1}/{len(manifest.shards)}] {target.name}: {count} encoded, {skipped} skipped, "
                  f"{time.time() - start:.0f}s")
        infos.append(ShardInfo(str(target), count))
    write_manifest(out, infos, source=str(manifest.source), vae=str(Path(args.vae).resolve()),
                   latent_field="latent.npy")
    print(f"manifest: {out / 'manifest.json'}")


if __name__ == "__main__":
    main()
