import pytest
import torch
from safetensors.torch import save_file

from t2i.losses.lpips import LPIPS


def lin_state_dict(model: LPIPS) -> dict[str, torch.Tensor]:
    """The linear layers under the ``lpips`` package's key names (inverse of the ``from_files`` mapping)."""
    return {f"lin{i}.model.1.weight": lin.weight.detach().clone() for i, lin in enumerate(model.lins)}


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lpips")
    source = LPIPS()
    vgg_state = {f"features.{k}": v.clone() for k, v in source.features.state_dict().items()}
    vgg_state["classifier.6.bias"] = torch.zeros(10)  # full torchvision files carry classifier.* (ignored)
    lin_state = {k: v.abs() for k, v in lin_state_dict(source).items()}
    torch.save(vgg_state, root / "vgg16.pth")
    torch.save(lin_state, root / "vgg.pth")
    save_file(lin_state, str(root / "lin.safetensors"))
    return root, vgg_state, lin_state


@pytest.fixture(scope="module")
def lpips_model(weight_files):
    root, _, _ = weight_files
    return LPIPS.from_files(root / "vgg16.pth", root / "vgg.pth")


def test_reload_exact_weights(weight_files, lpips_model):
    _, vgg_state, lin_state = weight_files
    assert torch.equal(lpips_model.features[0].weight, vgg_state["features.0.weight"])
    assert torch.equal(lpips_model.features[28].bias, vgg_state["features.28.bias"])
    for key, value in lin_state_dict(lpips_model).items():
        assert torch.equal(value, lin_state[key])


def test_distance_properties(lpips_model):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(lpips_model(x, x), torch.zeros(2))
        d = lpips_model(x, y)
        assert d.shape == (2,) and (d > 0).all()
        assert torch.allclose(d, lpips_model(y, x), rtol=1e-5)
        assert torch.allclose(lpips_model((x + 1) / 2, (y + 1) / 2, normalize=True), d, rtol=1e-4)


def test_frozen_but_differentiable_wrt_input(lpips_model):
    assert not any(p.requires_grad for p in lpips_model.parameters())
    lpips_model.train()
    assert not lpips_model.training
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    lpips_model(x, torch.zeros(1, 3, 32, 32)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_autocast(lpips_model):
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips_model(x, y)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()


def test_safetensors_lin_file(weight_files):
    root, _, _ = weight_files
    model = LPIPS.from_files(root / "vgg16.pth", root / "lin.safetensors")
    x = torch.rand(1, 3, 32, 32)
    assert model(x, x).item() == 0.0


def test_missing_lin_key_is_clear(weight_files, tmp_path):
    root, _, lin_state = weight_files
    partial = {k: v for k, v in lin_state.items() if k != "lin3.model.1.weight"}
    partial["lin9.extra"] = torch.zeros(1)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth") as info:
        LPIPS.from_files(root / "vgg16.pth", tmp_path / "partial.pth")
    assert "lin3.model.1.weight" in str(info.value) and "lin9.extra" in str(info.value)


def test_missing_vgg_key_and_missing_file(weight_files, tmp_path):
    root, vgg_state, _ = weight_files
    torch.save({k: v for k, v in vgg_state.items() if k != "features.5.bias"}, tmp_path / "vgg_bad.pth")
    with pytest.raises(ValueError, match="features.5.bias"):
        LPIPS.from_files(tmp_path / "vgg_bad.pth", root / "vgg.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        LPIPS.from_files(root / "vgg16.pth", tmp_path / "nope.pth")


def test_wrong_shape_is_clear(weight_files, tmp_path):
    root, _, lin_state = weight_files
    bad = dict(lin_state, **{"lin0.model.1.weight": torch.zeros(1, 3, 1, 1)})
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(ValueError, match="size mismatch"):
        LPIPS.from_files(root / "vgg16.pth", tmp_path / "bad_shape.pth")


def test_pickled_object_refused(weight_files, tmp_path):
    root, _, lin_state = weight_files
    marker = tmp_path / "pwned"

    class Payload:  # unpickling this would create `marker`: only weights_only=True refuses it unrun
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save(dict(lin_state, evil=Payload()), tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match=r"refusing to load .*pickled\.pth.*\(loaded with weights_only=True\)"):
        LPIPS.from_files(root / "vgg16.pth", tmp_path / "pickled.pth")
    assert not marker.exists()
    torch.save({"note": "a string, not a tensor"}, tmp_path / "string.pth")
    with pytest.raises(ValueError, match="flat dict of tensors"):
        LPIPS.from_files(root / "vgg16.pth", tmp_path / "string.pth")
