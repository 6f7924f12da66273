"""Every config under configs/ (but ``_base_``, ``demo``, ``efficientnet``) loads, is named honestly, builds.

The list is globbed, so a new config is tested without touching this file. Names follow
OpenMMLab's ``{algorithm}_{backbone}[_{components}]_{[N]xb[B]-}[extras-]{schedule}_{dataset}[-crop]``
and are checked against the config's contents: batch per GPU, schedule length, crop, dataset,
where DO-Conv sits (``{algorithm}-doconv`` = every conv outside the backbone,
``r50-doconv-c3-c5`` = ResNet stages 2-4) and which RepLKNet arch is used.

Models are built in their scope on the ``meta`` device with every ``Pretrained`` init removed:
shapes and module types without allocating or initialising weights, so the full-size models
(RepLKNet-XL has 335M parameters) load and build in about a second each.
"""
import copy
import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import import_ecosystem
from mmengine.config import Config, ConfigDict

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / 'configs'
NOT_TESTED_HERE = ('_base_', 'demo', 'efficientnet')  # demo configs are tested with the demo,
# the small-scale EfficientNet-Lite ones (CamVid, coco128) in tests/test_real_data_configs.py
CONFIGS = sorted(
    p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.rglob('*.py')
    if p.relative_to(CONFIG_DIR).parts[0] not in NOT_TESTED_HERE)

# What the issue asks for; the names say algorithm, backbone, batch, schedule, dataset, crop.
REQUIRED = [
    'replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py',
    'replknet/upernet_replknet-31b-in22k-pre_64xb2-40k_ade20k-640x640.py',
    'replknet/upernet_replknet-31l-in22k-pre_64xb1-80k_ade20k-640x640.py',
    'replknet/upernet_replknet-xl-megdata73m-pre_16xb2-160k_ade20k-640x640.py',
    'replknet/upernet_replknet-31b-in1k-pre_32xb2-20k_cityscapes-769x769.py',
    'replknet/upernet_replknet-31b-in1k-pre_4xb4-40k_voc12aug-512x512.py',
    'replknet/faster-rcnn_replknet-31b-in1k-pre_fpn_8xb2-1x_coco.py',
    'replknet/cascade-rcnn_replknet-31b-in1k-pre_fpn_8xb2-1x_coco.py',
    'replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-ms-crop-3x_coco.py',
    'unireplknet/upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py',
    'unireplknet/upernet_unireplknet-s-in1k-pre_8xb2-160k_ade20k-512x512.py',
    'unireplknet/upernet_unireplknet-b-in22k-pre_8xb2-160k_ade20k-640x640.py',
    'unireplknet/upernet_unireplknet-l-in22k-pre_8xb2-160k_ade20k-640x640.py',
    'unireplknet/upernet_unireplknet-xl-in22k-pre_8xb2-160k_ade20k-640x640.py',
] + [
    f'unireplknet/cascade-mask-rcnn_unireplknet-{arch}-pre_fpn_4conv1fc-giou_{settings}_coco.py'
    for arch in ('s-in1k', 'l-in22k') for settings in ['8xb2-ms-crop-3x']
] + [
    f'doconv/{algo}_{backbone}_{rest}'
    for base in ('4xb4-160k_ade20k-512x512.py', '4xb2-80k_cityscapes-512x1024.py',
                 '4xb4-40k_voc12aug-512x512.py')
    for algo, backbone, rest in [('upernet', 'r50', base), ('upernet', 'r50-doconv-c3-c5', base),
                                 ('upernet-doconv', 'r50', base),
                                 ('upernet-doconv', 'r50-doconv-c3-c5', base)]
] + [
    f'doconv/{name}'
    for det in ('faster-rcnn', 'cascade-rcnn')
    for name in (f'{det}_r50_fpn_1x_coco.py', f'{det}_r50_fpn_4conv1fc_1x_coco.py',
                 f'{det}_r50-doconv-c3-c5_fpn_1x_coco.py',
                 f'{det}-doconv_r50_fpn_4conv1fc_1x_coco.py',
                 f'{det}-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py')
] + [  # DO-Conv on backbones not written for it (WithDOConv), beside their plain baselines
    f'doconv/{algo}_{backbone}{doconv}_{rest}' for doconv in ('', '-doconv')
    for algo, backbone, rest in [
        ('deeplabv3plus', 'mobilenet-v2-d8', '4xb2-80k_cityscapes-512x1024.py'),
        ('faster-rcnn', 'regnetx-3.2GF', 'fpn_1x_coco.py')]
] + [  # mmpretrain's re-parameterisable backbones (need mmpretrain: parsed only without it)
    f'mmpretrain/{algo}_{backbone}_{rest}' for backbone in ('repvgg-A0', 'mobileone-s0')
    for algo, rest in [('upernet', '4xb4-160k_ade20k-512x512.py'),
                       ('faster-rcnn', 'fpn_1x_coco.py')]
]
# backbone in the name (without '-doconv') -> its type, for configs other than ResNet / RepLKNet
OTHER_BACKBONES = {'mobilenet-v2-d8': 'MobileNetV2', 'regnetx-3.2GF': 'RegNet',
                   'repvgg-A0': 'mmpretrain.RepVGG', 'mobileone-s0': 'mmpretrain.MobileOne'}

