"""``reparam_mm.fuse`` on the real re-parameterisable models of timm and mmpretrain.

``test_fuse_conventions.py`` follows each library's convention with small re-implementations,
because neither library imports beside the CPU torch of ``make test`` (both import
torchvision). This file fuses the libraries' own models wherever they do import: on the GPU
machine's image (``tools/device_check.sh``'s ``ecosystem-tests`` step) and here through
``make test-ecosystem`` (the Python 3.12 / torch 2.11 venv of ``make device-mmcv``, which
adds torchvision, timm and mmpretrain). Elsewhere the tests skip, saying why; with
``REPARAM_MM_ECOSYSTEM=required`` (both places above) a library that does not import fails.

Every model is checked in float64, so that "equal" means equal to ~1e-9 and not "within
the float32 noise of a deep random network". Two libraries' passes round to float32 anyway:
timm's ``fuse()`` methods build float32 convs whatever the model's dtype, and RepMLPNet's
``switch_to_deploy`` runs a float32 probe through its convs (that model is fused in float32).
Those fused models must come within ten times the distance between the unfused model in float32
and in float64 (the fused one rounds in another order, so a bound at that distance itself would
be a coin toss). Models are built from a fixed seed. Each model twice:

* **as the library builds it**: ``reparam_mm.fuse`` gives what the library's own pass gives
  (timm's ``reparameterize_model``, the backbone's ``switch_to_deploy``), with the same
  parameters, and a second pass fuses nothing;
* **with DO-Conv in every k > 1 conv** (:func:`convert_to_doconv`, as ``WithDOConv`` does): the
  libraries' own passes walk parents first, so their blocks read a branch conv's ``weight``
  before the DO-Conv in it is folded (timm and mmpretrain raise; mmpretrain's LeViT uses mmcv's
  ``fuse_conv_bn``, which skips a conv that is not an ``nn.Conv2d`` and silently drops the BN).
  reparam_mm walks children first: the fused model computes what the unfused one does, and
  what the library's pass computes on a copy whose DO-Conv layers were folded beforehand.
"""
import copy

import pytest
import torch
from conftest import ROOT, import_ecosystem
from downstream import seg_batch, train_once
from test_fuse import perturb

import reparam_mm  # noqa: F401  (registers DOConv)
from reparam_mm.fuse import count_params, fuse_with_report
from reparam_mm.layers.convert import convert_to_doconv
from reparam_mm.layers.doconv import DOConv2d
from reparam_mm.outputs import compare_outputs

pytestmark = [pytest.mark.ecosystem, pytest.mark.timeout(240)]

SIDE = 64  # input height and width of every model
# each family's re-parameterisable blocks, small variants
TIMM_MODELS = (
    'mobileone_s0',      # MobileOneBlock.reparameterize(), guarded by reparam_conv
    'fastvit_t8',        # + RepMixer, ReparamLargeKernelConv (no guard: fails twice)
    'repvit_m0_9',       # fuse() returning modules; RepVggDw calls its child's fuse()
    'repghostnet_050',   # RepGhostModule.switch_to_deploy()
    'repvgg_a0',         # byobnet RepVggBlock.reparameterize()
    'efficientvit_m0',   # ConvNorm / NormLinear fuse() returning modules
)
MMPRETRAIN_BACKBONES = {  # name -> (config, dtype the library's fuse supports)
    'RepVGG-A0': (dict(type='RepVGG', arch='A0'), torch.float64),
    'MobileOne-s0': (dict(type='MobileOne', arch='s0'), torch.float64),
    'RepMLPNet-B': (dict(type='RepMLPNet', arch='B', img_size=SIDE), torch.float32),
    'LeViT-128s': (dict(type='LeViT', arch='128s', img_size=SIDE), torch.float64),
    'RepLKNet-small': (dict(type='RepLKNet', arch=dict(
        large_kernel_sizes=[13, 11, 9, 7], layers=[1, 1, 1, 1], channels=[16, 32, 64, 128],
        small_kernel=5, dw_ratio=1)), torch.float64),
}


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _relative_error(got, want):
    diff = compare_outputs(want, got)
    assert diff['same_structure']
    return diff['max_rel']


