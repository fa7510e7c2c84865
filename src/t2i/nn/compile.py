"""``torch.compile`` of the trained denoiser (the config's ``compile`` group).

Two scopes:

- ``denoiser``: the whole network as one graph. The UNet's forward has no graph break (a test counts them),
  so one training step is one forward graph and one backward graph.
- ``blocks``: each UNet block (every ``EmbedSequential``: input, middle and output blocks) as its own graph,
  the glue between them eager. Shorter compiles, and the way to combine compile with per-block activation
  checkpointing or per-block FSDP sharding.

Both compile in place (``nn.Module.compile``): parameter names, checkpoints, the EMA copy (made before the
compile, so sampling stays eager) and exports are the same as without it.

Graphs are specialised to their input shapes (``dynamic: false``): every bucket shape (``data.buckets``) is one
graph per compiled module, plus one where the network runs in another mode (validation without gradients, a
smaller last batch). All blocks share one code object (``EmbedSequential.forward``), and Dynamo counts its
recompile limit per code object, 8 by default: the per-block scope would fall back to eager after the first
eight blocks. So the limit is raised to (compiled modules) x (shapes + 2).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from t2i.nn.unet import unet_blocks

log = logging.getLogger("t2i.compile")

SCOPES = ("denoiser", "blocks")


def compile_network(network: nn.Module, scope: str, *, shapes: int = 1, backend: str = "inductor",
                    mode: str | None = None, dynamic: bool | None = False, fullgraph: bool = False,
                    recompile_limit: int | None = None) -> int:
    """Compile ``network`` in place at ``scope``; return the Dynamo recompile limit it set.

    ``shapes`` is how many input shapes training will feed (the number of buckets)."""
    if scope not in SCOPES:
        raise ValueError(f"compile.scope must be one of {SCOPES} or null, got {scope!r}")
    if shapes < 1:
        raise ValueError(f"shapes must be >= 1, got {shapes}")
    if scope == "denoiser":
        modules, graphs_per_shape = [network], 1
    else:
        modules = unet_blocks(network)
        if not modules:
            raise ValueError(f"compile.scope=blocks: {type(network).__name__} has no UNet blocks (EmbedSequential); "
                             f"use compile.scope=denoiser")
        graphs_per_shape = len(modules)  # measured: blocks of equal structure do not share a graph
    # the last batch of an epoch and validation (no gradients, eval mode) are the "+ 2"
    limit = recompile_limit or max(8, graphs_per_shape * (shapes + 2))
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, limit)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * limit)
    options = {"backend": backend, "dynamic": dynamic, "fullgraph": fullgraph}
    if mode is not None:
        options["mode"] = mode
    for module in modules:
        module.compile(**options)
    log.info("torch.compile (%s, backend %s): %d module(s), up to %d graphs per input shape, %d shape(s); "
             "recompile limit %d", scope, backend, len(modules), graphs_per_shape, shapes, limit)
    return limit


def compile_from_config(model: nn.Module, cfg: Mapping | None, shapes: int = 1) -> int | None:
    """Apply the run config's ``compile`` group to the stage's trained denoiser (``model.net["denoiser"]``)."""
    if not cfg or not cfg.get("scope"):
        return None
    net = getattr(model, "net", None)
    if not isinstance(net, nn.ModuleDict) or "denoiser" not in net:
        raise ValueError(f"compile.scope={cfg['scope']}: the {getattr(model, 'stage_name', type(model).__name__)!r} "
                         f"stage has no denoiser to compile (compile applies to the diffusion stages)")
    return compile_network(net["denoiser"], cfg["scope"], shapes=shapes, backend=cfg.get("backend", "inductor"),
                           mode=cfg.get("mode"), dynamic=cfg.get("dynamic", False),
                           fullgraph=bool(cfg.get("fullgraph", False)), recompile_limit=cfg.get("recompile_limit"))
