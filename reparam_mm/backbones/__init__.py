"""Backbones (registered in mmengine's root MODELS on import)."""
from .replknet import RepLKNet
from .resnet_doconv import DOResNet, DOResNetV1c
from .unireplknet import UniRepLKNet

__all__ = ['RepLKNet', 'UniRepLKNet', 'DOResNet', 'DOResNetV1c']
