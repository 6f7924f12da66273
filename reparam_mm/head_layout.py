"""The memory layout of the modules that read the backbone's features, timed per machine.

A RepLKNet backbone times NCHW against channels_last for itself (``layers/large_kernel.py``);
the neck and heads after it (mmseg's decode and auxiliary heads, mmdet's FPN, RPN and RoI
heads) are upstream modules that run in whatever layout their weights and inputs have. Which
layout is faster depends on the machine and the precision: under bf16 on an AMX Xeon, oneDNN's
NCHW convs are slow and channels_last ones fast (docs/benchmarks.md), elsewhere the two are
close.

:func:`tune_head_layouts` gives each such module a small hook that, at the module's first call
of each :func:`~reparam_mm.layers.large_kernel.layout_signature` (module, precision, size
bucket, eval / train), times both layouts with the large-kernel tuner (same cache, same
contention rule) and converts the module's 4-D weights to the faster one: in evaluation
(forward, no gradients) and in training (forward and backward, as the step runs them), each
timed and kept apart. A module that runs channels_last hands its outputs back in its input's
layout (mmcv's RoIAlign reads NCHW), except mmseg's decode head, whose ``forward`` is called
directly and whose logits may come back channels_last (same values). Nothing is timed in fixed
mode (``REPARAM_MM_LARGE_DW=fixed``), while exporting or compiling, on devices other than CPU
and CUDA, or in a mixed state (an eval-mode module under gradients, a training-mode one
without): there the weights keep the layout they have.

Distributed runs are different: the weights are DDP's, and when it rebuilds its gradient
buckets after the first step, each rank lays its bucket views out in the strides its weights
have then, so ranks whose layouts differed would all-reduce different elements into each other.
There evaluation of the trained weights times nothing, and training does only after
:func:`allow_agreed_layouts` (tools/train.py, under DDP): during the first step each rank times
its modules on collective-free copies (SyncBN would meet the other ranks' collectives) and keeps
the result as a proposal, the step itself running in the layout the weights have;
:func:`agree_head_layouts` after that step gives every rank rank 0's proposals, before DDP
rebuilds its buckets, and the layouts stay so for the run. A model no DDP trains (``FusedEvalHook``'s fused copy, a model under test) is
evaluated as in one process after :func:`allow_per_rank_layouts`: each rank times and sets its
own layouts, which changes no collective (an evaluation forward issues none) and no rank's
results beyond rounding.
"""
import itertools

import torch
from torch import nn

from .layers import large_kernel
from .layers.doconv import DOConv2d

__all__ = ['tune_head_layouts', 'head_modules', 'module_layout', 'set_module_layout',
           'allow_agreed_layouts', 'agree_head_layouts', 'allow_per_rank_layouts']

_FORMATS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def _is_doconv(module):
    """A DO-Conv layer (unfused: training), whose kernel is composed at every call."""
    return isinstance(module, DOConv2d)


def module_layout(module) -> str:
    """The layout of the first kernel in ``module`` whose layouts differ (more than one input
    channel and one kernel element; a 1x1 or depthwise kernel is both): a 4-D parameter's, or
    a DO-Conv layer's ``kernel_layout``; 'nchw' if there is none."""
    for m in module.modules():
        if _is_doconv(m):
            if m.in_channels // m.groups > 1 and m.kernel_size[0] * m.kernel_size[1] > 1:
                return m.kernel_layout
            continue
        for p in m.parameters(recurse=False):
            if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
                return 'channels_last' if _is_channels_last(p) else 'nchw'
    return 'nchw'


def set_module_layout(module, layout):
    """Convert the 4-D parameters and buffers of ``module`` to ``layout`` in place (the same
    ``Parameter`` objects, so an optimizer's references stay valid), and have its DO-Conv
    layers compose their kernels in it.

    Autocast's cache of cast weights is emptied after a change: it is keyed by the parameter,
    so within the same autocast region it would go on handing out the former layout.
    Every kernel is checked, not only the first: a fused copy of a head trained channels_last
    holds both (its DO-Conv layers' fused kernels come out NCHW)."""
    fmt = _FORMATS[layout]
    stale = any(t.dim() == 4 and not t.is_contiguous(memory_format=fmt)
                for t in itertools.chain(module.parameters(), module.buffers()))
    doconvs = [m for m in module.modules() if _is_doconv(m) and m.kernel_layout != layout]
    if not stale and not doconvs:
        return
    module.to(memory_format=fmt)
    for m in doconvs:
        m.kernel_layout = layout
    torch.clear_autocast_cache()


