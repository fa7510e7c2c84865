"""Evaluation of generated images: deterministic oracles (shapes), retrieval, FID (Inception from a local file,
and a domain FID on a CLIP stage export trained on the dataset), CLIP score, and the per-system reports."""
