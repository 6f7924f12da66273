"""An RPN head whose 3x3 conv honours ``conv_cfg``, so DO-Conv can be switched on in the RPN."""
from mmcv.cnn import ConvModule, build_conv_layer
from mmdet.models.dense_heads import RPNHead
from mmengine.registry import MODELS
from torch import nn

__all__ = ['ConvCfgRPNHead']


@MODELS.register_module()
class ConvCfgRPNHead(RPNHead):
    """mmdet's ``RPNHead`` with ``conv_cfg`` for its 3x3 conv(s) (mmdet 3.3.0 hard-codes Conv2d).

    Args:
        conv_cfg (dict, optional): config of the 3x3 conv(s), e.g. ``dict(type='DOConv')``.
            None builds exactly ``RPNHead`` (same modules, same state-dict keys).
        **kwargs: everything ``RPNHead`` takes (in_channels, num_convs, anchor_generator, ...).

    The 1x1 ``rpn_cls`` / ``rpn_reg`` predictors stay ``nn.Conv2d``. A DO-Conv ``rpn_conv`` keeps
    its own init (Kaiming, D = 0): the head's ``Normal(layer='Conv2d')`` init does not match it.
    """

    def __init__(self, *args, conv_cfg=None, **kwargs):
        self.conv_cfg = conv_cfg  # read by _init_layers, which the parent __init__ calls
        super().__init__(*args, **kwargs)

    def _init_layers(self):
        super()._init_layers()
        if self.conv_cfg is None:
            return
        if self.num_convs > 1:
            self.rpn_conv = nn.Sequential(*[
                ConvModule(self.in_channels if i == 0 else self.feat_channels, self.feat_channels,
                           3, padding=1, conv_cfg=self.conv_cfg, inplace=False)
                for i in range(self.num_convs)])
        else:
            self.rpn_conv = build_conv_layer(self.conv_cfg, self.in_channels, self.feat_channels,
                                             3, padding=1)
