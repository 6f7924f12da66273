"""The UniRepLKNet authors' layer-wise learning-rate decay, as an mmengine optimizer constructor.

mmseg's / mmdet's ``LearningRateDecayOptimizerConstructor`` only accept ConvNeXt / BEiT backbones,
so the authors' downstream recipes (UperNet on ADE20K, Cascade Mask R-CNN on COCO) need their own
grouping, reproduced here from their ``unireplknet_layer_decay_optimizer_constructor.py``.
"""
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

__all__ = ['UniRepLKNetLayerDecayOptimizerConstructor', 'unireplknet_layer_id']


def unireplknet_layer_id(name, num_layers):
    """The authors' layer id of parameter ``name`` (of a model with a ``backbone``).

    Stem 0, stage 0 1, stage 1 and its downsampling 2, stage 2's downsampling 3 and its blocks
    3 + block // 3, stage 3 and its downsampling ``num_layers``; everything else (the output
    norms, neck and heads) ``num_layers + 1``, which keeps the base learning rate.
    """
    parts = name.split('.')
    if name.startswith('backbone.downsample_layers.'):
        return {0: 0, 1: 2, 2: 3}.get(int(parts[2]), num_layers)
    if name.startswith('backbone.stages.'):
        stage, block = int(parts[2]), int(parts[3])
        return {0: 1, 1: 2, 2: 3 + block // 3}.get(stage, num_layers)
    return num_layers + 1


def unireplknet_stage_id(name, num_layers):
    """The authors' ``stage_wise`` id: downsampling layers 0, stage i i + 1, the rest the top."""
    if name.startswith('backbone.downsample_layers.'):
        return 0
    if name.startswith('backbone.stages.'):
        return int(name.split('.')[2]) + 1
    return num_layers + 1


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class UniRepLKNetLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Learning rate ``lr * decay_rate ** (num_layers + 1 - layer_id)`` per parameter, and no
    weight decay for 1-D parameters and biases, as the UniRepLKNet authors train downstream.

    ``paramwise_cfg``: ``num_layers`` (required; 9 for UniRepLKNet-T, 12 for S / B / L / XL in
    their configs), ``decay_rate`` (default 1.0: no decay) and ``decay_type`` (``'layer_wise'``,
    the default, see :func:`unireplknet_layer_id`, or ``'stage_wise'``). Frozen parameters are
    left out. Groups carry ``param_names`` and ``lr_scale`` for inspection.
    """

    keys = ('num_layers', 'decay_rate', 'decay_type')

    def add_params(self, params, module, **kwargs):
        cfg = dict(self.paramwise_cfg or {})
        unknown = sorted(set(cfg) - set(self.keys))
        if 'num_layers' not in cfg or unknown:
            raise ValueError(f'UniRepLKNetLayerDecayOptimizerConstructor needs paramwise_cfg with '
                             f'num_layers (and optionally decay_rate, decay_type); got {cfg}'
                             + (f' with unknown keys {unknown}' if unknown else '') + '.')
        num_layers, rate = cfg['num_layers'], cfg.get('decay_rate', 1.0)
        decay_type = cfg.get('decay_type', 'layer_wise')
        if decay_type not in ('layer_wise', 'stage_wise'):
            raise ValueError(f"decay_type must be 'layer_wise' or 'stage_wise', got "
                             f'{decay_type!r}.')
        layer_id = unireplknet_layer_id if decay_type == 'layer_wise' else unireplknet_stage_id
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.dim() == 1 or name.endswith('.bias')
            lid = layer_id(name, num_layers)
            key = f'layer_{lid}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = rate ** (num_layers + 1 - lid)
                groups[key] = dict(params=[], param_names=[], lr_scale=scale, group_name=key,
                                   lr=scale * self.base_lr)
                if no_decay or self.base_wd is not None:  # else: the optimizer's default
                    groups[key]['weight_decay'] = 0. if no_decay else self.base_wd
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        print_log(f'UniRepLKNetLayerDecayOptimizerConstructor: {decay_type} decay {rate}, '
                  f'num_layers {num_layers}, {len(groups)} parameter groups', logger='current')
        params.extend(groups.values())
