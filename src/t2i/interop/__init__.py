"""Weight interop with the wider ecosystem: Stable Diffusion single-file (CompVis) checkpoints and diffusers
folders, mapped onto this repository's networks and back. Pure functions over state dicts and local files;
nothing is downloaded and nothing here imports Lightning or diffusers."""