def _tensors(out):
    """The tensors in a (nested) tuple / list / dict output, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _as_nchw(out):
    """``out`` with its 4-D tensors NCHW-contiguous (same nesting)."""
    if isinstance(out, torch.Tensor):
        return out.contiguous() if out.dim() == 4 else out
    if isinstance(out, tuple) and hasattr(out, '_fields'):  # a namedtuple
        return type(out)(*(_as_nchw(o) for o in out))
    if isinstance(out, (list, tuple)):
        return type(out)(_as_nchw(o) for o in out)
    return out


def _is_channels_last(t):
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class _LayoutChoice:
    """Times and sets the layout of one module (a hook's callable; a deep copy of the model
    copies it with the model, pointing at the copy's module)."""

    #: True while any module's layouts are timed: its runs call the module, and through it the
    #: hooks of the modules it feeds, which must not start timings of their own inside
    timing = False

    def __init__(self, module, train_only=False):
        self.module = module
        self.train_only = train_only  # mmseg's auxiliary head: evaluation never calls it
        # distributed runs (module docstring): 'proposing' after allow_agreed_layouts, 'agreed'
        # after agree_head_layouts, 'per-rank' after allow_per_rank_layouts; None: nothing is
        # timed there
        self.agreement = None
        self.proposal = None

    def applies(self, x):
        module = self.module
        if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type in ('cpu', 'cuda')
                and not _LayoutChoice.timing and module.training == torch.is_grad_enabled()
                and (module.training or not self.train_only)
                and large_kernel.active_dispatch_mode() == 'tuned'
                and not large_kernel._exporting()):
            return False
        if not large_kernel._distributed() or self.agreement == 'per-rank':
            return True
        return module.training and self.agreement == 'proposing'

    def choose(self, x, run):
        """Time ``run(m)`` (module ``m`` on the call's real inputs) in both layouts for ``x``'s
        signature and leave the module in the faster one; in distributed training, time a
        collective-free copy and keep the faster layout as this rank's proposal instead."""
        module = self.module
        proposing = large_kernel._distributed() and self.agreement != 'per-rank'
        if proposing:
            known = large_kernel.TUNER.known_layout(module, x)
            if known is not None:
                self.proposal = known
                return
            module = large_kernel.collective_free_copy(module)

        def forward(_, channels_last):
            set_module_layout(module, 'channels_last' if channels_last else 'nchw')
            return tuple(_tensors(run(module)))

        _LayoutChoice.timing = True
        try:
            choice = large_kernel.TUNER.choose_layout(module, x, forward, subject='memory layout',
                                                      fixed=module_layout(self.module))
            large_kernel.TUNER.take_output(module, x, choice == 'channels_last')  # not reused
        except Exception as e:  # noqa: BLE001
            if not proposing:
                raise  # the module itself fails on this input: its own error says why
            # the copy's BN fails where the step's SyncBN does not (one image per GPU, a BN
            # after 1x1 pooling: SyncBN normalises over every rank's images), so this rank
            # proposes nothing and the module keeps its layout
            large_kernel.copy_timing_failed(self.module, e)
            return
        finally:
            _LayoutChoice.timing = False
        if proposing:
            self.proposal = choice
        else:
            set_module_layout(module, choice)


class _ChooseBeforeCall(_LayoutChoice):
    """Forward pre-hook of a module called as ``module(*args)``; with :class:`_ReturnInInputLayout`."""

    def __call__(self, module, args):
        x = next(iter(_tensors(args)), None)
        if self.applies(x):
            self.choose(x, lambda m: m(*args))


class _ReturnInInputLayout:
    """Forward hook: a module computing channels_last returns its outputs in the input's layout."""

    def __call__(self, module, args, out):
        x = next(iter(_tensors(args)), None)
        if x is None or x.dim() != 4 or _is_channels_last(x) or module_layout(module) == 'nchw':
            return None
        return _as_nchw(out)


class _ChooseForDecodeHead(_LayoutChoice):
    """Forward hook of the module feeding an mmseg decode or auxiliary head (its neck, else its
    backbone): mmseg calls ``head.forward(features)`` directly, so the head's own hooks never
    run."""

    def __call__(self, producer, args, features):
        feats = _tensors(features)
        if feats and self.applies(feats[0]):
            self.choose(feats[0], lambda m: m.forward(features))


def _has_kernels(module):
    """Whether ``module`` holds a conv kernel: a 4-D weight, or a DO-Conv layer composing one."""
    return any(p.dim() == 4 for p in module.parameters()) or any(map(_is_doconv, module.modules()))


def _inner_model(model):
    """The segmentor or detector inside a test-time augmentation wrapper (mmengine's
    ``BaseTTAModel`` keeps it as ``.module``): its neck and heads were not found under ``--tta``,
    so none was tuned, while the log said they were."""
    from mmengine.model import BaseTTAModel
    return model.module if isinstance(model, BaseTTAModel) else model


