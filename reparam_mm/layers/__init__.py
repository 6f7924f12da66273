"""Re-parameterisable conv layers (registered in mmengine's root MODELS on import)."""
from .doconv import DOConv2d, compose_kernel, doconv_identity

__all__ = ['DOConv2d', 'compose_kernel', 'doconv_identity']