def _assert_same(got, want, rtol, what):
    err = _relative_error(got, want)
    assert err <= rtol, f'{what}: max difference {err:.3e} of the output scale, above {rtol:.0e}'


def _rounded_to_float32(model, dtype):
    """Cast ``model`` back to ``dtype``; True where a library's fuse left float32 tensors in a
    float64 model."""
    rounded = dtype == torch.float64 and any(
        t.dtype == torch.float32 for t in model.state_dict().values())
    model.to(dtype)
    return rounded


def _fold_doconv_only(model):
    """A copy whose DO-Conv layers are plain convs, everything else untouched."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DOConv2d):
                setattr(parent, name, child.to_fused())
    return model


def _check(model, x, library_fuse, with_doconv, dtype=torch.float64):
    """fuse(model) against the library's own pass (``library_fuse(copy) -> fused``) and the
    unfused model, in ``dtype``; returns fuse's report."""
    if with_doconv:
        assert convert_to_doconv(model), 'no k > 1 conv was converted to DO-Conv'
    model = perturb(model).to(dtype)
    model.eval()  # not chained: mmpretrain backbones' train() returns None
    x = x.to(dtype)
    unfused = _outputs(model, x)

    fused, report = fuse_with_report(copy.deepcopy(model))
    assert report.total > 0, 'nothing was fused'
    assert not any(isinstance(m, DOConv2d) for m in fused.modules())
    rounded = _rounded_to_float32(fused, dtype)
    if dtype == torch.float32 or rounded:  # within the float32 model's own distance from float64
        exact = _outputs(copy.deepcopy(model).double(), x.double())
        noise = _relative_error(_outputs(copy.deepcopy(model).float(), x.float()), exact)
        rtol, unfused = 10 * noise + 1e-6, exact
    else:
        rtol = 1e-9
    _assert_same(_outputs(fused, x), unfused, rtol, 'fused vs unfused')

    reference = library_fuse(_fold_doconv_only(model) if with_doconv else copy.deepcopy(model))
    _rounded_to_float32(reference, dtype)
    _assert_same(_outputs(fused, x), _outputs(reference, x), 1e-12, "fused vs the library's pass")
    assert count_params(fused) == count_params(reference)

    again, second = fuse_with_report(fused)
    assert second.total == 0, f'a second pass fused {second.fused}'
    _assert_same(_outputs(again, x), unfused, rtol, 'after a second pass')
    return report


@pytest.mark.parametrize('with_doconv', [False, True], ids=['as-built', 'doconv'])
@pytest.mark.parametrize('name', TIMM_MODELS)
def test_timm_model_fuses_like_timm_and_with_doconv_inside(name, with_doconv):
    timm = import_ecosystem('timm')
    from timm.utils.model import reparameterize_model
    if name not in timm.list_models(name):
        pytest.skip(f'timm {timm.__version__} has no {name}')
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    report = _check(model, x, reparameterize_model, with_doconv)
    if with_doconv:
        assert report.fused.get('DOConv2d', 0) > 0


@pytest.mark.parametrize('with_doconv', [False, True], ids=['as-built', 'doconv'])
@pytest.mark.parametrize('name', list(MMPRETRAIN_BACKBONES))
def test_mmpretrain_backbone_fuses_like_switch_to_deploy_and_with_doconv_inside(name, with_doconv):
    import_ecosystem('mmpretrain.models')
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    cfg, dtype = MMPRETRAIN_BACKBONES[name]
    torch.manual_seed(0)
    # whatever scope an earlier test left current, 'RepVGG' must mean mmpretrain's
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(copy.deepcopy(cfg))

    def switch_to_deploy(m):
        m.switch_to_deploy()
        return m

    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    report = _check(model, x, switch_to_deploy, with_doconv, dtype)
    if with_doconv:
        assert report.fused.get('DOConv2d', 0) > 0


