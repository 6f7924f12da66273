"""Backbones (registered in mmengine's root MODELS on import)."""
from .replknet import RepLKNet
from .resnet_doconv import DOResNet, DOResNetV1c

__all__ = ['RepLKNet', 'DOResNet', 'DOResNetV1c']
