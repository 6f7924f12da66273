"""UniRepLKNet backbone: parameter counts and key layout of every arch against the authors' model,
official-layout loading with the authors' stage features, re-parameterisation against an
independent float64 reference, DO-Conv stages, OpenMMLab training behaviour, the authors'
layer-wise lr decay, and UperNet / Cascade Mask R-CNN with a tiny arch.

The OFFICIAL / FIXTURE_* values were printed by ``tests/make_unireplknet_official_values.py``,
which runs the authors' ``unireplknet.py`` (AILab-CVC/UniRepLKNet at commit b5677d8, timm
helpers stubbed) once; nothing of this project's implementation enters them.
"""
import copy
import hashlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import downstream
import reparam_mm  # noqa: F401  (registers everything)
from reparam_mm.backbones.unireplknet import (DILATED_BRANCHES, DilatedReparamBlock, UniRepLKNet,
                                              UniRepLKNetBlock)
from reparam_mm.fuse import fuse, fuse_with_report
from reparam_mm.layers.doconv import DOConv2d
from reparam_mm.layers.large_kernel import LargeKernelDWConv2d

# arch: (parameters of the authors' ImageNet classifier, of their downstream backbone (norm0..3,
# no classifier), of that backbone with deploy=True; sha256[:16] of the downstream and the deploy
# state-dict layouts, sorted "key:shape" lines). Printed by make_unireplknet_official_values.py.
OFFICIAL = {
    'A': (4_649_060, 4_328_620, 4_116_860, '721b2c4809d87d5a', '0fce8b819e62c0f1'),
    'F': (6_489_328, 6_105_000, 5_850_888, '957d2e15ea6d9dfe', '3cc329faa340f2f8'),
    'P': (11_080_520, 10_568_416, 10_229_600, '3499e2840288c1b9', '82b0a13a8ec485d0'),
    'N': (18_818_880, 18_179_000, 17_678_680, 'a0bf4ed9ab05ddba', 'f29b270601b26782'),
    'T': (31_693_420, 31_053_540, 30_398_100, 'f82f7dbbc5692ca4', 'ff23eb0101e096eb'),
    'S': (56_456_704, 55_689_048, 54_878_328, 'b0503bc6aaef95b6', '5a0760a4beb8c988'),
    'B': (99_089_416, 98_066_208, 96_985_248, '4f516e9f770f6ae4', '2fa947d9676a6b97'),
    'L': (220_076_056, 218_541_744, 216_920_304, 'e3004e0de533989b', '0e31ead69d76c5f7'),
    'XL': (388_690_984, 386_645_568, 384_483_648, 'ef724b70bd672b32', 'd71a54ec3d8168e3'),
}
# The authors' kernel_size -> (branch kernel sizes, dilations) table, copied from their code.
AUTHORS_TABLE = {17: ([5, 9, 3, 3, 3], [1, 2, 4, 5, 7]), 15: ([5, 7, 3, 3, 3], [1, 2, 3, 5, 7]),
                 13: ([5, 7, 3, 3, 3], [1, 2, 3, 4, 5]), 11: ([5, 5, 3, 3, 3], [1, 2, 3, 4, 5]),
                 9: ([5, 5, 3, 3], [1, 2, 3, 4]), 7: ([5, 3, 3], [1, 2, 3]), 5: ([3, 3], [1, 2])}

# A tiny arch with every block kind: 3x3 and 5x5 plain, 13 / 11 / 7 dilated re-param blocks.
FIXTURE_ARCH = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32),
                    kernel_sizes=((3, ), (13, ), (11, 5), (7, )))
FIXTURE_CLASSES = 10
FIXTURE_LAYOUTS = ('8acd44ba59d5feca', '9f2057fb44daf308')  # classifier, downstream deploy
FIXTURE_PROBES = [  # the authors' downstream features: per stage (weighted sum, samples)
    (7.1743036788464885, [-1.6124712965299737, -0.27082999970906557, 1.1350093782846131,
     0.8012938452941842, -0.2447809172321625, -1.3498534865744845]),
    (-3.6212147260765963, [-2.656800282194246, 0.9016384940769752, 0.7073281618694189,
     -1.4879522322155112, 0.7628351184735949, 0.6388384180837656]),
    (-0.600418620038037, [-0.9523177502310569, 0.36086190369565546, -1.002435311775736,
     1.1377585335913154, -2.0150077516903235, -1.535001616796599]),
    (-9.238325425485224, [0.6081887714786868, 0.05167012624741593, 1.7613582543087682,
     1.413981021161, -0.04791269278430858, 0.28843412318710704]),
]


