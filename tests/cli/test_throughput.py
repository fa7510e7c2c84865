"""The Throughput callback: FLOPs counted once per input shape and split into the trained network and frozen
encoders, figures logged per window, MFU only against a known peak, and a run's numerics left untouched."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from t2i.callbacks.throughput import Throughput, peak_tflops

pytestmark = pytest.mark.usefixtures("single_thread")

IN, HIDDEN, OUT, FROZEN = 8, 16, 4, 8


class Toy(L.LightningModule):
    """A frozen encoder (Linear 8->8, no grad) feeding a trained two-layer network with dropout."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(IN, FROZEN).requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(FROZEN, HIDDEN), nn.Dropout(0.5), nn.Linear(HIDDEN, OUT))

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            x = self.encoder(batch["x"])
        noise = torch.randn_like(x)  # a random draw per step: the callback must not shift the stream
        return self.net(x + noise).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


class ConvToy(Toy):
    """Convolutions, whose gradients change in the last bits when a dispatch mode counts the live step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 2, 3))

    def training_step(self, batch, batch_idx):
        x = batch["x"].reshape(-1, 2, 2, 2).repeat(1, 1, 4, 4)
        return self.net(x + torch.randn_like(x)).square().mean()


def loader(sizes: list[int]) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(n, IN, generator=g)} for n in sizes]
    return DataLoader(batches, batch_size=None)


def fit(sizes: list[int], callbacks: list, model_class: type = Toy) -> Toy:
    torch.manual_seed(0)
    model = model_class()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(sizes), callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader(sizes))
    return model


def expected_flops(n: int) -> tuple[float, float]:
    """Matmul FLOPs (2·m·k·n each) of one batch: the frozen encoder's forward; the trained network's forward,
    its weight gradients and the input gradient of its second layer (the first layer's input needs none)."""
    frozen = 2 * n * IN * FROZEN
    forward = 2 * n * FROZEN * HIDDEN + 2 * n * HIDDEN * OUT
    backward = 2 * n * FROZEN * HIDDEN + 2 * (2 * n * HIDDEN * OUT)
    return float(forward + backward), float(frozen)


def test_flops_are_counted_once_per_shape_and_split_trained_from_frozen():
    cb = Throughput(every=2)
    fit([4, 4, 6, 4, 6, 4, 4, 4, 4, 4], [cb])
    assert set(cb.flops) == {(("x", ((4, IN),)),), (("x", ((6, IN),)),)}
    assert cb.flops[(("x", ((4, IN),)),)] == expected_flops(4)
    assert cb.flops[(("x", ((6, IN),)),)] == expected_flops(6)


def test_figures_per_window_and_mfu_only_against_a_peak():
    cb = Throughput(every=3)
    fit([4] * 8, [cb])
    assert cb.last["perf/images_per_sec"] > 0 and cb.last["perf/tflops_per_sec"] > 0
    assert cb.last["perf/frozen_tflops_per_sec"] > 0
    assert "perf/mfu" not in cb.last and "perf/peak_memory_gib" not in cb.last  # a CPU: no known peak
    seconds = 3 * 4 / cb.last["perf/images_per_sec"]  # one window: 3 batches of 4 images
    assert cb.last["perf/tflops_per_sec"] == pytest.approx(3 * expected_flops(4)[0] / seconds / 1e12)

    cb = Throughput(every=3, peak_tflops=2.0)
    fit([4] * 8, [cb])
    assert cb.last["perf/mfu"] == pytest.approx(cb.last["perf/tflops_per_sec"] / 2.0)


@pytest.mark.parametrize("model_class", [Toy, ConvToy])
def test_a_run_is_bitwise_the_same_with_and_without_it(model_class):
    sizes = [4, 6, 4, 4, 6, 4]
    cb = Throughput(every=2)
    plain, measured = fit(sizes, [], model_class), fit(sizes, [cb], model_class)
    assert len(cb.flops) == 2 and all(trained > 0 for trained, _ in cb.flops.values())
    for a, b in zip(plain.state_dict().values(), measured.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_peak_table_and_bad_settings():
    assert peak_tflops("NVIDIA H100 80GB HBM3", True) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", True) == 756.0
    assert peak_tflops("NVIDIA H200", False) == 494.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", True) == 312.0
    assert peak_tflops("Some Future GPU", True) is None
    with pytest.raises(ValueError, match="every"):
        Throughput(every=0)
    with pytest.raises(ValueError, match="peak_tflops"):
        Throughput(peak_tflops=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mfu_and_peak_memory_on_a_gpu():
    torch.manual_seed(0)
    cb = Throughput(every=2, peak_tflops=None if "H100" in torch.cuda.get_device_name() else 100.0)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=8, callbacks=[cb],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ConvToy(), loader([4] * 8))
    assert cb.last["perf/mfu"] > 0 and cb.last["perf/peak_memory_gib"] > 0
    cpu = Throughput(every=2)
    fit([4] * 4, [cpu], ConvToy)
    assert cb.flops == cpu.flops  # counted on meta copies: the device and the precision do not change the count