DATASETS = {  # dataset in the name -> (scope, dataset type, classes)
    'ade20k': ('mmseg', 'ADE20KDataset', 150),
    'cityscapes': ('mmseg', 'CityscapesDataset', 19),
    'voc12aug': ('mmseg', 'PascalVOCDataset', 21),
    'coco': ('mmdet', 'CocoDataset', 80),
}
SETTINGS = re.compile(r'^(?:(?P<gpus>\d+)xb(?P<batch>\d+)-)?(?:(?P<extra>[a-z0-9-]+)-)?'
                      r'(?P<schedule>\d+k|\d+x)$')
REPLKNET = {  # name -> (arch, stage channels, backbone parameters in millions)
    # parameters: the authors' ImageNet model (31B 79M, 31L 172M, XL 335M) minus its classifier
    '31b': ('31B', (128, 256, 512, 1024), 79 - 1.0),
    '31l': ('31L', (192, 384, 768, 1536), 172 - 1.5),
    'xl': ('XL', (256, 512, 1024, 2048), 335 - 2.0),
}
UNIREPLKNET = {  # name -> (arch, stage channels, backbone parameters: the authors' downstream
    # model (norm0..3, no classifier), counted from their code, tests/test_unireplknet.py)
    't': ('T', (80, 160, 320, 640), 31_053_540),
    's': ('S', (96, 192, 384, 768), 55_689_048),
    'b': ('B', (128, 256, 512, 1024), 98_066_208),
    'l': ('L', (192, 384, 768, 1536), 218_541_744),
    'xl': ('XL', (256, 512, 1024, 2048), 386_645_568),
}
# Whole-model parameters (millions) the authors report for these set-ups (their README).
REPORTED_PARAMS = {
    'replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py': 112,
    'replknet/upernet_replknet-31b-in22k-pre_64xb2-40k_ade20k-640x640.py': 112,
    'replknet/upernet_replknet-31l-in22k-pre_64xb1-80k_ade20k-640x640.py': 207,
    'replknet/upernet_replknet-xl-megdata73m-pre_16xb2-160k_ade20k-640x640.py': 374,
    'replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-ms-crop-3x_coco.py':
    137,
}
# UniRepLKNet's reported counts are of the fused (deploy) inference model, auxiliary head left out.
UNIREPLKNET_REPORTED_PARAMS = {  # config stem prefix -> millions
    'upernet_unireplknet-t': 61, 'upernet_unireplknet-s': 86, 'upernet_unireplknet-b': 130,
    'upernet_unireplknet-l': 254, 'upernet_unireplknet-xl': 425,
    'cascade-mask-rcnn_unireplknet-s': 113, 'cascade-mask-rcnn_unireplknet-l': 276,
}
# DO-Conv layers outside the backbone when the algorithm is '-doconv': UperNet's 12 ConvModules
# (4 PPM, 3 lateral, 3 FPN, 2 bottlenecks) + 1 FCN conv; FPN's 4 lateral + 4 output convs + the
# RPN conv + 4 shared convs per RoI box head (1 stage for Faster, 3 for Cascade R-CNN).
HEAD_DOCONVS = {'upernet': 13, 'faster-rcnn': 8 + 1 + 4, 'cascade-rcnn': 8 + 1 + 3 * 4}