# -- helpers shared with make_unireplknet_official_values.py (none uses the implementation) --
def layout_hash(state):
    lines = '\n'.join(f'{k}:{tuple(v.shape)}' for k, v in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def synthetic_state(shapes):
    """Deterministic float32 values for a key -> shape table, from sines (no RNG: any torch
    version and platform gives the same tensors)."""
    out = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        wave = torch.sin(torch.arange(math.prod(shape), dtype=torch.float64) * 0.7 + i * 1.3)
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(7)
            continue
        if key.endswith('running_var'):
            value = 1.0 + 0.5 * wave
        elif key.endswith('running_mean'):
            value = 0.1 * wave
        elif key.endswith('.gamma') and len(shape) == 1:  # layer scale: let the residuals count
            value = 0.5 + 0.25 * wave
        elif key.endswith('weight') and len(shape) == 1:  # BN / LayerNorm scales
            value = 1.0 + 0.3 * wave
        elif len(shape) == 1:  # biases
            value = 0.1 * wave
        else:  # conv / linear weights, GRN gamma / beta
            value = 0.2 * wave
        out[key] = value.reshape(shape).float()
    return out


def fixture_input():
    return (torch.sin(torch.arange(3 * 64 * 64, dtype=torch.float64) * 0.37) * 2).reshape(
        1, 3, 64, 64)


def feature_probes(features):
    """Per stage: a cosine-weighted sum and six sampled values (float64)."""
    probes = []
    for f in features:
        flat = f.detach().double().flatten()
        weights = torch.cos(torch.arange(flat.numel(), dtype=torch.float64) * 0.61)
        index = torch.linspace(0, flat.numel() - 1, 6).long()
        probes.append(((flat * weights).sum().item(), flat[index].tolist()))
    return probes


# -- test helpers ------------------------------------------------------------------------------
def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny(**kwargs):
    kwargs.setdefault('arch', 'tiny')
    return UniRepLKNet(**kwargs)


def official_state(arch=FIXTURE_ARCH, classifier=True):
    """The authors' state-dict layout for ``arch`` filled by :func:`synthetic_state`: keys of our
    model (checked equal to theirs by the layout hashes) minus ``norm{i}`` plus the classifier."""
    with torch.device('meta'):
        model = UniRepLKNet(arch=arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.startswith(('norm0.', 'norm1.', 'norm2.', 'norm3.'))}
    if classifier:
        c = model.arch['dims'][-1]
        shapes.update({'norm.weight': (c, ), 'norm.bias': (c, ),
                       'head.weight': (FIXTURE_CLASSES, c), 'head.bias': (FIXTURE_CLASSES, )})
    return synthetic_state(shapes)


@torch.no_grad()
def randomize(model, seed=0):
    """Random BN statistics and affine values, layer scales, GRN and DO-Conv D, so that every
    fold is really exercised (fresh layers have GRN = 0, layer scale 1e-6, D = 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        elif isinstance(m, DOConv2d) and m.D is not None:
            m.D.copy_(torch.randn(m.D.shape, generator=g) * 0.1)
    for name, p in model.named_parameters():
        if name.endswith('.gamma') and p.dim() == 1:
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
        elif name.endswith(('act.1.gamma', 'act.1.beta')):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _save(tmp_path, obj, name='ckpt.pth'):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def check_probes(features, tol=1e-6):
    got = feature_probes(features)
    assert len(got) == len(FIXTURE_PROBES)
    for stage, ((weighted, samples), (ref_weighted, ref_samples)) in enumerate(
            zip(got, FIXTURE_PROBES)):
        assert abs(weighted - ref_weighted) <= tol * (1 + abs(ref_weighted)), stage
        torch.testing.assert_close(torch.tensor(samples), torch.tensor(ref_samples), rtol=tol,
                                   atol=tol, msg=f'stage {stage}')


# -- shapes and arguments -------------------------------------------------------------------------
@pytest.mark.parametrize('size,expected', [((64, 64), [(16, 16), (8, 8), (4, 4), (2, 2)]),
                                           ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)])])
def test_output_shapes_every_stage(size, expected):
    model = tiny().eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert [tuple(o.shape) for o in outs] == [(1, c, *hw) for c, hw in zip((16, 32, 64, 128),
                                                                           expected)]


@pytest.mark.parametrize('out_indices,stages', [((0, ), [0]), ((1, 3), [1, 3]), ((-1, ), [3]),
                                                (2, [2]), ((3, 0), [0, 3])])
def test_out_indices_select_stages_each_with_its_norm(out_indices, stages):
    full = randomize(tiny()).eval()
    part = tiny(out_indices=out_indices).eval()
    assert {n for n, _ in part.named_children() if n.startswith('norm')} == {
        f'norm{i}' for i in stages}
    part.load_state_dict({k: v for k, v in full.state_dict().items() if k in part.state_dict()})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, outs = full(x), part(x)
    assert len(outs) == len(stages)
    for o, s in zip(outs, stages):
        torch.testing.assert_close(o, ref[s])


def test_tiny_arch_is_small_and_keeps_both_block_kinds():
    model = tiny()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    kinds = {type(b.dwconv).__name__ for s in model.stages for b in s}
    assert kinds == {'Conv2d', 'DilatedReparamBlock'}
    assert isinstance(model.stages[1][0].dwconv.lk_origin, LargeKernelDWConv2d)


@pytest.mark.parametrize('kwargs,exc,match', [
    (dict(arch='M'), ValueError,
     "arch 'M' is unknown; use one of A, F, P, N, T, S, B, L, XL, tiny"),
    (dict(arch=dict(depths=(1, ), dims=(8, ))), ValueError, r"missing \['kernel_sizes'\]"),
    (dict(arch=dict(depths=(2, ), dims=(8, ), kernel_sizes=((3, ), ))), ValueError,
     'one kernel size per block'),
    (dict(arch=dict(depths=(1, ), dims=(8, ), kernel_sizes=((19, ), )), out_indices=0),
     ValueError, r'kernel sizes \[19\] are not supported'),
    (dict(arch=['S']), TypeError, 'str or a dict'),
    (dict(out_indices=(4, )), ValueError, r'out_indices=\(4,\) must be'),
    (dict(out_indices=()), ValueError, 'non-empty'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages=5'),
    (dict(stage_with_doconv=(True, False)), ValueError, 'one bool per stage'),
    (dict(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='a.pth')),
     ValueError, 'not both'),
    (dict(init_cfg=dict(type='Pretrained')), ValueError, "needs a 'checkpoint'"),
    (dict(init_cfg='a.pth'), TypeError, 'init_cfg must be a dict'),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tiny(**kwargs)


def test_block_kernel_sizes_follow_the_authors_rule():
    assert isinstance(UniRepLKNetBlock(8, 0).dwconv, nn.Identity)
    for k in (3, 5):
        conv = UniRepLKNetBlock(8, k).dwconv
        assert type(conv) is nn.Conv2d and conv.kernel_size == (k, k) and conv.groups == 8
    for k in (7, 9, 11, 13, 15, 17):
        assert isinstance(UniRepLKNetBlock(8, k).dwconv, DilatedReparamBlock)
    with pytest.raises(ValueError, match='kernel_size=4 is not supported'):
        UniRepLKNetBlock(8, 4)


def test_drop_path_is_linearly_spaced():
    model = tiny(drop_path_rate=0.4)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3, 0.4])


# -- the authors' model: parameter counts, key layout, loading, features ---------------------------
@pytest.mark.parametrize('arch', list(OFFICIAL))
def test_parameter_counts_and_key_layout_match_official(arch):
    n_classifier, n_downstream, n_deploy, layout, deploy_layout = OFFICIAL[arch]
    with torch.device('meta'):  # nothing allocated: XL has 387M parameters
        model = UniRepLKNet(arch=arch)
        deploy = UniRepLKNet(arch=arch, small_kernel_merged=True)
    assert sum(p.numel() for p in model.parameters()) == n_downstream
    assert sum(p.numel() for p in deploy.parameters()) == n_deploy
    assert layout_hash(model.state_dict()) == layout
    assert layout_hash(deploy.state_dict()) == deploy_layout
    dims = model.arch['dims']  # the classifier: final LayerNorm + 1000-way head, no norm0..3
    assert n_downstream - 2 * sum(dims) + 2 * dims[-1] + 1001 * dims[-1] + 1000 - dims[-1] \
        == n_classifier


def test_kernel_table_is_the_authors():
    assert {k: (list(v[0]), list(v[1])) for k, v in DILATED_BRANCHES.items()} == AUTHORS_TABLE


@pytest.mark.parametrize('wrap', ['model', 'state_dict', 'plain'])
def test_official_checkpoint_loads_with_only_classifier_left_over(tmp_path, wrap):
    """The must-show: the authors' layout loads through init_cfg, their features come out."""
    state = official_state()
    assert layout_hash(state) == FIXTURE_LAYOUTS[0]  # the authors' classifier state dict, exactly
    path = _save(tmp_path, state if wrap == 'plain' else {wrap: state, 'epoch': 3})
    model = UniRepLKNet(arch=FIXTURE_ARCH, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    own = model.state_dict()
    assert set(state) - set(own) == {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'}
    assert set(own) - set(state) == {f'norm{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    for k in set(own) & set(state):
        assert torch.equal(own[k], state[k]), k
    model = model.double().eval()
    with torch.no_grad():
        check_probes(model(fixture_input()))


def test_fused_model_has_the_authors_deploy_keys_and_features(tmp_path):
    path = _save(tmp_path, official_state())
    model = UniRepLKNet(arch=FIXTURE_ARCH, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    model = model.double().eval()
    fused, report = fuse_with_report(model)
    assert report.fused == {'DilatedReparamBlock': 3, 'UniRepLKNetBlock': 5}
    assert layout_hash(fused.state_dict()) == FIXTURE_LAYOUTS[1]
    with torch.no_grad():
        check_probes(fused(fixture_input()))


def test_checkpoint_with_prefix_and_downstream_norms(tmp_path):
    state = official_state(classifier=False)
    state.update({f'norm{i}.{p}': torch.full((c, ), 0.5) for i, c in enumerate((8, 16, 24, 32))
                  for p in ('weight', 'bias')})
    path = _save(tmp_path, {'state_dict': {f'backbone.{k}': v for k, v in state.items()},
                            'meta': {}})
    model = UniRepLKNet(arch=FIXTURE_ARCH, out_indices=(1, 2),
                        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()  # norm0 / norm3 of the checkpoint belong to stages not returned
    assert torch.equal(model.norm1.weight, torch.full((16, ), 0.5))
    assert not hasattr(model, 'norm0')
    assert torch.equal(model.stages[2][1].dwconv.weight, state['stages.2.1.dwconv.weight'])


def test_deprecated_pretrained_argument(tmp_path):
    state = official_state()
    with pytest.warns(UserWarning, match='pretrained is deprecated'):
        model = UniRepLKNet(arch=FIXTURE_ARCH, pretrained=_save(tmp_path, {'model': state}))
    model.init_weights()
    assert torch.equal(model.stages[3][0].pwconv1[1].weight, state['stages.3.0.pwconv1.1.weight'])


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = official_state()
    del state['stages.1.0.dwconv.dil_bn_k7_2.running_var']
    state['stages.1.0.pwconv3.weight'] = torch.zeros(1)
    state['downsample_layers.0.0.weight'] = torch.zeros(4, 3, 5, 5)
    model = UniRepLKNet(arch=FIXTURE_ARCH, init_cfg=dict(type='Pretrained',
                                                         checkpoint=_save(tmp_path, state)))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as err:
        model.init_weights()
    msg = str(err.value)
    for needle in ("UniRepLKNet(arch=custom) cannot load",
                   '1 missing keys (stages.1.0.dwconv.dil_bn_k7_2.running_var)',
                   '1 unexpected keys (stages.1.0.pwconv3.weight)',
                   '1 shape mismatches (downsample_layers.0.0.weight (4, 3, 5, 5) vs'):
        assert needle in msg
    for k, v in model.state_dict().items():  # nothing was partially loaded
        assert torch.equal(v, before[k])


def test_missing_checkpoint_file_and_bad_prefix(tmp_path):
    model = tiny(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')))
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        model.init_weights()
    path = _save(tmp_path, official_state())
    model = UniRepLKNet(arch=FIXTURE_ARCH,
                        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone'))
    with pytest.raises(ValueError, match="no key .* starts with prefix 'backbone.'"):
        model.init_weights()


def test_default_init_is_the_authors_truncated_normal():
    torch.manual_seed(0)
    model = tiny()
    model.init_weights()
    w = model.stages[2][0].pwconv1[1].weight
    assert abs(w.std().item() - 0.02) < 0.003  # timm's trunc_normal_ bounds (+-2) as theirs
    assert torch.count_nonzero(model.stages[2][0].pwconv1[1].bias) == 0
    assert torch.equal(model.stages[2][0].gamma, torch.full((64, ), 1e-6))


# -- re-parameterisation against an independent float64 reference ----------------------------------
def _bn(y, bn):
    shape = (1, -1, 1, 1)
    return ((y - bn.running_mean.double().view(shape)) / (bn.running_var.double() + bn.eps).sqrt()
            .view(shape) * bn.weight.double().view(shape) + bn.bias.double().view(shape))


def reference_dilated(block, x):
    """The block's unfused function with explicit dilated F.conv2d calls and the BN formula."""
    c, k_large = x.shape[1], block.kernel_size
    out = _bn(F.conv2d(x, block.lk_origin.weight.double(), padding=k_large // 2, groups=c),
              block.origin_bn)
    for k, r in zip(*AUTHORS_TABLE[k_large]):
        w = block._modules[f'dil_conv_k{k}_{r}'].weight.double()
        out = out + _bn(F.conv2d(x, w, padding=r * (k - 1) // 2, dilation=r, groups=c),
                        block._modules[f'dil_bn_k{k}_{r}'])
    return out


def reference_block(block, x):
    """UniRepLKNetBlock's unfused function written out from its parameters, in float64."""
    c = x.shape[1]
    if isinstance(block.dwconv, DilatedReparamBlock):
        y = reference_dilated(block.dwconv, x)
    else:
        w = block.dwconv.weight.double()
        y = F.conv2d(x, w, padding=w.shape[-1] // 2, groups=c)
    y = _bn(y, block.norm)
    se = block.se
    s = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), se.down.weight.double(),
                        se.down.bias.double()))
    y = y * torch.sigmoid(F.conv2d(s, se.up.weight.double(), se.up.bias.double()))
    z = F.gelu(y.permute(0, 2, 3, 1) @ block.pwconv1[1].weight.double().T
               + block.pwconv1[1].bias.double())
    grn = block.act[1]
    gx = z.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    z = grn.gamma.double() * (gx / (gx.mean(-1, keepdim=True) + 1e-6)) * z + z + grn.beta.double()
    z = (z @ block.pwconv2[0].weight.double().T).permute(0, 3, 1, 2)
    z = _bn(z, block.pwconv2[2]) * block.gamma.double().view(1, -1, 1, 1)
    return x + z


@pytest.mark.parametrize('kernel_size', sorted(AUTHORS_TABLE))
def test_dilated_block_fuses_to_the_explicit_dilated_reference(kernel_size):
    torch.manual_seed(kernel_size)
    block = randomize(DilatedReparamBlock(6, kernel_size), seed=kernel_size).double().eval()
    for m in block.modules():  # random conv weights (the default init is not meant to be fused)
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(2, 6, 19, 23, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_dilated(block, x)
        assert rel_err(block(x), ref) < 1e-12
        assert block.to_fused() is block
        assert set(block.state_dict()) == {'lk_origin.weight', 'lk_origin.bias'}
        assert isinstance(block.lk_origin, LargeKernelDWConv2d)
        assert rel_err(block(x), ref) < 1e-12
        state = copy.deepcopy(block.state_dict())
        assert block.to_fused() is block  # idempotent
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


@pytest.mark.parametrize('kernel_size', [3, 5, 7, 13])
def test_block_fuses_bn_grn_bias_and_layer_scale_as_the_reference(kernel_size):
    torch.manual_seed(kernel_size)
    block = UniRepLKNetBlock(8, kernel_size)
    for m in block.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.3)
    block = randomize(block, seed=kernel_size).double().eval()
    x = torch.randn(2, 8, 15, 17, dtype=torch.float64)
    with torch.no_grad():
        ref = reference_block(block, x)
        assert rel_err(block(x), ref) < 1e-12
        fuse(block)
        assert rel_err(block(x), ref) < 1e-12
    keys = set(block.state_dict())
    dw = {'dwconv.lk_origin.weight', 'dwconv.lk_origin.bias'} if kernel_size >= 7 else {
        'dwconv.weight', 'dwconv.bias'}
    assert keys == dw | {'se.down.weight', 'se.down.bias', 'se.up.weight', 'se.up.bias',
                         'pwconv1.1.weight', 'pwconv1.1.bias', 'act.1.gamma',
                         'pwconv2.0.weight', 'pwconv2.0.bias'}  # the authors' deploy block


def _fuse_check(model, x, tol=1e-5):
    model = randomize(model).eval()
    with torch.no_grad():
        ref = model(x)
        fused = fuse(copy.deepcopy(model))
        outs = fused(x)
    for o, r in zip(outs, ref):
        assert rel_err(o, r) < tol
    return fused, ref


def test_fused_equals_unfused_and_fusing_twice_is_a_no_op():
    x = torch.randn(2, 3, 64, 64)
    fused, _ = _fuse_check(tiny(), x)
    assert all(b.is_fused for s in fused.stages for b in s)
    assert not any('origin_bn' in n or 'dil_' in n for n in fused.state_dict())
    state = copy.deepcopy(fused.state_dict())
    _, report = fuse_with_report(fused)
    assert report.total == 0 and report.params_before == report.params_after
    assert fused.stages[1][0].to_fused() is fused.stages[1][0]
    assert state.keys() == fused.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in fused.state_dict().items())


def test_training_mode_and_non_bn_norms_are_refused():
    model = randomize(tiny())
    with pytest.raises(RuntimeError, match='eval'):
        model.stages[1][0].dwconv.to_fused()
    with pytest.raises(RuntimeError, match='eval'):
        model.stages[0][0].to_fused()
    with pytest.raises(RuntimeError, match='refuses to fuse modules in training mode'):
        fuse(model)
    gn = tiny(norm_cfg=dict(type='GN', num_groups=4)).eval()
    with pytest.raises(TypeError, match='needs BatchNorm running statistics'):
        gn.stages[1][0].dwconv.to_fused()


def test_fused_structure_loads_fused_checkpoint(tmp_path):
    x = torch.randn(1, 3, 64, 64)
    fused, ref = _fuse_check(tiny(), x)
    path = _save(tmp_path, {'state_dict': fused.state_dict()})
    deploy = tiny(small_kernel_merged=True, init_cfg=dict(type='Pretrained', checkpoint=path))
    assert set(deploy.state_dict()) == set(fused.state_dict())
    deploy.init_weights()
    with torch.no_grad():
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(deploy.eval()(x), ref))
    # the mismatched directions say which structure to build
    with pytest.raises(ValueError, match='it is fused .*: build with small_kernel_merged=True'):
        tiny(init_cfg=dict(type='Pretrained', checkpoint=path)).init_weights()
    unfused = _save(tmp_path, tiny().state_dict(), 'unfused.pth')
    with pytest.raises(ValueError, match='unfused .*: build with small_kernel_merged=False'):
        tiny(small_kernel_merged=True,
             init_cfg=dict(type='Pretrained', checkpoint=unfused)).init_weights()


def test_fuse_after_mmcv_conv_bn_folding():
    from mmcv.cnn import fuse_conv_bn
    x = torch.randn(1, 3, 64, 64)
    model = randomize(tiny()).eval()
    with torch.no_grad():
        ref = model(x)
        folded = fuse_conv_bn(copy.deepcopy(model))  # BNs after convs become Identity
        assert isinstance(folded.stages[1][0].dwconv.origin_bn, nn.Identity)
        out = fuse(folded)(x)
    assert all(rel_err(o, r) < 1e-5 for o, r in zip(out, ref))


# -- DO-Conv stages --------------------------------------------------------------------------------
def test_doconv_placement():
    model = tiny(stage_with_doconv=(True, True, False, False))
    do = {n for n, m in model.named_modules() if isinstance(m, DOConv2d)}
    branches = {f'stages.1.0.dwconv.dil_conv_k{k}_{r}' for k, r in zip(*AUTHORS_TABLE[13])}
    assert do == {'downsample_layers.0.0', 'downsample_layers.0.3', 'stages.0.0.dwconv',
                  'downsample_layers.1.0'} | branches
    assert model.stages[0][0].dwconv.groups == 16 and model.downsample_layers[0][0].groups == 1
    assert model.stages[1][0].dwconv.dil_conv_k3_5.dilation == (5, 5)
    assert isinstance(model.stages[1][0].dwconv.lk_origin, LargeKernelDWConv2d)
    deploy = tiny(stage_with_doconv=(True, ) * 4, small_kernel_merged=True)
    assert not any(isinstance(m, DOConv2d) for m in deploy.modules())


def test_doconv_fuse_uses_the_composed_kernel():
    x = torch.randn(2, 3, 64, 64)
    model = randomize(tiny(stage_with_doconv=(True, ) * 4), seed=1).eval()
    with torch.no_grad():
        ref = model(x)
        fused = fuse(copy.deepcopy(model))  # children first: DO-Conv folded before the blocks
        assert not any(isinstance(m, DOConv2d) for m in fused.modules())
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(fused(x), ref))
        # blocks fused on their own (no walker) fold their DO-Conv children first, too
        direct = copy.deepcopy(model)
        for m in direct.modules():
            if isinstance(m, UniRepLKNetBlock):
                m.to_fused()
        assert all(rel_err(o, r) < 1e-5 for o, r in zip(direct(x), ref))


def test_official_checkpoint_loads_into_doconv_stages(tmp_path):
    path = _save(tmp_path, official_state())
    do = UniRepLKNet(arch=FIXTURE_ARCH, stage_with_doconv=(True, ) * 4,
                     init_cfg=dict(type='Pretrained', checkpoint=path))
    do.init_weights()
    with torch.no_grad():
        check_probes(do.double().eval()(fixture_input()))


# -- OpenMMLab training behaviour ------------------------------------------------------------------
def test_frozen_stages():
    model = tiny(frozen_stages=2)
    model.train()
    frozen = ('downsample_layers.0.', 'downsample_layers.1.', 'stages.0.', 'stages.1.', 'norm0.',
              'norm1.')
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            assert m.training == (not name.startswith(frozen)), name
    stem_only = tiny(frozen_stages=0)
    assert not any(p.requires_grad for p in stem_only.downsample_layers[0].parameters())
    assert all(p.requires_grad for p in stem_only.stages.parameters())


def test_norm_eval_keeps_statistics_but_trains_weights():
    model = randomize(tiny(norm_eval=True)).train()
    assert all(not m.training for m in model.modules() if isinstance(m, _BatchNorm))
    bn = model.stages[1][0].dwconv.origin_bn
    stats = bn.running_mean.clone()
    sum(o.sum() for o in model(torch.randn(2, 3, 64, 64))).backward()
    assert torch.equal(bn.running_mean, stats) and bn.weight.grad is not None


def test_with_cp_matches_plain_forward_and_backward():
    plain = randomize(tiny(drop_path_rate=0.2)).train()
    cp = tiny(drop_path_rate=0.2, with_cp=True).train()
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for model in (plain, cp):
        torch.manual_seed(0)  # same drop-path masks
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_with_cp_trains_with_a_cold_large_kernel_tuner(monkeypatch, tmp_path):
    """Checkpointed blocks meet their large-kernel call signatures first inside the checkpoint,
    where the dispatch times its candidates (forward + backward): training must still work, as on
    the first step of the S / B / L / XL configs (with_cp=True) with an empty tuning cache."""
    from reparam_mm.layers import large_kernel
    monkeypatch.setenv('REPARAM_MM_CACHE', str(tmp_path))
    monkeypatch.setattr(large_kernel, 'TUNER', large_kernel.LargeDWTuner())
    model = tiny(with_cp=True).train()
    with large_kernel.dispatch_mode('tuned'):
        sum(o.mean() for o in model(torch.randn(1, 3, 48, 48))).backward()
    assert model.stages[1][0].dwconv.lk_origin.weight.grad is not None


def test_syncbn_config_builds_every_batchnorm():
    model = tiny(norm_cfg=dict(type='SyncBN'))
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert len(norms) == sum(isinstance(m, _BatchNorm) for m in tiny().modules())
    with torch.no_grad():
        assert len(model.eval()(torch.randn(1, 3, 64, 64))) == 4


def test_registered_in_root_models_and_both_scopes():
    from mmengine.registry import MODELS, DefaultScope
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    for registry, scope in ((MODELS, None), (SEG_MODELS, 'mmseg'), (DET_MODELS, 'mmdet')):
        with DefaultScope.overwrite_default_scope(scope):
            model = registry.build(dict(type='UniRepLKNet', arch='tiny', out_indices=(3, )))
        assert isinstance(model, UniRepLKNet) and model.out_indices == (3, )


# -- the authors' layer-wise learning-rate decay ---------------------------------------------------
def test_layer_decay_groups_follow_the_authors():
    from mmengine.optim import build_optim_wrapper

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = UniRepLKNet(arch='T', out_indices=(0, 3))
            self.head = nn.Conv2d(4, 4, 1)

    with torch.device('meta'):
        model = Wrapper()
    model.backbone.stages[0][0].gamma.requires_grad_(False)
    optim = build_optim_wrapper(model, dict(
        type='OptimWrapper', constructor='UniRepLKNetLayerDecayOptimizerConstructor',
        optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
        paramwise_cfg=dict(decay_rate=0.9, decay_type='layer_wise', num_layers=9)))
    where = {}
    for group in optim.param_groups:  # (mmengine appends a base-lr group without names)
        for name in group.get('param_names', ()):
            where[name] = (group['lr'], group['weight_decay'])

    def lr(layer_id):  # the authors': decay_rate ** (num_layers + 2 - layer_id - 1)
        return pytest.approx(1e-4 * 0.9 ** (9 + 1 - layer_id))

    assert 'backbone.stages.0.0.gamma' not in where  # frozen parameters are left out
    assert where['backbone.downsample_layers.0.0.weight'] == (lr(0), 0.05)
    assert where['backbone.downsample_layers.0.0.bias'] == (lr(0), 0.)
    assert where['backbone.stages.0.1.pwconv1.1.weight'] == (lr(1), 0.05)
    assert where['backbone.downsample_layers.1.1.weight'] == (lr(2), 0.)  # 1-D: no decay
    assert where['backbone.stages.1.2.dwconv.lk_origin.weight'] == (lr(2), 0.05)
    assert where['backbone.downsample_layers.2.0.weight'] == (lr(3), 0.05)
    assert where['backbone.stages.2.5.act.1.gamma'] == (lr(4), 0.05)  # (1, 1, 1, C): decayed
    assert where['backbone.stages.2.17.gamma'] == (lr(8), 0.)
    assert where['backbone.downsample_layers.3.0.weight'] == (lr(9), 0.05)
    assert where['backbone.stages.3.0.norm.weight'] == (lr(9), 0.)
    assert where['backbone.norm3.weight'] == (lr(10), 0.)
    assert where['head.weight'] == (pytest.approx(1e-4), 0.05)
    assert len(where) == sum(p.requires_grad for p in model.parameters())


def test_layer_decay_needs_num_layers():
    from mmengine.optim import build_optim_wrapper
    with pytest.raises(ValueError, match='num_layers'):
        build_optim_wrapper(nn.Linear(2, 2), dict(
            type='OptimWrapper', constructor='UniRepLKNetLayerDecayOptimizerConstructor',
            optimizer=dict(type='AdamW', lr=1e-4), paramwise_cfg=dict(decay_rate=0.9)))


# -- downstream: UperNet (mmseg) and Cascade Mask R-CNN (mmdet) with the tiny arch, one CPU step ---
def _gamma(model):  # the layer scale moves; the large kernel's gradient is small (scale 1e-6)
    return model.backbone.stages[1][0].gamma


def _large_kernel(model):
    return [model.backbone.stages[1][0].dwconv.lk_origin.weight]


def test_upernet_mmseg_train_step_predict_and_fuse():
    downstream.upernet_train_predict_fuse(
        dict(type='UniRepLKNet', arch='tiny', drop_path_rate=0.1, with_cp=True),
        moves=_gamma, gets_grad=_large_kernel)


def test_cascade_mask_rcnn_mmdet_train_step_and_predict():
    log_vars = downstream.rcnn_train_predict(
        'cascade-mask-rcnn_r50_fpn.py',
        dict(type='UniRepLKNet', arch='tiny', drop_path_rate=0.1, frozen_stages=0,
             norm_eval=True), moves=_gamma, gets_grad=_large_kernel)
    assert {'s0.loss_mask', 's2.loss_cls'} <= set(log_vars)


def _with_bn(obj):
    """A config with every SyncBN made BN (one CPU process has no process group)."""
    if isinstance(obj, dict):
        return {k: ('BN' if k == 'type' and v == 'SyncBN' else _with_bn(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_with_bn(v) for v in obj)
    return obj


@pytest.mark.parametrize('rel', [
    'unireplknet/upernet_unireplknet-s-in1k-pre_8xb2-160k_ade20k-512x512.py',
    'unireplknet/cascade-mask-rcnn_unireplknet-s-in1k-pre_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py',
])
def test_config_recipe_trains_the_tiny_arch_one_step(rel):
    """The shipped recipe (optimizer with the authors' layer-wise lr decay, with_cp, the heads'
    structure) with the tiny arch instead of S, BN instead of SyncBN and, for Cascade Mask R-CNN,
    32-channel heads: one optimizer step on CPU."""
    from pathlib import Path

    from mmengine.config import Config, ConfigDict
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, DefaultScope
    cfg = Config.fromfile(str(Path(__file__).resolve().parent.parent / 'configs' / rel))
    model_cfg = _with_bn(cfg.model.to_dict())
    model_cfg['backbone'].update(arch='tiny', init_cfg=None)
    dims = downstream.TINY_DIMS
    if cfg.default_scope == 'mmseg':
        from mmseg.utils import register_all_modules
        model_cfg['data_preprocessor']['size'] = (64, 64)
        model_cfg['decode_head']['in_channels'] = dims
        model_cfg['auxiliary_head']['in_channels'] = dims[2]
        data = downstream.seg_batch(num_classes=150)
    else:
        from mmdet.testing import demo_mm_inputs
        from mmdet.utils import register_all_modules
        model_cfg['neck'].update(in_channels=dims, out_channels=32)  # narrow heads: seconds
        model_cfg['rpn_head'].update(in_channels=32, feat_channels=32)
        roi = model_cfg['roi_head']
        roi['bbox_roi_extractor']['out_channels'] = roi['mask_roi_extractor']['out_channels'] = 32
        for head in roi['bbox_head']:
            head.update(in_channels=32, conv_out_channels=32, fc_out_channels=64)
        roi['mask_head'].update(in_channels=32, conv_out_channels=32)
        data = demo_mm_inputs(2, [(3, 64, 64)] * 2, num_items=[2, 3], num_classes=80,
                              with_mask=True)
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(ConfigDict(model_cfg))
        model.init_weights()
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        lrs = {g['group_name']: g['lr'] for g in optim_wrapper.param_groups if 'group_name' in g}
        assert min(lrs.values()) < max(lrs.values()) == pytest.approx(1e-4)  # decayed per layer
        assert model.backbone.with_cp
        before = model.backbone.stages[1][0].gamma.clone()
        log_vars = model.train_step(copy.deepcopy(data), optim_wrapper)
    assert all(math.isfinite(float(v)) for v in log_vars.values())
    assert not torch.equal(before, model.backbone.stages[1][0].gamma)


def test_tools_fuse_export_round_trip(tmp_path):
    """tools/fuse.py's export on a UniRepLKNet segmentor with DO-Conv stages: the rewritten
    config builds the fused structure (small_kernel_merged=True, no DO-Conv), which loads the
    fused weights strictly and reproduces the trained model."""
    from pathlib import Path

    from mmengine.config import Config

    from reparam_mm.apis import build_model, export_deploy
    base = Path(__file__).resolve().parent.parent / 'configs' / 'unireplknet' / \
        'upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py'
    cfg = Config.fromfile(str(base))
    bn = dict(type='BN', requires_grad=True)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.backbone.update(arch='tiny', init_cfg=None, norm_cfg=bn,
                              stage_with_doconv=(True, True, False, False))
    cfg.model.decode_head.update(in_channels=[16, 32, 64, 128], channels=32, norm_cfg=bn)
    cfg.model.auxiliary_head.update(in_channels=64, channels=16, norm_cfg=bn)
    model = build_model(cfg)
    model.init_weights()
    randomize(model.backbone)
    ckpt = _save(tmp_path, {'state_dict': model.state_dict(), 'meta': {}})
    summary = export_deploy(cfg, ckpt, str(tmp_path / 'deploy'), shape=(64, 64))
    assert summary['changes'] == ['model.backbone.stage_with_doconv -> all False',
                                  'model.backbone.small_kernel_merged -> True']
    assert summary['check']['same_structure'] and summary['check']['max_rel'] < 1e-5
    assert dict(summary['report'].fused) == {'DOConv2d': 9, 'DilatedReparamBlock': 3,
                                             'UniRepLKNetBlock': 5}
