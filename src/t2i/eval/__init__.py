"""Evaluation of generated images (deterministic oracles, no learned models)."""