def test_timm_parent_first_walk_cannot_fuse_doconv_inside_its_blocks():
    """Why the walk is children first: timm's own pass on a DO-Conv MobileOne reads a branch
    conv's ``weight``, which a DO-Conv layer only has once folded. (Documents the library's
    behaviour; if timm ever handles it, this test says so and can go.)"""
    timm = import_ecosystem('timm')
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = timm.create_model('mobileone_s0', pretrained=False, num_classes=10).eval()
    convert_to_doconv(model)
    with pytest.raises(AttributeError, match='weight'):
        reparameterize_model(model)


def test_mmpretrain_backbone_in_an_mmseg_upernet_fuses_end_to_end():
    """An mmpretrain backbone under mmseg (as configs/mmpretrain/ build it) with a DO-Conv head."""
    import_ecosystem('mmpretrain.models')
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = dict(
        type='EncoderDecoder',
        data_preprocessor=dict(type='SegDataPreProcessor', size=(64, 64)),
        backbone=dict(type='mmpretrain.RepVGG', arch='A0', out_indices=(0, 1, 2, 3)),
        decode_head=dict(type='UPerHead', in_channels=[48, 96, 192, 1280], channels=32,
                         in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), num_classes=5,
                         norm_cfg=dict(type='BN', requires_grad=True), align_corners=False,
                         loss_decode=dict(type='CrossEntropyLoss')),
        test_cfg=dict(mode='whole'))
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = SEG_MODELS.build(cfg)
    convert_to_doconv(model.decode_head)
    model = perturb(model).double()
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        unfused = model(x, mode='tensor')
        fused, report = fuse_with_report(copy.deepcopy(model))
        got = fused(x, mode='tensor')
    assert report.fused.get('RepVGGBlock', 0) == 22 and report.fused.get('DOConv2d', 0) > 0
    _assert_same([got], [unfused], 1e-9, 'fused vs unfused UperNet-RepVGG')


MMPRETRAIN_CONFIGS = sorted(p.name for p in (ROOT / 'configs' / 'mmpretrain').glob('*.py'))


@pytest.mark.parametrize('name', MMPRETRAIN_CONFIGS)
def test_mmpretrain_config_trains_a_step_and_deploys_fused(name, tmp_path):
    """Each ``configs/mmpretrain/`` config, whole (full-width heads), from random weights: one
    training step, then ``tools/fuse.py``'s export: the deploy config (``deploy=True`` on the
    backbone) loads the fused weights strictly and reproduces the trained model."""
    import_ecosystem('mmpretrain.models')
    from mmengine.config import Config
    from reparam_mm.apis import build_model, export_deploy
    cfg = Config.fromfile(str(ROOT / 'configs' / 'mmpretrain' / name))
    cfg.model.backbone.init_cfg = None  # the ImageNet file is not here
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    if cfg.default_scope == 'mmseg':
        data, side = seg_batch(cfg.model.decode_head.num_classes, size=SIDE), SIDE
    else:
        from mmdet.testing import demo_mm_inputs
        side = 128
        data = demo_mm_inputs(2, [(3, side, side)] * 2, num_items=[2, 3], num_classes=80)
    # after train(): mmpretrain backbones freeze their frozen_stages there
    train_once(model, data,
               moves=lambda m: next(p for p in m.backbone.parameters() if p.requires_grad))

    ckpt = tmp_path / 'trained.pth'
    torch.save(dict(meta={}, state_dict=model.state_dict()), ckpt)
    cfg_path = tmp_path / name
    cfg.dump(str(cfg_path))
    result = export_deploy(str(cfg_path), str(ckpt), str(tmp_path / 'deploy'), shape=(side, side))
    assert result['check']['same_structure'] and result['check']['max_rel'] < 1e-5, result['check']
    assert Config.fromfile(result['config']).model.backbone.deploy is True
    block = 'RepVGGBlock' if 'repvgg' in name else 'MobileOneBlock'
    assert result['report'].fused.get(block, 0) > 0, result['report'].fused
