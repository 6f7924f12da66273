"""Where a DO-Conv model's training step spends its extra time (issue 16: "profile where the
extra time goes"), measured beside a training ``--compare`` of a plain and a DO-Conv model:

* the composition of every ``DOConv2d``'s kernel from W and D, its forward and its backward,
  timed alone over all layers (the work a plain conv does not do);
* each model's optimizer step, timed alone on gradients of zeros at learning rate 0 (the DO-Conv
  model updates W and D);
* the rest of the step difference: autograd's per-layer bookkeeping, memory traffic, noise.
"""
import numpy as np
import torch

from reparam_mm.layers.doconv import DOConv2d

from .measure import time_calls


def doconv_layers(model):
    """The DOConv2d modules that compose a kernel (1x1 ones have no D and compose nothing)."""
    return [m for m in model.modules() if isinstance(m, DOConv2d) and m.D is not None]


def _median_ms(fn, repeat, device):
    return float(np.median(time_calls(fn, device, repeat, warmup=1))) * 1e3


def composition_ms(model, repeat=5):
    """Median ms of composing every DO-Conv kernel (forward), and of its backward alone."""
    layers = doconv_layers(model)
    if not layers:
        return None
    params = [p for m in layers for p in (m.W, m.D)]
    grads = [torch.ones_like(m.composed_weight()) for m in layers]
    saved = [p.grad for p in params]

    def forward():
        with torch.enable_grad():
            return [m.composed_weight() for m in layers]

    def forward_backward():
        torch.autograd.grad(forward(), params, grads)  # no .grad written

    fwd = _median_ms(forward, repeat, params[0].device)
    both = _median_ms(forward_backward, repeat, params[0].device)
    for p, g in zip(params, saved):
        p.grad = g
    return dict(layers=len(layers), forward_ms=fwd, backward_ms=max(0., both - fwd),
                kernel_mb=sum(m.W.shape[0] * m.W.shape[1] * m.D.shape[1] * m.W.element_size()
                              for m in layers) / 2**20)


def optimizer_step_ms(variant, repeat=5):
    """Median ms of the variant's optimizer step on zero gradients (weights held, lr 0)."""
    optimizer = variant.optim_wrapper.optimizer
    if any(group['lr'] != 0 for group in optimizer.param_groups):
        raise ValueError('time the optimizer step only with the weights held (lr 0): '
                         'Variant.hold_weights().')
    params = [p for group in optimizer.param_groups for p in group['params'] if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    ms = _median_ms(optimizer.step, repeat, params[0].device)
    for p, g in zip(params, saved):
        p.grad = g
    return dict(ms=ms, tensors=len(params), params=sum(p.numel() for p in params))


def _composition_total(per_variant):
    c = per_variant['composition']
    return c['forward_ms'] + c['backward_ms'] if c else 0.


def breakdown(variants, step_ms, repeat=5):
    """The step difference B - A split into DO-Conv composition, optimizer and the rest."""
    per = []
    for v in variants:
        with v.optim_wrapper.optim_context(v.model):  # autocast, as in the step, under AMP
            composition = composition_ms(v.model, repeat)
        per.append(dict(name=v.name, composition=composition,
                        optimizer=optimizer_step_ms(v, repeat)))
    extra = step_ms[1] - step_ms[0]
    comp_ms = _composition_total(per[1]) - _composition_total(per[0])
    opt_ms = per[1]['optimizer']['ms'] - per[0]['optimizer']['ms']
    return dict(variants=per, step_extra_ms=extra, composition_ms=comp_ms,
                optimizer_extra_ms=opt_ms, rest_ms=extra - comp_ms - opt_ms,
                step_a_ms=step_ms[0])


def render_breakdown(b):
    """One paragraph of markdown."""
    comp = next((p['composition'] for p in b['variants'][::-1] if p['composition']), None)
    step = b['step_a_ms']

    def pct(ms):
        return f'{ms:.0f} ms ({100 * ms / step:.1f}% of a plain step)'
    opt = ' vs '.join(f"{p['optimizer']['ms']:.0f} ms ({p['optimizer']['tensors']} tensors)"
                      for p in b['variants'])
    parts = [f"**Where B's extra {pct(b['step_extra_ms'])} goes** (each part timed alone):"]
    if comp:
        parts.append(f"composing {comp['layers']} DO-Conv kernels {comp['forward_ms']:.0f} ms "
                     f"forward + {comp['backward_ms']:.0f} ms backward = "
                     f"{pct(b['composition_ms'])};")
    parts.append(f"optimizer step {opt}, B's extra {pct(b['optimizer_extra_ms'])};")
    parts.append(f"the rest (autograd bookkeeping, memory traffic, noise) {pct(b['rest_ms'])}.")
    return ' '.join(parts)
