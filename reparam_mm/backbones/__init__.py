"""Backbones (registered in mmengine's root MODELS on import)."""
from .efficientnet_lite import EfficientNetLite
from .replknet import RepLKNet
from .resnet_doconv import DOResNet, DOResNetV1c
from .unireplknet import UniRepLKNet

__all__ = ['EfficientNetLite', 'RepLKNet', 'UniRepLKNet', 'DOResNet', 'DOResNetV1c']