@pytest.fixture(scope='module', autouse=True)
def _read_package_metafiles_once():
    """mmengine re-reads all ~200 metafiles of mmseg / mmdet for every ``mmseg::`` base it
    resolves (about 0.6 s each); cache those YAML reads so the configs load in seconds."""
    import mmengine.config.utils as cfg_utils
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cfg_utils, 'load', functools.lru_cache(maxsize=None)(cfg_utils.load))
        yield


@functools.lru_cache(maxsize=None)
def _load(rel):
    # mmpretrain configs import mmpretrain.models, which needs torchvision: read them without
    return Config.fromfile(str(CONFIG_DIR / rel),
                           import_custom_modules=not rel.startswith('mmpretrain/'))


def load(rel):
    return copy.deepcopy(_load(rel))


def parse_name(rel):
    """Fields of an OpenMMLab config name; fails the test on a name that does not follow it."""
    stem = Path(rel).stem
    parts = stem.split('_')
    assert len(parts) >= 4, f'{rel}: expected algorithm_backbone[_parts]_settings_dataset'
    dataset, _, crop = parts[-1].partition('-')
    settings = SETTINGS.match(parts[-2])
    assert settings, f'{rel}: training settings {parts[-2]!r} are not [NxbB-][extras-]schedule'
    algo, backbone = parts[0], parts[1]
    return dict(
        algo=algo.removesuffix('-doconv'), head_doconv=algo.endswith('-doconv'),
        backbone=backbone, backbone_doconv=backbone.endswith('-doconv-c3-c5'),
        components=parts[2:-2], dataset=dataset, crop=crop, **settings.groupdict())