def head_modules(model):
    """``(name, module, how)`` for each module after the backbone whose layout can be tuned:
    ``how`` is 'decode_head' (mmseg's decode head, timed on the features handed to it),
    'auxiliary_head' (the same, each of mmseg's auxiliary heads, in training only) or 'call' (a
    neck, a dense head, each of a RoI head's bbox / mask heads). Modules without 4-D weights
    (the RoI heads' fully connected layers) are left out."""
    found = []
    model = _inner_model(model)

    def add(name, module, how='call'):
        if isinstance(module, nn.ModuleList):
            for i, m in enumerate(module):
                add(f'{name}.{i}', m, how)
        elif isinstance(module, nn.Module) and _has_kernels(module):
            found.append((name, module, how))

    decode_head = getattr(model, 'decode_head', None)
    if isinstance(decode_head, nn.Module) and not isinstance(decode_head, nn.ModuleList) \
            and getattr(model, 'backbone', None) is not None:
        add('decode_head', decode_head, 'decode_head')
        if isinstance(getattr(model, 'auxiliary_head', None), nn.Module):
            add('auxiliary_head', model.auxiliary_head, 'auxiliary_head')
    if getattr(model, 'neck', None) is not None:
        add('neck', model.neck)
    for name in ('rpn_head', 'bbox_head'):
        if getattr(model, name, None) is not None:
            add(name, getattr(model, name))
    roi_head = getattr(model, 'roi_head', None)
    if roi_head is not None:
        for name in ('bbox_head', 'mask_head'):
            if getattr(roi_head, name, None) is not None:
                add(f'roi_head.{name}', getattr(roi_head, name))
    return found


def tune_head_layouts(model):
    """Give each of :func:`head_modules` the hooks that time and set its layout (module
    docstring); returns the names hooked. Calling it again on the same model adds nothing.
    tools/train.py, tools/test.py, tools/infer.py and ``FusedEvalHook`` apply it."""
    hooked = []
    model = _inner_model(model)
    # the modules called as module(...) first: their output hooks run before the decode head's
    for name, module, how in sorted(head_modules(model), key=lambda m: m[2] != 'call'):
        if how != 'call':
            producer = model.neck if getattr(model, 'neck', None) is not None else model.backbone
            if any(isinstance(h, _ChooseForDecodeHead) and h.module is module
                   for h in producer._forward_hooks.values()):
                continue
            producer.register_forward_hook(_ChooseForDecodeHead(module, how == 'auxiliary_head'))
        else:
            if any(isinstance(h, _ChooseBeforeCall) for h in module._forward_pre_hooks.values()):
                continue
            module.register_forward_pre_hook(_ChooseBeforeCall(module))
            module.register_forward_hook(_ReturnInInputLayout())
        hooked.append(name)
    return hooked


def _layout_choices(model):
    """``(name, choice)`` for each layout hook on ``model``, in module order (the same on every
    rank)."""
    names = {id(m): name for name, m in model.named_modules()}
    return [(names.get(id(hook.module), type(hook.module).__name__), hook)
            for m in model.modules()
            for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
            if isinstance(hook, _LayoutChoice)]


def allow_agreed_layouts(model):
    """Let the hooked modules of a distributed training ``model`` propose their layouts during
    the next training step, to be agreed on by :func:`agree_head_layouts` after it (module
    docstring). Only for a model whose every rank runs the same steps and calls
    :func:`agree_head_layouts` at the same point (tools/train.py under DDP). Returns the number
    of modules."""
    choices = _layout_choices(model)
    for _, choice in choices:
        choice.agreement, choice.proposal = 'proposing', None
    return len(choices)


def allow_per_rank_layouts(model):
    """Let each rank of a distributed run time and set the layouts of ``model``'s hooked modules
    for itself, as one process does: only for a model no DDP trains (a fused copy evaluated,
    a model under test), whose weights' strides no gradient bucket follows. Returns the number
    of modules."""
    choices = _layout_choices(model)
    for _, choice in choices:
        choice.agreement, choice.proposal = 'per-rank', None
    return len(choices)


def agree_head_layouts(model):
    """Give every hooked module of ``model`` rank 0's proposed layout (a collective: every rank
    calls it at the same point, after the first training step and before the second, which is
    when DDP rebuilds its gradient buckets in the weights' strides); a module rank 0 proposed
    nothing for keeps its layout. Nothing is timed for them in training afterwards. Returns
    ``{name: layout}`` of the modules set."""
    from mmengine.dist import broadcast_object_list
    choices = [(name, c) for name, c in _layout_choices(model) if c.agreement == 'proposing']
    proposals = [c.proposal for _, c in choices]
    if large_kernel._distributed():
        broadcast_object_list(proposals, src=0)
    agreed = {}
    for (name, choice), layout in zip(choices, proposals):
        choice.agreement, choice.proposal = 'agreed', None
        if layout is not None:
            set_module_layout(choice.module, layout)
            agreed[name] = layout
    return agreed
