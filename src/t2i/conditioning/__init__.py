"""Conditioning for the denoisers: the `Cond` container, classifier-free-guidance dropout and text encoders.

`Cond`, `CondDropout` and `TextEncoding` import without open_clip; the text encoders (which import open_clip,
a few seconds) are loaded on first access of `OpenClipTokenizer`, `OpenClipTextEncoder` or `ClipImageEncoder`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2i.conditioning.cond import Cond
from t2i.conditioning.dropout import CondDropout
from t2i.conditioning.text_encoding import TextEncoding

if TYPE_CHECKING:
    from t2i.conditioning.clip import ClipImageEncoder
    from t2i.conditioning.text import OpenClipTextEncoder, OpenClipTokenizer

__all__ = ["ClipImageEncoder", "Cond", "CondDropout", "OpenClipTextEncoder", "OpenClipTokenizer", "TextEncoding"]

_LAZY = {"OpenClipTextEncoder", "OpenClipTokenizer"}


def __getattr__(name: str):
    if name in _LAZY:
        from t2i.conditioning import text

        return getattr(text, name)
    if name == "ClipImageEncoder":
        from t2i.conditioning import clip

        return clip.ClipImageEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
