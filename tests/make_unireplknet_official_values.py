"""Print the official-model values that ``tests/test_unireplknet.py`` records (not run by the tests).

    .venv/bin/python tests/make_unireplknet_official_values.py /path/to/UniRepLKNet/unireplknet.py

Imports the authors' ``unireplknet.py`` (AILab-CVC/UniRepLKNet, commit b5677d8) with the three
timm helpers it needs stubbed (timm does not import beside this project's CPU torch) and prints,
for every arch, the parameter counts of the ImageNet classifier, of the downstream backbone (their
OpenMMLab mode: ``norm0..3``, no classifier) and of its ``deploy=True`` form, with a hash of the
downstream state-dict layout (sorted ``key:shape`` lines) in both forms; then, for the test's tiny
arch, the features of their downstream model loaded with the test's deterministic state dict
(float64), which the test compares against.
"""
import collections.abc
import contextlib
import importlib.util
import io
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_unireplknet import (FIXTURE_ARCH, FIXTURE_CLASSES, feature_probes,  # noqa: E402
                              fixture_input, layout_hash, synthetic_state)

ARCHS = {'A': 'a', 'F': 'f', 'P': 'p', 'N': 'n', 'T': 't', 'S': 's', 'B': 'b', 'L': 'l', 'XL': 'xl'}


def _stub_timm():
    layers = types.ModuleType('timm.models.layers')
    layers.trunc_normal_ = lambda t, std=1.0, **kw: nn.init.trunc_normal_(t, std=std)
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)

    class DropPath(nn.Identity):  # only built with drop_path_rate=0 here
        def __init__(self, *args, **kwargs):
            super().__init__()

    layers.DropPath = DropPath
    registry = types.ModuleType('timm.models.registry')
    registry.register_model = lambda fn: fn
    sys.modules.update({'timm': types.ModuleType('timm'),
                        'timm.models': types.ModuleType('timm.models'),
                        'timm.models.layers': layers, 'timm.models.registry': registry})


def import_official(path):
    _stub_timm()
    spec = importlib.util.spec_from_file_location('official_unireplknet', path)
    module = importlib.util.module_from_spec(spec)
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(module)
    module.get_root_logger = lambda: None  # their downstream mode asks for a logger
    # dtype-only shim: their dilated->dense conversion builds its 1x1 identity in float32
    module.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith('__')})
    module.F.conv_transpose2d = lambda k, w, **kw: F.conv_transpose2d(k, w.to(k.dtype), **kw)
    return module


def main(path):
    U = import_official(path)

    def quiet(fn, **kw):
        with contextlib.redirect_stdout(io.StringIO()):
            return fn(attempt_use_lk_impl=False, **kw)

    downstream = dict(num_classes=None, init_cfg=dict(checkpoint=None))  # loads nothing
    print('OFFICIAL = {  # arch: (classifier, downstream, downstream deploy params, layouts)')
    for name, fn_name in ARCHS.items():
        fn = getattr(U, f'unireplknet_{fn_name}')
        n_cls = sum(p.numel() for p in quiet(fn).parameters())
        down, deploy = quiet(fn, **downstream), quiet(fn, deploy=True, **downstream)
        print(f"    '{name}': ({n_cls:_}, {sum(p.numel() for p in down.parameters()):_}, "
              f"{sum(p.numel() for p in deploy.parameters()):_},\n"
              f"           '{layout_hash(down.state_dict())}', "
              f"'{layout_hash(deploy.state_dict())}'),")
        del down, deploy
    print('}')

    cls = quiet(U.UniRepLKNet, num_classes=FIXTURE_CLASSES, **FIXTURE_ARCH)
    state = synthetic_state({k: tuple(v.shape) for k, v in cls.state_dict().items()})
    model = quiet(U.UniRepLKNet, **FIXTURE_ARCH, **downstream).double().eval()
    result = model.load_state_dict({k: v.double() if v.is_floating_point() else v
                                    for k, v in state.items()}, strict=False)
    assert sorted(result.unexpected_keys) == ['head.bias', 'head.weight', 'norm.bias',
                                              'norm.weight'], result
    with torch.no_grad():
        feats = model(fixture_input())
        model.reparameterize_unireplknet()
        deploy_feats = model(fixture_input())
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-9) for a, b in zip(feats, deploy_feats))
    print(f"FIXTURE_LAYOUTS = ('{layout_hash(cls.state_dict())}', "
          f"'{layout_hash(model.state_dict())}')  # classifier, downstream deploy")
    print('FIXTURE_PROBES = [  # per stage: (weighted sum, sampled values)')
    for weighted, samples in feature_probes(feats):
        print(f'    ({weighted!r}, {samples!r}),')
    print(']')


if __name__ == '__main__':
    main(sys.argv[1])
