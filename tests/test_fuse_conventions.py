"""The ecosystem's fuse conventions through ``reparam_mm.fuse`` and ``FusedEvalHook``.

mmpretrain cannot be imported on the CPU stack (it imports torchvision), and timm neither, so
the blocks below are small re-implementations that follow each convention exactly as the
libraries do (read from their sources):

* mmpretrain / mmyolo: ``switch_to_deploy()`` fuses in place and returns None, guarded by
  ``self.deploy``; the same blocks have a ``reparameterize()`` that only *returns* the fused
  (kernel, bias); the backbone's ``switch_to_deploy()`` calls its blocks' and sets ``deploy``.
  The deploy conv is built from ``conv_cfg`` and filled through ``.weight.data``.
* timm (MobileOne / FastViT / RepViT): ``reparameterize()`` fuses in place and returns None
  (MobileOneBlock guarded by ``reparam_conv``, FastViT's large-kernel conv not guarded at all);
  RepViT's ``fuse()`` returns a new module, and a parent's ``fuse()`` calls its child's.

They are nested with DO-Conv layers (whose ``.weight`` does not exist until fused) and the
project's RepLKNet large-kernel block.
"""
import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_mm  # noqa: F401  (registers DOConv)
from reparam_mm.backbones.replknet import ReparamLargeKernelConv
from reparam_mm.fuse import fusable_modules, fuse, fuse_convention, fuse_with_report
from reparam_mm.layers.doconv import DOConv2d


def _conv_bn(conv, channels):
    return nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(channels)))


