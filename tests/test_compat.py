"""Checkpoints written by mmengine resume under torch's safe (weights_only) loader."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

import reparam_mm  # noqa: F401  (installs the allow-list)
from mmengine.model import BaseModel
from mmengine.runner import Runner


class _ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(inputs)
        if mode == 'loss':
            return {'loss': ((out - labels) ** 2).mean()}
        return out


class _ToyData(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=g)
        self.y = torch.randn(16, 2, generator=g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def _runner(work_dir, max_iters, resume=False):
    return Runner(
        model=_ToyModel(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_ToyData(), sampler=dict(type='DefaultSampler', shuffle=True),
                              batch_size=4, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=4),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume,
        randomness=dict(seed=0),
        experiment_name=f'toy_{max_iters}_{resume}',
    )


def test_weights_only_is_in_force():
    assert os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD') in (None, '', '0')
    # torch >= 2.6: the default is the safe loader; we never turn it off.
    import inspect
    src = inspect.getsource(torch.load)
    assert 'weights_only' in src


def test_runner_checkpoint_resumes(tmp_path):
    runner = _runner(tmp_path, max_iters=2)
    runner.train()
    ckpt = tmp_path / 'iter_2.pth'
    assert ckpt.exists()
    saved = torch.load(ckpt, map_location='cpu', weights_only=True)  # the safe loader accepts it
    assert 'message_hub' in saved and 'optimizer' in saved
    trained = {k: v.clone() for k, v in runner.model.state_dict().items()}

    resumed = _runner(tmp_path, max_iters=4, resume=True)
    resumed.train()
    assert resumed.iter == 4
    # resume restored the iteration counter and message hub (loss history) rather than starting over
    hub = resumed.message_hub
    assert hub.get_info('iter') == 3
    assert len(hub.get_scalar('train/loss').data[0]) == 4
    # and the weights at iter 2 were the starting point: reloading iter_2 gives the saved weights
    state = torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict']
    for k, v in trained.items():
        assert torch.equal(state[k], v)


class _Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def test_arbitrary_objects_are_still_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'payload': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        from mmengine.runner.checkpoint import _load_checkpoint
        _load_checkpoint(str(path), map_location='cpu')


def test_history_buffer_roundtrip_keeps_statistics(tmp_path):
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    for v in (1.0, 2.0, 6.0):
        buf.update(v)
    path = tmp_path / 'hb.pth'
    torch.save({'buf': buf, 'scalar': np.float64(3.5), 'arr': np.arange(3)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded['buf'].mean() == pytest.approx(3.0)
    assert loaded['buf'].max() == 6.0 and loaded['buf'].statistics('min') == 1.0
    assert loaded['scalar'] == 3.5 and loaded['arr'].tolist() == [0, 1, 2]


def test_a_checkpoint_saved_without_reparam_mm_is_one_sentence_with_the_re_save(tmp_path, monkeypatch):
    """A script that strips a checkpoint without importing reparam_mm pickles HistoryBuffer with
    its methods (builtins.getattr), which the safe loader refuses whatever the tool."""
    import subprocess
    import sys
    from mmengine.logging import HistoryBuffer
    from reparam_mm.checkpoint import CheckpointReadError, load_from_local
    buf = HistoryBuffer()
    buf.update(2.0)
    path = tmp_path / 'stripped.pth'
    with monkeypatch.context() as m:  # mmengine's own __getstate__, as without `import reparam_mm`
        m.setattr(HistoryBuffer, '__getstate__',
                  lambda self: dict(self.__dict__, statistics_methods=self._statistics_methods))
        torch.save({'state_dict': {'w': torch.ones(2)}, 'message_hub': {'buf': buf}}, path)
    with pytest.raises(CheckpointReadError) as info:
        load_from_local(str(path))
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} holds mmengine's HistoryBuffer pickled as functions "
                              '(builtins.getattr), as mmengine saves them in a script that did not '
                              'import reparam_mm')
    # the advice, run as written, makes the file load
    command = message.split('python -c ', 1)[1]
    assert command[0] == command[-1] == '"'
    subprocess.run([sys.executable, '-c', command[1:-1]], check=True, timeout=120)
    assert load_from_local(str(path))['message_hub']['buf'].current() == 2.0
    # OneCycleLR's state kept its annealing function, pickled the same way (mmengine saves it so
    # without reparam_mm): named alone, and the same re-save drops it
    from mmengine.optim.scheduler.param_scheduler import OneCycleParamScheduler
    torch.save({'message_hub': {'buf': buf}, 'param_schedulers': [
        {'end': 4, 'anneal_func': OneCycleParamScheduler._annealing_cos}]}, path)
    with pytest.raises(CheckpointReadError) as info:
        load_from_local(str(path))
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} holds OneCycleLR's annealing function pickled as "
                              'functions (builtins.getattr)')
    command = message.split('python -c ', 1)[1]
    subprocess.run([sys.executable, '-c', command[1:-1]], check=True, timeout=120)
    assert load_from_local(str(path))['param_schedulers'] == [{'end': 4}]
    # any other refused global stays torch's own error
    other = tmp_path / 'evil.pth'
    torch.save({'payload': _Evil()}, other)
    with pytest.raises(pickle.UnpicklingError):
        load_from_local(str(other))