def pretrained_inits(obj):
    """Every ``init_cfg`` of type Pretrained in a (nested) config."""
    found = []
    if isinstance(obj, dict):
        cfgs = obj.get('init_cfg')
        for c in cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(c, dict) and c.get('type') == 'Pretrained':
                found.append(c)
        for v in obj.values():
            found += pretrained_inits(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found += pretrained_inits(v)
    return found


def without_pretrained(obj):
    """Copy of a model config with every Pretrained init_cfg (and ``pretrained``) set to None."""
    if isinstance(obj, dict):
        out = {k: without_pretrained(v) for k, v in obj.items()}
        if 'pretrained' in out:
            out['pretrained'] = None
        if pretrained_inits({'init_cfg': out.get('init_cfg')}):
            out['init_cfg'] = None
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(without_pretrained(v) for v in obj)
    return obj


def test_required_configs_exist():
    missing = [r for r in REQUIRED if r not in CONFIGS]
    assert not missing, f'configs the issue asks for are missing: {missing}'


def test_pretrained_helper_removes_every_pretrained_init():
    cfg = dict(pretrained='x.pth', backbone=dict(init_cfg=dict(type='Pretrained', checkpoint='a')),
               heads=[dict(init_cfg=[dict(type='Pretrained', checkpoint='b')]),
                      dict(init_cfg=dict(type='Normal', std=0.01))])
    out = without_pretrained(cfg)
    assert pretrained_inits(cfg) and not pretrained_inits(out)
    assert out['pretrained'] is None and out['heads'][1]['init_cfg']['type'] == 'Normal'


@pytest.mark.parametrize('rel', CONFIGS)
def test_config_loads_and_matches_its_name(rel):
    cfg = load(rel)
    name = parse_name(rel)
    scope, dataset_type, num_classes = DATASETS[name['dataset']]
    assert cfg.default_scope == scope

    # every config: our layers imported, fused model validated
    assert 'reparam_mm' in cfg.custom_imports['imports']
    assert cfg.custom_imports.get('allow_failed_imports') is False
    assert [h['type'] for h in cfg.custom_hooks].count('FusedEvalHook') == 1

    # pretrained weights: local files (config values), never downloads
    model = cfg.model
    assert model.get('pretrained') is None
    inits = pretrained_inits(model.to_dict())
    assert inits, f'{rel}: no Pretrained init (every config here fine-tunes ImageNet weights)'
    for init in inits:
        assert '://' not in init['checkpoint'], f'{rel}: {init} would download'
        assert init['checkpoint'] == cfg.checkpoint_file

    # batch per GPU, schedule, crop and dataset as the name says
    if name['batch']:
        assert cfg.train_dataloader.batch_size == int(name['batch'])
    schedule = name['schedule']
    if schedule.endswith('k'):
        max_iters = int(schedule[:-1]) * 1000
        assert cfg.train_cfg.max_iters == max_iters
        assert max(s['end'] for s in cfg.param_scheduler) == max_iters
    else:
        assert cfg.train_cfg.max_epochs == 12 * int(schedule[:-1])
    dataset = cfg.train_dataloader.dataset
    types = {d['type'] for d in dataset.get('datasets', [dataset])}
    assert types == {dataset_type}
    if name['crop']:
        crop = tuple(int(v) for v in name['crop'].split('x'))
        assert tuple(cfg.crop_size) == crop and tuple(model.data_preprocessor.size) == crop
        crops = [t for t in cfg.train_dataloader.dataset.get('pipeline', cfg.train_pipeline)
                 if t['type'] == 'RandomCrop']
        assert [tuple(t['crop_size']) for t in crops] == [crop]

    # classes and DO-Conv placement as the name says
    heads = [model.decode_head, model.auxiliary_head] if scope == 'mmseg' else (
        [model.roi_head.bbox_head] if isinstance(model.roi_head.bbox_head, dict)
        else list(model.roi_head.bbox_head))
    assert {h.num_classes for h in heads} == {num_classes}
    conv_cfgs = [h.get('conv_cfg') for h in heads]
    if scope == 'mmdet':
        conv_cfgs += [model.neck.get('conv_cfg'), model.rpn_head.get('conv_cfg')]
        assert (model.rpn_head.type == 'ConvCfgRPNHead') == name['head_doconv']
    expected = dict(type='DOConv') if name['head_doconv'] else None
    assert conv_cfgs == [expected] * len(conv_cfgs)
    if '4conv1fc' in name['components'] or '4conv1fc-giou' in name['components']:
        assert {h.type for h in heads} <= {'Shared4Conv1FCBBoxHead', 'ConvFCBBoxHead'}
        assert all(h.get('num_shared_convs', 4) == 4 for h in heads)

    backbone = model.backbone
    if name['backbone'].startswith('replknet-'):
        arch, channels, _ = REPLKNET[name['backbone'].split('-')[1]]
        assert backbone.type == 'RepLKNet' and backbone.arch == arch
        assert backbone.with_cp and backbone.norm_cfg['type'] == 'SyncBN'
        assert not backbone.get('small_kernel_merged', False)
        assert backbone.get('norm_intermediate_features', False) == (arch == 'XL')
        in_channels = model.decode_head.in_channels if scope == 'mmseg' else model.neck.in_channels
        assert list(in_channels) == list(channels)
        if scope == 'mmseg':
            assert model.auxiliary_head.in_channels == channels[2]
        if arch == 'XL':  # its MegData-73M pretraining normalised with mean = std = 127.5
            assert model.data_preprocessor.mean == model.data_preprocessor.std == [127.5] * 3
    elif name['backbone'].startswith('unireplknet-'):
        arch, channels, _ = UNIREPLKNET[name['backbone'].split('-')[1]]
        assert backbone.type == 'UniRepLKNet' and backbone.arch == arch
        assert backbone.norm_cfg['type'] == 'SyncBN' and not backbone.small_kernel_merged
        assert tuple(backbone.out_indices) == (0, 1, 2, 3)
        in_channels = model.decode_head.in_channels if scope == 'mmseg' else model.neck.in_channels
        assert list(in_channels) == list(channels)
        if scope == 'mmseg':
            assert model.auxiliary_head.in_channels == channels[2]
    elif name['backbone'].removesuffix('-doconv') in OTHER_BACKBONES:
        plain_type = OTHER_BACKBONES[name['backbone'].removesuffix('-doconv')]
        if name['backbone'].endswith('-doconv'):  # the plain baseline's backbone, converted
            assert backbone.type == 'WithDOConv' and backbone.doconv_cfg == dict(type='DOConv')
            assert backbone.module == load(rel.replace('-doconv', '')).model.backbone
            assert backbone.module.type == plain_type
        else:
            assert backbone.type == plain_type
    else:
        assert name['backbone'] in ('r50', 'r50-doconv-c3-c5')
        resnet = 'ResNetV1c' if scope == 'mmseg' else 'ResNet'
        if name['backbone_doconv']:
            assert backbone.type == 'DO' + resnet
            assert tuple(backbone.stage_with_doconv) == (False, True, True, True)
            assert backbone.doconv_cfg == dict(type='DOConv')
        else:
            assert backbone.type == resnet and 'stage_with_doconv' not in backbone


def test_replknet_recipes_follow_the_authors():
    """The numbers the README quotes come from these recipes; keep them the authors'."""
    for rel in CONFIGS:
        if not rel.startswith('replknet/upernet'):
            continue
        cfg = load(rel)
        optim = cfg.optim_wrapper
        assert optim.optimizer.type == 'AdamW' and optim.optimizer.betas == (0.9, 0.999)
        assert optim.optimizer.weight_decay == 0.05 and optim.paramwise_cfg.norm_decay_mult == 0
        warmup, poly = cfg.param_scheduler
        assert warmup.type == 'LinearLR' and poly.type == 'PolyLR' and poly.power == 1.0
        assert poly.begin == warmup.end and poly.eta_min == 0
        m = cfg.model
        assert m.decode_head.channels == 512 and tuple(m.decode_head.pool_scales) == (1, 2, 3, 6)
        assert m.auxiliary_head.type == 'FCNHead' and m.auxiliary_head.in_index == 2
        assert m.auxiliary_head.loss_decode.loss_weight == 0.4
        pretrain = rel.split('_')[1].split('-')[2]
        assert m.backbone.drop_path_rate == {'in1k': 0.5, 'in22k': 0.3, 'megdata73m': 0.5}[pretrain]
        if 'cityscapes' in rel:
            assert m.decode_head.align_corners and m.auxiliary_head.align_corners
            assert m.test_cfg.mode == 'whole'
        elif '640x640' in rel:
            assert m.test_cfg.mode == 'slide' and tuple(m.test_cfg.crop_size) == (640, 640)
        gpus, batch = re.search(r'_(\d+)xb(\d+)-(\d+)k_', rel).groups()[:2]
        if 'ade20k' in rel:  # as many images as the authors' default 160k iterations x 32
            assert int(gpus) * int(batch) * cfg.train_cfg.max_iters == 160000 * 32
        assert (optim.optimizer.lr == 2e-4) != ('voc12aug' in rel)
    mask = load('replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-'
                'ms-crop-3x_coco.py')
    assert mask.optim_wrapper.optimizer.lr == 4e-4 and mask.model.backbone.drop_path_rate == 0.6
    assert [s.get('milestones') for s in mask.param_scheduler] == [None, [27, 33]]
    assert {h.loss_bbox.type for h in mask.model.roi_head.bbox_head} == {'GIoULoss'}


# The authors' downstream configs (AILab-CVC/UniRepLKNet segmentation/ and detection/configs):
# name -> (drop_path, with_cp, layer-wise lr decay rate, its num_layers, checkpoint file).
# XL on ADE20K has no published config: ours reuses L's recipe (see the config's header).
UNIREPLKNET_RECIPES = {
    'upernet_unireplknet-t': (0.2, False, 1.0, 9, 'unireplknet_t_in1k_224_acc83.21.pth'),
    'upernet_unireplknet-s': (0.3, True, 0.9, 12, 'unireplknet_s_in1k_224_acc83.91.pth'),
    'upernet_unireplknet-b': (0.3, True, 0.9, 12, 'unireplknet_b_in22k_to_in1k_384_acc87.40.pth'),
    'upernet_unireplknet-l': (0.4, True, 0.85, 12, 'unireplknet_l_in22k_to_in1k_384_acc87.88.pth'),
    'upernet_unireplknet-xl': (0.4, True, 0.85, 12,
                               'unireplknet_xl_in22k_to_in1k_384_acc87.96.pth'),
    'cascade-mask-rcnn_unireplknet-s': (0.5, True, 0.8, 12, 'unireplknet_s_in1k_224_acc83.91.pth'),
    'cascade-mask-rcnn_unireplknet-l': (0.7, True, 0.7, 12,
                                        'unireplknet_l_in22k_to_in1k_384_acc87.88.pth'),
}


@pytest.mark.parametrize('rel', [r for r in CONFIGS if r.startswith('unireplknet/')])
def test_unireplknet_recipes_follow_the_authors(rel):
    """The numbers the README quotes come from these recipes; keep them the authors'."""
    cfg = load(rel)
    stem = rel.split('/')[1].split('-in')[0]
    drop_path, with_cp, decay_rate, num_layers, ckpt = UNIREPLKNET_RECIPES[stem]
    m, optim = cfg.model, cfg.optim_wrapper
    assert m.backbone.drop_path_rate == drop_path and m.backbone.with_cp == with_cp
    assert cfg.checkpoint_file.endswith('/' + ckpt)
    assert optim.constructor == 'UniRepLKNetLayerDecayOptimizerConstructor'
    assert optim.paramwise_cfg == dict(decay_rate=decay_rate, decay_type='layer_wise',
                                       num_layers=num_layers)
    assert optim.optimizer == dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    assert cfg.train_dataloader.batch_size == 2  # x 8 GPUs, as theirs
    if cfg.default_scope == 'mmseg':
        warmup, poly = cfg.param_scheduler
        assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 1e-6, 1500)
        assert (poly.type, poly.power, poly.eta_min, poly.begin) == ('PolyLR', 1.0, 0.0, 1500)
        assert m.test_cfg.mode == 'whole' and m.decode_head.channels == 512
        assert m.auxiliary_head.in_index == 2 and m.auxiliary_head.loss_decode.loss_weight == 0.4
        scale = (2560, 640) if '640x640' in rel else (2048, 512)
        test = cfg.test_dataloader.dataset.pipeline
        assert [t['type'] for t in test] == ['LoadImageFromFile', 'Resize', 'ResizeToMultiple',
                                             'LoadAnnotations', 'PackSegInputs']
        assert tuple(test[1]['scale']) == scale and test[2]['size_divisor'] == 32
        train = {t['type']: t for t in cfg.train_dataloader.dataset.pipeline}
        assert tuple(train['RandomResize']['scale']) == scale
        assert cfg.default_hooks.checkpoint.save_best == 'mIoU'
        assert cfg.train_cfg.val_interval == 4000
    else:
        warmup, step = cfg.param_scheduler
        assert (warmup.type, warmup.start_factor, warmup.end) == ('LinearLR', 0.001, 500)
        assert step.milestones == [27, 33] and cfg.train_cfg.max_epochs == 36
        heads = m.roi_head.bbox_head
        assert {h.loss_bbox.type for h in heads} == {'GIoULoss'}
        assert all(h.reg_decoded_bbox and h.norm_cfg['type'] == 'SyncBN' for h in heads)
        ema = [h for h in cfg.custom_hooks if h['type'] == 'EMAHook']
        if '-l-' in rel:  # their ExpMomentumEMAHook(momentum=0.0001), before the fused eval
            assert ema == [dict(type='EMAHook', ema_type='ExpMomentumEMA', momentum=0.0001,
                                update_buffers=True, priority=49)]
            assert [h['type'] for h in cfg.custom_hooks] == ['EMAHook', 'FusedEvalHook']
        else:
            assert not ema