def _bn_kernel(conv_weight, bn):
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return conv_weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _identity_kernel(channels, groups, k, like):
    w = torch.zeros(channels, channels // groups, k, k, dtype=like.dtype, device=like.device)
    for i in range(channels):
        w[i, i % (channels // groups), k // 2, k // 2] = 1
    return w


# -- mmpretrain / mmyolo: switch_to_deploy() in place, returns None ------------------------------
class MMPretrainRepVGGBlock(nn.Module):
    """mmpretrain's RepVGGBlock: 3x3 conv-BN + 1x1 conv-BN (+ BN identity), switch_to_deploy."""

    def __init__(self, in_channels, out_channels, stride=1, conv_cfg=None, deploy=False):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.groups, self.conv_cfg, self.deploy = 1, conv_cfg, deploy
        if deploy:
            self.branch_reparam = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=True)
        else:
            self.branch_norm = nn.BatchNorm2d(in_channels) if (
                in_channels == out_channels and stride == 1) else None
            self.branch_3x3 = _conv_bn(nn.Conv2d(in_channels, out_channels, 3, stride, 1,
                                                 bias=False), out_channels)
            self.branch_1x1 = _conv_bn(nn.Conv2d(in_channels, out_channels, 1, stride, 0,
                                                 bias=False), out_channels)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.deploy:
            return self.act(self.branch_reparam(x))
        norm_out = 0 if self.branch_norm is None else self.branch_norm(x)
        return self.act(self.branch_3x3(x) + self.branch_1x1(x) + norm_out)

    def switch_to_deploy(self):
        if self.deploy:
            return
        weight, bias = self.reparameterize()
        from mmcv.cnn import build_conv_layer
        self.branch_reparam = build_conv_layer(self.conv_cfg, self.in_channels, self.out_channels,
                                               kernel_size=3, stride=self.stride, padding=1,
                                               groups=self.groups, bias=True)
        self.branch_reparam.weight.data = weight
        self.branch_reparam.bias.data = bias
        for param in self.parameters():
            param.detach_()
        delattr(self, 'branch_3x3')
        delattr(self, 'branch_1x1')
        delattr(self, 'branch_norm')
        self.deploy = True

    def reparameterize(self):
        """mmpretrain's helper: returns (weight, bias), changes nothing."""
        w3, b3 = _bn_kernel(self.branch_3x3.conv.weight, self.branch_3x3.norm)
        w1, b1 = _bn_kernel(self.branch_1x1.conv.weight, self.branch_1x1.norm)
        wn, bn = 0, 0
        if self.branch_norm is not None:
            wn, bn = _bn_kernel(_identity_kernel(self.in_channels, self.groups, 3, w3),
                                self.branch_norm)
        return w3 + F.pad(w1, [1, 1, 1, 1]) + wn, b3 + b1 + bn


class MMPretrainRepVGG(nn.Module):
    """mmpretrain's RepVGG backbone level: switch_to_deploy over its blocks, then deploy=True."""

    def __init__(self, channels, num_blocks=2, deploy=False):
        super().__init__()
        self.deploy = deploy
        self.stage_1 = nn.Sequential(*[MMPretrainRepVGGBlock(channels, channels, deploy=deploy)
                                       for _ in range(num_blocks)])

    def forward(self, x):
        return self.stage_1(x)

    def switch_to_deploy(self):
        for m in self.modules():
            if isinstance(m, MMPretrainRepVGGBlock):
                m.switch_to_deploy()
        self.deploy = True


# -- timm: reparameterize() in place, returns None -----------------------------------------------
class TimmMobileOneBlock(nn.Module):
    """timm's MobileOneBlock: kxk conv-BN branches + 1x1 scale + BN identity; reparam_conv guard."""

    def __init__(self, chs, kernel_size=3, num_conv_branches=2, inference_mode=False):
        super().__init__()
        self.chs, self.kernel_size, self.groups = chs, kernel_size, 1
        self.inference_mode = inference_mode
        if inference_mode:
            self.reparam_conv = nn.Conv2d(chs, chs, kernel_size, padding=kernel_size // 2)
            return
        self.reparam_conv = None
        self.identity = nn.BatchNorm2d(chs)
        self.conv_kxk = nn.ModuleList(
            _conv_bn(nn.Conv2d(chs, chs, kernel_size, padding=kernel_size // 2, bias=False), chs)
            for _ in range(num_conv_branches))
        self.conv_scale = _conv_bn(nn.Conv2d(chs, chs, 1, bias=False), chs)
        self.act = nn.ReLU()

    def forward(self, x):
        if self.reparam_conv is not None:
            return F.relu(self.reparam_conv(x))
        out = self.identity(x) + self.conv_scale(x)
        for conv in self.conv_kxk:
            out = out + conv(x)
        return self.act(out)

    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        pad = self.kernel_size // 2
        scale = self.conv_scale
        kernel, bias = _bn_kernel(F.pad(scale.conv.weight, [pad] * 4), scale.norm)
        eye = _identity_kernel(self.chs, 1, self.kernel_size, kernel)
        k_id, b_id = _bn_kernel(eye, self.identity)
        kernel, bias = kernel + k_id, bias + b_id
        for conv in self.conv_kxk:
            k, b = _bn_kernel(conv.conv.weight, conv.norm)
            kernel, bias = kernel + k, bias + b
        self.reparam_conv = nn.Conv2d(self.chs, self.chs, self.kernel_size, padding=pad, bias=True)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for name, param in self.named_parameters():
            if 'reparam_conv' not in name:
                param.detach_()
        self.__delattr__('conv_kxk')
        self.__delattr__('conv_scale')
        self.__delattr__('identity')
        self.inference_mode = True


class TimmReparamLargeKernelConv(nn.Module):
    """timm's FastViT large-kernel conv: reparameterize() has no guard (a 2nd call would fail)."""

    def __init__(self, chs, kernel_size=7, small_kernel=3):
        super().__init__()
        self.chs, self.kernel_size, self.small_kernel = chs, kernel_size, small_kernel
        self.large_conv = _conv_bn(nn.Conv2d(chs, chs, kernel_size, padding=kernel_size // 2,
                                             groups=chs, bias=False), chs)
        self.small_conv = _conv_bn(nn.Conv2d(chs, chs, small_kernel, padding=small_kernel // 2,
                                             groups=chs, bias=False), chs)

    def forward(self, x):
        if hasattr(self, 'lkb_reparam'):
            return self.lkb_reparam(x)
        return self.large_conv(x) + self.small_conv(x)

    def reparameterize(self) -> None:
        eq_k, eq_b = _bn_kernel(self.large_conv.conv.weight, self.large_conv.norm)
        small_k, small_b = _bn_kernel(self.small_conv.conv.weight, self.small_conv.norm)
        eq_k = eq_k + F.pad(small_k, [(self.kernel_size - self.small_kernel) // 2] * 4)
        self.lkb_reparam = nn.Conv2d(self.chs, self.chs, self.kernel_size,
                                     padding=self.kernel_size // 2, groups=self.chs, bias=True)
        self.lkb_reparam.weight.data = eq_k
        self.lkb_reparam.bias.data = eq_b + small_b
        self.__delattr__('large_conv')
        self.__delattr__('small_conv')


# -- timm: fuse() returns the replacing module --------------------------------------------------
class TimmConvNorm(nn.Sequential):
    """timm's RepViT ConvNorm (c, bn): fuse() returns a new nn.Conv2d."""

    def __init__(self, in_dim, out_dim, ks=1, pad=0, groups=1):
        super().__init__()
        self.add_module('c', nn.Conv2d(in_dim, out_dim, ks, 1, pad, groups=groups, bias=False))
        self.add_module('bn', nn.BatchNorm2d(out_dim))

    @torch.no_grad()
    def fuse(self):
        c, bn = self._modules.values()
        w, b = _bn_kernel(c.weight, bn)
        m = nn.Conv2d(w.size(1) * c.groups, w.size(0), w.shape[2:], padding=c.padding,
                      groups=c.groups)
        m.weight.data.copy_(w)
        m.bias.data.copy_(b)
        return m


class TimmRepVggDw(nn.Module):
    """timm's RepViT RepVggDw: its fuse() calls its child's fuse() (timm walks parent-first)."""

    def __init__(self, ed):
        super().__init__()
        self.conv = TimmConvNorm(ed, ed, 3, 1, groups=ed)
        self.conv1 = nn.Conv2d(ed, ed, 1, 1, 0, groups=ed)
        self.bn = nn.BatchNorm2d(ed)

    def forward(self, x):
        return self.bn(self.conv(x) + self.conv1(x) + x)

    @torch.no_grad()
    def fuse(self):
        conv = self.conv.fuse()
        w = conv.weight + F.pad(self.conv1.weight, [1, 1, 1, 1]) + F.pad(
            torch.ones(conv.weight.shape[0], 1, 1, 1), [1, 1, 1, 1])
        b = conv.bias + self.conv1.bias
        w, b2 = _bn_kernel(w, self.bn)
        conv.weight.data.copy_(w)
        conv.bias.data.copy_(b * self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt() + b2)
        return conv


# -- all of them, nested with DO-Conv and RepLKNet parts -----------------------------------------
class ZooNet(nn.Module):
    """A DO-Conv stem, then one block per convention, DO-Conv inside the foreign blocks too."""

    def __init__(self, ch=8):
        super().__init__()
        self.stem = DOConv2d(3, ch, 3, padding=1)
        self.repvgg = MMPretrainRepVGG(ch)
        # DO-Conv where the foreign blocks read a child's .weight: only correct children first
        self.repvgg.stage_1[0].branch_3x3.conv = DOConv2d(ch, ch, 3, padding=1, bias=False)
        self.mobileone = TimmMobileOneBlock(ch)
        self.fastvit_lk = TimmReparamLargeKernelConv(ch)
        self.fastvit_lk.small_conv.conv = DOConv2d(ch, ch, 3, padding=1, groups=ch, bias=False)
        self.repvit = TimmRepVggDw(ch)
        self.repvit.conv.c = DOConv2d(ch, ch, 3, padding=1, groups=ch, bias=False)
        self.replk = ReparamLargeKernelConv(ch, 7, small_kernel=3, conv_cfg=dict(type='DOConv'))
        self.head = nn.Conv2d(ch, 4, 1)

    def forward(self, x):
        x = self.repvgg(F.relu(self.stem(x)))
        x = self.fastvit_lk(self.mobileone(x))
        return self.head(F.relu(self.replk(self.repvit(x))))


EXPECTED = {'DOConv2d': 5, 'MMPretrainRepVGGBlock': 2, 'ReparamLargeKernelConv': 1,
            'TimmMobileOneBlock': 1, 'TimmReparamLargeKernelConv': 1, 'TimmRepVggDw': 1}
EXPECTED_VIA = {'fuse': 1, 'reparameterize': 2, 'switch_to_deploy': 2, 'to_fused': 6}
TRAINING_PARTS = ('branch_3x3', 'branch_1x1', 'branch_norm', 'conv_kxk', 'conv_scale',
                  'identity', 'large_conv', 'small_conv', 'lkb_origin')


@torch.no_grad()
def randomize(model, seed=0):
    """Random weights, D and BN statistics, so every branch and every fused term matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.2)
        elif isinstance(m, DOConv2d):
            m.D.copy_(torch.randn(m.D.shape, generator=g) * 0.1)
    return model


def zoo(seed=0):
    torch.manual_seed(seed)
    return randomize(ZooNet(), seed).eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_convention_fused_children_first_and_a_second_pass_is_a_no_op():
    model = zoo()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        fused, report = fuse_with_report(copy.deepcopy(model))
        assert rel_err(fused(x), ref) < 1e-5
    assert report.fused == EXPECTED and report.conventions == EXPECTED_VIA
    assert 'via fuse() 1, reparameterize() 2, switch_to_deploy() 2, to_fused() 6' in str(report)
    # training-time branches are gone: no BN, no DO-Conv, no branch modules left
    assert not any(isinstance(m, (nn.BatchNorm2d, DOConv2d)) for m in fused.modules())
    assert not any(n.rsplit('.', 1)[-1] in TRAINING_PARTS for n, _ in fused.named_modules())
    assert fused.repvgg.deploy and all(b.deploy for b in fused.repvgg.stage_1)
    assert fused.mobileone.inference_mode and isinstance(fused.repvit, nn.Conv2d)
    assert report.params_after < report.params_before
    # second pass: nothing called (FastViT's unguarded reparameterize() would raise), no change
    assert fusable_modules(fused) == [('replk', fused.replk)]  # to_fused is idempotent itself
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    again, report2 = fuse_with_report(fused)
    assert again is fused and report2.fused == {} and report2.conventions == {}
    assert set(fused.state_dict()) == set(state)
    assert all(torch.equal(v, state[k]) for k, v in fused.state_dict().items())


def fuse_in_sequential(block):
    """``(fused nn.Sequential(block), report)`` of a random-weight copy of ``block`` in eval
    mode, checked to compute what it did."""
    block = randomize(block).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = block(x)
        fused, report = fuse_with_report(nn.Sequential(copy.deepcopy(block)))
        assert rel_err(fused(x), ref) < 1e-5
    return fused, report


def test_parent_first_for_nested_timm_fuse_calls_only_the_outer_one():
    fused, report = fuse_in_sequential(TimmRepVggDw(4))
    # the inner ConvNorm.fuse() is RepVggDw.fuse()'s job; called first, it would leave a Conv2d
    # for RepVggDw.fuse() to call .fuse() on
    assert report.fused == {'TimmRepVggDw': 1} and type(fused[0]) is nn.Conv2d


class TimmFusesOnlyItsOwnConv(nn.Module):
    """A timm ``fuse()`` that folds its own conv + BN and hands back a new module still holding
    a child with a ``fuse()`` of its own, which it leaves to its caller."""

    def __init__(self, ch):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)
        self.mlp = TimmConvNorm(ch, ch)

    def forward(self, x):
        return self.mlp(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse(self):
        w, b = _bn_kernel(self.conv.weight, self.bn)
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, padding=1)
        conv.weight.copy_(w)
        conv.bias.copy_(b)
        return nn.Sequential(conv, self.mlp)


def test_what_a_timm_fuse_returns_unfused_is_fused_after_it():
    fused, report = fuse_in_sequential(TimmFusesOnlyItsOwnConv(4))
    assert report.fused == {'TimmConvNorm': 1, 'TimmFusesOnlyItsOwnConv': 1}
    assert [type(m) for m in fused[0]] == [nn.Conv2d, nn.Conv2d]


def test_training_mode_is_refused_before_anything_changes():
    model = zoo().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(RuntimeError, match=r'training mode \(stem, repvgg, repvgg\.stage_1\.0 '
                                           r'and \d+ more\).*model\.eval\(\)'):
        fuse(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.repvgg.deploy and model.mobileone.reparam_conv is None


def test_modules_already_in_deploy_form_are_not_called():
    class Exploding(MMPretrainRepVGGBlock):
        def switch_to_deploy(self):
            raise AssertionError('must not be called on a deploy block')

    deploy = nn.Sequential(Exploding(4, 4, deploy=True), TimmMobileOneBlock(4, inference_mode=True),
                           MMPretrainRepVGG(4, deploy=True)).eval()
    assert [fuse_convention(m) for m in deploy] == [None, None, None]
    fuse(deploy)
    assert fuse.last_report.fused == {}


def test_methods_that_are_not_fuse_conventions_are_left_alone():
    class FeatureFusion(nn.Module):
        """mmseg-style: a fuse(x, y) taking inputs, a child module named fuse, a deploy flag."""

        def __init__(self):
            super().__init__()
            self.deploy = False
            self.fuse = nn.Conv2d(8, 4, 1)
            self.inner = nn.Module()
            self.inner.reparameterize = lambda mu, logvar: mu  # instance attribute, not a method

        def forward(self, x):
            return self.fuse(x)

    class TwoInputs(nn.Module):
        def fuse(self, x, y):
            return x + y

        def switch_to_deploy(self, target):
            raise AssertionError('needs an argument: not the convention')

    model = nn.Sequential(FeatureFusion(), TwoInputs()).eval()
    assert fusable_modules(model) == []
    fuse(model)
    assert fuse.last_report.fused == {} and isinstance(model[0].fuse, nn.Conv2d)


def test_a_helper_returning_values_without_fusing_is_a_clear_error():
    class OnlyHelper(MMPretrainRepVGGBlock):
        switch_to_deploy = None  # only mmpretrain's reparameterize() helper remains

    block = randomize(OnlyHelper(4, 4)).eval()
    state = {k: v.clone() for k, v in block.state_dict().items()}
    with pytest.raises(TypeError, match=r"OnlyHelper\.reparameterize\(\) of 0 returned tuple "
                                        r"and left the module unchanged.*to_fused\(\)"):
        fuse(nn.Sequential(block))
    assert all(torch.equal(v, state[k]) for k, v in block.state_dict().items())


def test_a_failing_foreign_method_names_its_place_in_the_model():
    class NeedsBN(MMPretrainRepVGGBlock):
        def switch_to_deploy(self):
            assert False, "Switch is not allowed when norm_cfg['type'] != 'BN'."  # noqa: B011 (as mmpretrain writes it)

    model = nn.Sequential(nn.Sequential(nn.Identity(), NeedsBN(4, 4))).eval()
    with pytest.raises(AssertionError) as err:
        fuse(model)
    notes = ''.join(getattr(err.value, '__notes__', []))
    assert 'raised by NeedsBN.switch_to_deploy() of 0.1' in notes


def test_mmpretrain_conv_cfg_doconv_deploy_conv_is_fused_too():
    """mmpretrain builds its deploy conv from conv_cfg: with DO-Conv there it would assign
    .weight.data to a layer that has no .weight; converting the plain convs instead (what
    DOConvBackbone does) leaves conv_cfg=None and the deploy conv plain."""
    block = MMPretrainRepVGGBlock(4, 4, conv_cfg=dict(type='DOConv'))
    block.branch_3x3.conv = DOConv2d(4, 4, 3, padding=1, bias=False)
    block = randomize(block).eval()
    with pytest.raises(AttributeError, match="'DOConv2d' object has no attribute 'weight'"):
        fuse(nn.Sequential(copy.deepcopy(block)))
    block.conv_cfg = None
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        ref = block(x)
        fused = fuse(nn.Sequential(block))
        assert rel_err(fused(x), ref) < 1e-5 and type(fused[0].branch_reparam) is nn.Conv2d


# -- FusedEvalHook on the same model ---------------------------------------------------------------
def test_fused_eval_hook_validates_and_tests_the_zoo_fused(tmp_path):
    from mmengine.evaluator import Evaluator
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from test_fused_eval_hook import ToyMetric, _loader

    from reparam_mm.hooks import FusedEvalHook

    class ZooClassifier(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = randomize(ZooNet(ch=4))
            self.cls = nn.Linear(4, 2)

        def forward(self, inputs, labels=None, mode='tensor'):
            logits = self.cls(self.net(inputs).mean((2, 3)))
            if mode == 'loss':
                return {'loss': F.cross_entropy(logits, labels)}
            if mode == 'predict':
                return [dict(logits=lg, label=lb) for lg, lb in zip(logits, labels)]
            return logits

    torch.manual_seed(0)
    hook = FusedEvalHook()
    runner = Runner(
        model=ZooClassifier(), work_dir=str(tmp_path),
        train_dataloader=_loader(8, 0, shuffle=True), val_dataloader=_loader(4, 1),
        test_dataloader=_loader(4, 1), val_evaluator=Evaluator(ToyMetric()),
        test_evaluator=Evaluator(ToyMetric()),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        train_cfg=dict(by_epoch=False, max_iters=2, val_interval=2),
        val_cfg=dict(), test_cfg=dict(),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=100, by_epoch=False)),
        custom_hooks=[hook], randomness=dict(seed=0), experiment_name='fuse_conventions_hook')
    runner.train()
    # validation ran on a fused copy; the trained model keeps every training-time branch
    assert hook.last_report.fused == EXPECTED and hook.last_report.conventions == EXPECTED_VIA
    assert hook.last_check['same_structure'] and hook.last_check['max_rel'] < 1e-5
    net = runner.model.net
    assert isinstance(net.stem, DOConv2d) and not net.repvgg.deploy
    assert hasattr(net.fastvit_lk, 'large_conv')
    val_report = hook.last_report
    runner.test()  # fused in place, checked against the unfused model on the first batch
    assert hook.last_report.fused == val_report.fused and hook.last_check['max_rel'] < 1e-5
    assert not any(isinstance(m, (nn.BatchNorm2d, DOConv2d)) for m in runner.model.net.modules())


def test_deploy_config_sets_deploy_on_switch_to_deploy_models():
    """tools/fuse.py's rewrite for mmpretrain-style models (checked here on the re-implementation,
    registered under a test name): deploy=True builds the structure the fuse leaves."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    from reparam_mm.apis import build_model, deploy_config

    MODELS.register_module('TestMMPretrainRepVGG', module=MMPretrainRepVGG, force=True)
    cfg = Config(dict(default_scope='mmseg', model=dict(type='TestMMPretrainRepVGG', channels=4)))
    model = randomize(build_model(cfg)).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
        fused = fuse(model)
    dcfg, changes = deploy_config(cfg)
    assert changes == ['model.deploy -> True'] and dcfg.model.deploy is True
    deploy = build_model(dcfg).eval()
    deploy.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(deploy(x), ref) < 1e-5
