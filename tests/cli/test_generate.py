"""`t2i.cli.generate`: PNGs with the prompt in their metadata and a .txt beside each; prompt files in
batches; DDIM interpolation strips."""

from __future__ import annotations

from PIL import Image

from t2i.cli.generate import main, slerp


def test_prompt_file_writes_one_png_and_txt_per_prompt(tiny_ldm_export, tmp_path):
    prompts = ["a large red circle in the top left on a white background",
               "a small blue square in the center on a black background",
               "a large green triangle in the bottom right on a gray background"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    main([f"export={tiny_ldm_export}", f"prompts_file={tmp_path / 'p.txt'}", f"out_dir={out}", "steps=2",
          "batch_size=2", "guidance_scale=2.5"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    for png, prompt in zip(pngs, prompts):
        image = Image.open(png)
        assert image.size == (32, 32) and image.text["prompt"] == prompt
        assert "guidance_scale=2.5" in image.text["settings"]
        assert png.with_suffix(".txt").read_text().strip() == prompt


def test_interpolate_writes_a_strip(tiny_ldm_export, tmp_path):
    main([f"export={tiny_ldm_export}", "prompt=a small yellow circle in the top on a black background",
          f"out_dir={tmp_path}", "mode=interpolate", "frames=3", "steps=2"])
    (strip,) = tmp_path.glob("interpolate-*.png")
    assert Image.open(strip).size == (3 * 32, 32)


def test_slerp_keeps_endpoints_and_norm():
    import torch
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=1e-5)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - (a.norm() + b.norm()) / 2) / a.norm() < 0.1


def test_unknown_option_is_an_error(tmp_path):
    import pytest
    with pytest.raises(SystemExit, match="unknown option"):
        main(["promt=oops"])
