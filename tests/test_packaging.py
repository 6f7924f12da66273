"""A non-editable ``pip install .`` is the library alone: it imports and fuses outside the
checkout, and holds no application (demo, study, benchmark) nor any path into a checkout."""
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT

# Run in a fresh interpreter from an empty folder, with the installed copy first on the path.
PROBE = r'''
import importlib, json, pkgutil, sys
import torch
import reparam_mm
from mmengine.registry import MODELS
from reparam_mm.outputs import compare_outputs

modules = sorted(m.name for m in pkgutil.walk_packages(reparam_mm.__path__, 'reparam_mm.'))
for name in modules:
    importlib.import_module(name)
torch.manual_seed(0)
model = MODELS.build(dict(type='RepLKNet', arch='tiny', stage_with_doconv=(True,) * 4)).eval()
for p in model.parameters():
    p.data.add_(0.05 * torch.randn_like(p))
x = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    ref = model(x)
    fused, report = reparam_mm.fuse_with_report(model)
    check = compare_outputs(ref, fused(x))
print(json.dumps(dict(file=reparam_mm.__file__, modules=modules, fused=report.fused,
                      max_rel=check['max_rel'],
                      benchmarks=importlib.util.find_spec('benchmarks') is not None)))
'''


def test_non_editable_install_imports_and_fuses_outside_the_checkout(tmp_path):
    src = tmp_path / 'src'  # a clean copy: an in-tree build/ could carry stale modules along
    shutil.copytree(ROOT / 'reparam_mm', src / 'reparam_mm',
                    ignore=shutil.ignore_patterns('__pycache__'))
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, src / name)
    target = tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                    '--no-build-isolation', '--target', str(target), str(src)],
                   check=True, capture_output=True, timeout=300)
    run_dir = tmp_path / 'elsewhere'
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, '-c', PROBE], cwd=run_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['file'] == str(target / 'reparam_mm' / '__init__.py')
    assert not any(m.split('.')[-1] in ('demo', 'camvid_study', 'benchmark')
                   for m in out['modules']), out['modules']
    assert not out['benchmarks']  # the measurement code stays in the checkout
    # tiny: 3 stem convs + 3 transition DW convs + 5 small kernels; 5 large-kernel blocks
    assert out['fused'] == {'DOConv2d': 11, 'ReparamLargeKernelConv': 5}, out['fused']
    assert out['max_rel'] < 1e-5
    installed = [p.relative_to(target).as_posix() for p in (target / 'reparam_mm').rglob('*.py')]
    for path in installed:  # nothing reaches into a checkout: no ../shared, no configs/ or tools/
        text = (target / path).read_text()
        assert "ROOT / 'configs" not in text and "shared/data'" not in text, path
        assert 'git describe' not in text, path