# -- building ----------------------------------------------------------------------------------
def build_model(cfg):
    """The config's model, built in its default scope on the meta device, pretrained unset."""
    from mmengine.registry import MODELS, DefaultScope
    with DefaultScope.overwrite_default_scope(cfg.default_scope), torch.device('meta'):
        return MODELS.build(ConfigDict(without_pretrained(cfg.model.to_dict())))


def _kxk(m):
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)


@pytest.mark.parametrize('rel', [
    pytest.param(r, marks=pytest.mark.ecosystem) if r.startswith('mmpretrain/') else r
    for r in CONFIGS])
def test_config_builds_its_model(rel):
    from reparam_mm.layers import DOConv2d
    cfg = load(rel)
    name = parse_name(rel)
    if rel.startswith('mmpretrain/'):
        import_ecosystem('mmpretrain.models')
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())

    backbone = model.backbone
    in_backbone = {n: m for n, m in model.named_modules() if n.startswith('backbone.')}
    outside = {n: m for n, m in model.named_modules()
               if n and not n.startswith('backbone') and not n.startswith('data_preprocessor')}

    doconv_out = [n for n, m in outside.items() if isinstance(m, DOConv2d)]
    if name['head_doconv']:
        assert len(doconv_out) == HEAD_DOCONVS[name['algo']], doconv_out
        plain = [n for n, m in outside.items() if _kxk(m)]
        assert not plain, f'plain k x k convs left outside the backbone: {plain}'
    else:
        assert not doconv_out, doconv_out

    doconv_in = [n for n, m in in_backbone.items() if isinstance(m, DOConv2d)]
    if name['backbone_doconv']:
        stages = ('backbone.layer2.', 'backbone.layer3.', 'backbone.layer4.')
        assert doconv_in and all(n.startswith(stages) for n in doconv_in), doconv_in
        plain = [n for n, m in in_backbone.items() if n.startswith(stages) and _kxk(m)]
        assert not plain, f'plain k x k convs left in DO-Conv stages: {plain}'
        blocks = [n for n, m in in_backbone.items()
                  if n.startswith(stages) and n.count('.') == 2]  # backbone.layerX.i
        assert len(blocks) == 4 + 6 + 3  # ResNet-50 stages 2-4
    elif name['backbone'].endswith('-doconv'):  # WithDOConv: every k x k conv of the backbone
        plain = [n for n, m in in_backbone.items() if _kxk(m)]
        assert doconv_in and not plain, f'plain k x k convs left in the backbone: {plain}'
    else:
        assert not doconv_in, doconv_in

    if name['backbone'].startswith('replknet-'):
        from reparam_mm.backbones.replknet import RepLKNet
        arch, channels, params_m = REPLKNET[name['backbone'].split('-')[1]]
        assert isinstance(backbone, RepLKNet)
        assert tuple(backbone.arch['channels']) == channels
        assert backbone.with_cp
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
        n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
        assert abs(n_params - params_m) / params_m < 0.03, (n_params, params_m)
        intermediate = [not isinstance(s.norm, nn.Identity) for s in backbone.stages]
        assert intermediate == [arch == 'XL'] * 4
    if name['backbone'].startswith('unireplknet-'):
        from reparam_mm.backbones.unireplknet import UniRepLKNet
        arch, channels, params = UNIREPLKNET[name['backbone'].split('-')[1]]
        assert isinstance(backbone, UniRepLKNet) and backbone.arch['dims'] == channels
        assert sum(p.numel() for p in backbone.parameters()) == params
        norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
        from reparam_mm.apis import deploy_config
        deploy = build_model(deploy_config(cfg)[0])  # what tools/fuse.py writes: fused backbone
        aux = getattr(deploy, 'auxiliary_head', None)
        n_params = (sum(p.numel() for p in deploy.parameters())
                    - (sum(p.numel() for p in aux.parameters()) if aux else 0)) / 1e6
        reported = UNIREPLKNET_REPORTED_PARAMS[Path(rel).stem.split('-in')[0]]
        assert abs(n_params - reported) / reported < 0.01, n_params
    if rel in REPORTED_PARAMS:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n_params - REPORTED_PARAMS[rel]) / REPORTED_PARAMS[rel] < 0.02, n_params
