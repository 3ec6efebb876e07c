"""The three VLV modules, built on transformers and diffusers components."""

from vlv_engine.models.bottleneck import Bottleneck
from vlv_engine.models.caption_decoder import CaptionDecoder
from vlv_engine.models.diffusion import DiffusionDecoder
from vlv_engine.models.encoder import VLVEncoder
from vlv_engine.models.vlv import VLVModel

__all__ = ["Bottleneck", "CaptionDecoder", "DiffusionDecoder", "VLVEncoder", "VLVModel"]
