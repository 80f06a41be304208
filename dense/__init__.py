"""dense: dense prediction with U-Nets — segmentation, pose, restoration and the upsampling lab."""

from dense.zoo import ModelError, list_models, load

__all__ = ["ModelError", "list_models", "load"]
__version__ = "0.1.0"
