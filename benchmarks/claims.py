"""The papers' claims measured in miniature on the shapes dataset with the tiny recipes' exports: each claim states
what the paper says and its figure, measures the same comparison here (prompt alignment judged by the shapes
oracle, domain FID on the tiny CLIP export's image features, wall time), and says whether we agree.

    make train-ldm && make train-imagen && make train-unclip && make train-glide   # the exports (runs/...)
    python benchmarks/claims.py --prompts 200 --out docs/claims.md  # writes docs/claims.{md,json} + plots

Claims measured here (``--only`` picks some; ``--merge`` keeps the other claims of an earlier ``--out`` page):

- ``ddim_ddpm``: DDIM (η=0) against DDPM-like ancestral sampling (η=1) over 2/3/5/10/20/50/1000 steps
  (Song et al. 2021, Table 1).
- ``cfg``: the classifier-free guidance scale sweep on seen and unseen combinations (Ho & Salimans 2022).
- ``thresholding``: static against dynamic thresholding at high guidance on the Imagen base (Saharia et al. 2022).
- ``latent_pixel``: the tiny LDM trained for equal wall time on latents and on pixels (Rombach et al. 2022).
- ``noise_augmentation``: the SR stage trained with and without noise-conditioning augmentation (CDM, Imagen).
- ``unclip_prior``: one unCLIP decoder given the caption alone, its CLIP text embedding, or the prior's image
  embedding, on seen and unseen combinations (Ramesh et al. 2022).
- ``classifier_vs_cfg``: classifier guidance against classifier-free guidance on the Imagen base.
- ``frozen_vs_joint``: the Imagen base (frozen CLIP text tower) against the GLIDE base (text encoder trained jointly)
  on unseen combinations (Saharia et al. 2022).

Every row is measured in this run; nothing is copied from earlier reports. Every accuracy carries its 95% Wilson
interval and every domain FID a bootstrap interval over the generated images; each verdict follows the rule written
beside its claim (agrees / does not agree / inconclusive: see claims_common). Domain FID is comparable only within
one claim (same CLIP export, same real images): it is not the Inception FID of the papers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the claims_* modules beside this script

import torch
from claims_common import Claim, Context
from claims_plots import plot_claim
from claims_sampling import cfg, classifier_vs_cfg, ddim_ddpm, frozen_vs_joint, thresholding, unclip_prior
from claims_training import latent_pixel, noise_augmentation

from t2i.eval.fid import ClipImageFeatures
from t2i.eval.shapes import eval_prompts

CLAIMS = {"ddim_ddpm": ddim_ddpm, "cfg": cfg, "thresholding": thresholding, "latent_pixel": latent_pixel,
          "noise_augmentation": noise_augmentation, "unclip_prior": unclip_prior,
          "classifier_vs_cfg": classifier_vs_cfg, "frozen_vs_joint": frozen_vs_joint}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU"


def markdown(claims: list[dict], prompts: int) -> str:
    lines = ["# The papers' claims, measured in miniature", "",
             ("Written by `benchmarks/claims.py`: every row below was measured by that script, each claim in one "
              f"run (its machine, date and wall time under its table). Shapes dataset, the tiny recipes' exports; "
              f"{prompts} prompts of combinations seen in training, and as many of combinations held out of it where "
              f"a claim says (`t2i.eval.shapes.eval_prompts`), judged by the shapes oracle; every accuracy with its "
              f"95% Wilson interval, every domain FID with a bootstrap interval over the generated images; each "
              f"verdict follows the rule written beside its claim before measuring: agrees, does not agree, or "
              f"inconclusive when a difference it needs is inside the intervals. Domain FID = Fréchet "
              "distance of the tiny CLIP export's L2-normalised image embeddings against 2,000 real validation "
              "images (comparable within one claim only, never with the papers' Inception FIDs: see "
              "[metrics](metrics.md)). Regenerate with `make claims` (`benchmarks/claims.py`) after the three recipes "
              "(`make train-ldm train-imagen train-unclip`)."), "",
             "| claim | verdict |", "|---|---|"]
    lines += [f"| [{c['title']}](#{c['key']}) | {c['verdict'].split(':', 1)[0]} |" for c in claims]
    lines.append("")
    missing = [key for key in CLAIMS if key not in {c["key"] for c in claims}]
    if missing:
        lines += [(f"Not measured on this page yet: {', '.join(f'`{k}`' for k in missing)} (run `benchmarks/claims.py "
                  f"--only {' '.join(missing)} --merge` once the recipes they read have been trained)."), ""]
    for c in claims:
        lines += [f'<a id="{c["key"]}"></a>', "", f"## {c['title']}", "", f"**Paper:** {c['paper']}", "",
                  f"**Paper's figure:** {c['figure']}", "",
                  *([f"**Rule:** {c['rule']}", ""] if c.get("rule") else []),
                  "| " + " | ".join(c["columns"]) + " |", "|" + "---|" * len(c["columns"])]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in c["rows"]]
        lines += ["", f"**Measured:** {c['verdict']}", ""]
        if c.get("baseline"):
            floor = "; ".join(f"{fid:.4f} at {res}px" for res, fid in c["baseline"].items())
            lines += [(f"Real-data floor: {prompts} real training images score domain FID {floor} against the same "
                       "validation images (FID's small-sample bias included): a row near it is as close to the real "
                       f"data as {prompts} samples can show."), ""]
        if c.get("plot"):
            lines += [f"![{c['title']}]({c['plot']})", ""]
        lines += [f"*{c.get('machine', '?')}; {c.get('date', '?')}; {c.get('seconds', 0):.0f} s.*", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ldm", default="runs/tiny-ldm/export")
    p.add_argument("--base", default="runs/tiny-imagen-base/export")
    p.add_argument("--sr", default="runs/tiny-imagen-sr/export")
    p.add_argument("--classifier", default="runs/tiny-noisy-classifier/export")
    p.add_argument("--glide-base", default="runs/tiny-glide-base/export", help="frozen_vs_joint: the GLIDE base")
    p.add_argument("--prior", default="runs/tiny-prior/export")
    p.add_argument("--decoder", default="runs/tiny-decoder/export")
    p.add_argument("--clip", default="runs/tiny-clip/export")
    p.add_argument("--val", default="data/shapes/val")
    p.add_argument("--train", default="data/shapes/train", help="training shards of the claims that train")
    p.add_argument("--work", default="runs/claims", help="run folders of the claims that train")
    p.add_argument("--minutes", type=float, default=5.0, help="latent_pixel: training wall time of each model")
    p.add_argument("--prompts", type=int, default=300, help="prompts per row (and per split where a claim has two)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cuda: sample and train the training claims on one GPU")
    p.add_argument("--only", nargs="*", choices=sorted(CLAIMS), default=None)
    p.add_argument("--merge", action="store_true", help="keep the claims of an existing --out JSON not run now")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--replot", action="store_true", help="only redraw the plots and the page from the --out JSON "
                   "(e.g. after a GPU run on a machine without matplotlib)")
    p.add_argument("--out", default="docs/claims.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    record_path = out.with_suffix(".json")
    kept = {}
    if args.replot:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        fields = set(Claim.__dataclass_fields__)
        for c in record["claims"]:
            c["plot"] = plot_claim(Claim(**{k: v for k, v in c.items() if k in fields}),
                                   out.parent / "images" / f"claims_{c['key']}.png", out.parent)
        write_page(out, record["claims"], record["prompts"])
        print(f"[claims] redrew {len(record['claims'])} plots and {out}")
        return
    if args.merge and record_path.exists():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        if old.get("prompts") != args.prompts:
            raise SystemExit(f"--merge: {record_path} was measured on {old.get('prompts')} prompts, not "
                             f"{args.prompts}")
        kept = {c["key"]: c for c in old["claims"]}
    torch.manual_seed(args.seed)
    ctx = Context(eval_prompts(args.prompts, "seen"), eval_prompts(args.prompts, "unseen"), args.val, args.train,
                  ClipImageFeatures(args.clip), args.batch_size, args.seed, args.work, args.device)
    paths = {"ldm": args.ldm, "base": args.base, "sr": args.sr, "classifier": args.classifier,
             "prior": args.prior, "decoder": args.decoder, "glide_base": args.glide_base}
    for key in args.only or list(CLAIMS):
        start = time.time()
        claim: Claim = CLAIMS[key](ctx, work=args.work, minutes=args.minutes, **paths)
        claim.seconds = time.time() - start
        claim.baseline = ctx.real_baseline()  # at this claim's resolutions (real statistics are shared)
        record = {**claim.__dict__, "machine": machine(), "date": time.strftime("%Y-%m-%d")}
        if not args.no_plots:
            record["plot"] = plot_claim(claim, out.parent / "images" / f"claims_{key}.png", out.parent)
        kept[key] = record
        print(f"[claims] {key}: {claim.seconds:.0f} s — {claim.verdict}", flush=True)
        write_page(out, [kept[k] for k in CLAIMS if k in kept], args.prompts)  # after each claim: a later
        # claim's failure keeps the ones measured before it
    print(f"[claims] wrote {out} and {record_path}")


def write_page(out: Path, claims: list[dict], prompts: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(claims, prompts) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"prompts": prompts, "claims": claims}, indent=1, default=str)
                                        + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
