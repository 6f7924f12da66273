"""tools/test.py (fused vs --no-fuse) and tools/fuse.py (deploy round trip, strict loading)."""
import copy

import pytest
import torch

import reparam_mm  # noqa: F401
from reparam_mm.apis import CheckpointMismatchError, load_checkpoint_strict
from reparam_mm.fuse import fuse
from test_fuse import _nested


def _save(path, state, meta=None):
    torch.save(dict(state_dict=state, meta=meta or {}), path)
    return str(path)


def test_strict_loader_loads_a_matching_checkpoint(tmp_path):
    src, dst = _nested(), _nested()
    for p in src.parameters():
        p.data.add_(1.0)
    ckpt = _save(tmp_path / 'a.pth', {f'module.{k}': v for k, v in src.state_dict().items()})
    load_checkpoint_strict(dst, ckpt)  # 'module.' prefixes (DDP) are stripped as mmengine does
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_deploy_checkpoint_into_unfused_model_names_the_keys(tmp_path):
    fused = fuse(_nested())
    ckpt = _save(tmp_path / 'd.pth', fused.state_dict(),
                 dict(reparam_mm=dict(deploy=True, deploy_config='x_deploy.py')))
    model = _nested()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint_strict(model, ckpt)
    msg = str(err.value)
    assert 'missing keys' in msg and '0.delta' in msg and 'unexpected keys' in msg
    assert '2.merged.weight' in msg and 'x_deploy.py' in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_unfused_checkpoint_into_fused_model_is_refused(tmp_path):
    ckpt = _save(tmp_path / 't.pth', _nested().state_dict())
    with pytest.raises(CheckpointMismatchError, match=r'unexpected keys \(0\.delta.*training config'):
        load_checkpoint_strict(fuse(_nested()), ckpt)


def test_shape_mismatch_and_missing_file_are_clear(tmp_path):
    state = _nested().state_dict()
    state['3.weight'] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(CheckpointMismatchError, match=r'1 shape mismatches \(3\.weight \(4, 4, 3, 3\) vs'):
        load_checkpoint_strict(_nested(), _save(tmp_path / 's.pth', state))
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint_strict(_nested(), str(tmp_path / 'nope.pth'))
