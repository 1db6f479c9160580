"""Vision Transformer models, built from readable blocks and weight-compatible with timm.

Public surface: the blocks (:class:`PatchEmbedding`, :class:`SelfAttention`, :class:`Mlp`,
:class:`SwiGLU`, :class:`SwiGLUPacked`, :class:`LayerScale`, :class:`TransformerBlock`,
:class:`AttentionPool`, :class:`RotaryPositionEmbedding`, :class:`RelativePositionBias`), the
:class:`VisionTransformer` that assembles them, the registry (:func:`create_model`,
:func:`list_models`, :func:`register_model`), and :func:`compile_blocks` (regional compilation:
one compiled block reused for all), and :class:`FeatureExtractor` (a ViT as a backbone:
``create_model(..., features_only=True)``).
"""

from .attention import SelfAttention
from .attention_pool import AttentionPool
from .block import DropPath, LayerScale, Mlp, SwiGLU, SwiGLUPacked, TransformerBlock
from .features import FeatureExtractor
from .patch_embedding import ConvStem, PatchEmbedding
from .position import resample_position_embedding, sincos_2d_position_embedding
from .regional_compile import compile_blocks
from .registry import create_model, list_models, model_config, register_model
from .relative_position import RelativePositionBias
from .rope import RotaryPositionEmbedding
from .vision_transformer import VisionTransformer

__all__ = [
    "AttentionPool",
    "ConvStem",
    "DropPath",
    "FeatureExtractor",
    "LayerScale",
    "Mlp",
    "PatchEmbedding",
    "RelativePositionBias",
    "RotaryPositionEmbedding",
    "SelfAttention",
    "SwiGLU",
    "SwiGLUPacked",
    "TransformerBlock",
    "VisionTransformer",
    "compile_blocks",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
    "resample_position_embedding",
    "sincos_2d_position_embedding",
]
