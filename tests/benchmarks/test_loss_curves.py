"""benchmarks/loss_curves.py reads what the trainers' loggers write (TensorBoard events or CSV metrics) and draws
one panel per run."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from t2i_testing import REPO


def _loss_curves():
    spec = importlib.util.spec_from_file_location("loss_curves", REPO / "benchmarks" / "loss_curves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["loss_curves"] = module
    spec.loader.exec_module(module)
    return module


def _log(logger, n=12):
    for step in range(n):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        if step % 4 == 3:
            logger.log_metrics({"val/loss": 0.5 / (step + 1)}, step=step)
    logger.save()
    logger.finalize("success")


def test_tensorboard_and_csv_logs_read_the_same(tmp_path):
    lc = _loss_curves()
    _log(TensorBoardLogger(save_dir=str(tmp_path / "tb"), name="logs", version="", default_hp_metric=False))
    _log(CSVLogger(save_dir=str(tmp_path / "csv"), name="logs", version=""))
    tb, csv = lc.read_scalars(tmp_path / "tb"), lc.read_scalars(tmp_path / "csv")
    assert [s for s, _ in tb["train/loss"]] == list(range(12)) and [s for s, _ in tb["val/loss"]] == [3, 7, 11]
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _ in tb[tag]] == [s for s, _ in csv[tag]]
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in csv[tag]], rel=1e-6)
    out = lc.plot_runs([str(tmp_path / "tb"), str(tmp_path / "csv")], tmp_path / "curves.png")
    assert out.stat().st_size > 1000


def test_smoothing_is_bias_corrected_and_missing_logs_are_an_error(tmp_path):
    lc = _loss_curves()
    assert lc.smoothed([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    assert lc.smoothed([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10.0 * 0.5 / 0.75])
    with pytest.raises(FileNotFoundError, match="no TensorBoard events or metrics.csv"):
        lc.read_scalars(tmp_path)
