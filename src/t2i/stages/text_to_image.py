"""The pixel-space text-to-image stage: the Imagen base model (frozen text encoder) and GLIDE's (text encoder
trained jointly), on the one diffusion path.

Conditioning: the caption's token states for cross-attention and, when the UNet takes a vector, the pooled
text embedding added to the timestep embedding (Saharia et al. 2022, sec. 2.1; GLIDE's final-token
embedding). With a frozen encoder the states may come precomputed in the batch (``text_tokens`` /
``text_mask`` / ``text_pooled``, written by data_prep/encode_text.py), and the encoder then only encodes
sample-grid prompts. Classifier-free guidance: the tokens and the pooled vector are dropped together
(``CondDropout`` joint) to learned nulls.
"""

from __future__ import annotations

from torch import nn

from t2i.stages.diffusion import DiffusionStage


class TextToImageStage(DiffusionStage):
    def __init__(self, denoiser: nn.Module, *, text_encoder: nn.Module, stage_name: str = "base", **kwargs):
        if text_encoder is None:
            raise ValueError("a text-to-image stage needs model.text_encoder")
        vector_dim = getattr(denoiser, "vector_dim", None)
        if vector_dim and vector_dim != text_encoder.pooled_dim:
            raise ValueError(f"incompatible input: the text encoder's pooled embedding is {text_encoder.pooled_dim}-d, "
                             f"the UNet's vector_dim is {vector_dim}")
        super().__init__(denoiser, text_encoder=text_encoder, latents_from="pixels", stage_name=stage_name, **kwargs)
