"""vitkit: Vision Transformers you can read, train, fine-tune and explain."""

from vitkit.models import VisionTransformer, create_model, list_models

__version__ = "0.1.0"

__all__ = ["VisionTransformer", "__version__", "create_model", "list_models"]
