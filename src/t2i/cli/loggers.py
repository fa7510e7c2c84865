"""Logger factories for configs: TensorBoard when it is installed, CSV otherwise."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger


def tensorboard_or_csv(save_dir: str, name: str = "logs") -> Logger:
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX"):
        return TensorBoardLogger(save_dir=save_dir, name=name, version="", default_hp_metric=False)
    return CSVLogger(save_dir=save_dir, name=name, version="")
