"""Re-parameterisable conv layers (registered in mmengine's root MODELS on import)."""
from .convert import convert_to_doconv, doconv_kinds
from .doconv import DOConv2d, compose_kernel, doconv_identity
from .large_kernel import LargeKernelDWConv2d, large_depthwise_conv2d

__all__ = ['DOConv2d', 'compose_kernel', 'doconv_identity', 'convert_to_doconv', 'doconv_kinds',
           'LargeKernelDWConv2d', 'large_depthwise_conv2d']
