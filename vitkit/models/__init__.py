"""Vision Transformer models, built from readable blocks and weight-compatible with timm.

Public surface: the blocks (:class:`PatchEmbedding`, :class:`SelfAttention`, :class:`Mlp`,
:class:`LayerScale`, :class:`TransformerBlock`), the :class:`VisionTransformer` that assembles
them, and the registry (:func:`create_model`, :func:`list_models`, :func:`register_model`).
"""

from .attention import SelfAttention
from .block import LayerScale, Mlp, TransformerBlock
from .patch_embedding import ConvStem, PatchEmbedding
from .position import resample_position_embedding, sincos_2d_position_embedding
from .registry import create_model, list_models, model_config, register_model
from .vision_transformer import VisionTransformer

__all__ = [
    "ConvStem",
    "LayerScale",
    "Mlp",
    "PatchEmbedding",
    "SelfAttention",
    "TransformerBlock",
    "VisionTransformer",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
    "resample_position_embedding",
    "sincos_2d_position_embedding",
]
