"""Inference: load stage exports and generate. Nothing here imports Lightning."""
