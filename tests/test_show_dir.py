"""tools/test.py --show-dir: one painted picture per test image, segmentors and detectors."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import reparam_mm  # noqa: F401
from conftest import load_tool, mmengine_log
from test_tools_test_fuse import det_config, make_coco, write_case

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'


def test_show_dir_on_the_demo_model_writes_one_picture_per_test_image(tmp_path, capsys):
    from mmengine.config import Config
    from reparam_mm.apis import build_model
    from reparam_mm.datasets.synthetic import ensure_demo_ade
    from test_fuse import perturb
    data = tmp_path / 'demo_ade'
    ensure_demo_ade(data, num_train=1, num_val=5, size=64, seed=0)  # mmseg's hook painted none of 5
    torch.manual_seed(0)
    model = perturb(build_model(Config.fromfile(str(DEMO_CONFIG))))
    ckpt = tmp_path / 'demo.pth'
    torch.save(dict(state_dict=model.state_dict(), meta={}), ckpt)
    show = tmp_path / 'show'
    load_tool('test').main([str(DEMO_CONFIG), str(ckpt), '--work-dir', str(tmp_path / 'w'),
                            '--show-dir', str(show), '--cfg-options',
                            f'test_dataloader.dataset.data_root={data}'])
    assert 'fused 29 module(s)' in capsys.readouterr().out
    images = sorted(p.stem for p in (data / 'images/validation').iterdir())
    pictures = sorted(show.glob('*.png'))
    assert [p.stem for p in pictures] == images and len(images) == 5
    for p in pictures:
        painted = np.array(Image.open(p))
        assert painted.shape == (64, 128, 3)  # ground truth | prediction, side by side
        src = next((data / 'images/validation').glob(f'{p.stem}.*'))
        src = np.array(Image.open(src).convert('RGB'))
        assert not np.array_equal(painted[:, 64:], src)  # the prediction is painted over the input


def test_show_dir_for_a_detector_with_a_relative_folder_does_not_nest(tmp_path, monkeypatch):
    """A relative folder lies under work_dir/<timestamp>/, as mmseg's and mmdet's tools document
    (mmdet's own hook nested it one level deeper on every batch), and nowhere else."""
    cfg, ckpt = write_case(tmp_path, det_config(make_coco(tmp_path / 'coco', n=3)))
    monkeypatch.chdir(tmp_path)
    with mmengine_log() as records:
        load_tool('test').main([cfg, ckpt, '--work-dir', 'w', '--show-dir', 'pics'])
    pictures = sorted(tmp_path.glob('**/*.png'))
    timestamps = [p.name for p in (tmp_path / 'w').iterdir() if p.is_dir()]
    assert len(timestamps) == 1
    assert [p.relative_to(tmp_path).as_posix() for p in pictures] == \
        [f'w/{timestamps[0]}/pics/{i:06d}.png' for i in range(3)]
    assert all(np.array(Image.open(p)).shape == (64, 128, 3) for p in pictures)
    said = [r.getMessage() for r in records if r.getMessage().startswith('--show-dir')]
    assert said == [f'--show-dir: painted 3 test image(s) to {tmp_path}/w/{timestamps[0]}/pics']


def test_show_dir_counts_an_image_two_ranks_painted_once(tmp_path, monkeypatch):
    """Under 2 processes the sampler pads the last shard with an image another rank has: 39
    images were said as 40 painted (the counts of the ranks were summed)."""
    import mmengine.dist
    from types import SimpleNamespace
    from reparam_mm.visualization import SavePredictionsHook
    hook = SavePredictionsHook('pics')
    runner = SimpleNamespace(work_dir=str(tmp_path), timestamp='t')
    hook.before_test(runner)
    hook.written = [f'{hook.folder}/a.png', f'{hook.folder}/b.png']  # rank 0's shard
    other_rank = [f'{hook.folder}/c.png', f'{hook.folder}/a.png']  # a, padded in again
    monkeypatch.setattr(mmengine.dist, 'is_distributed', lambda: True)
    monkeypatch.setattr(mmengine.dist, 'all_gather_object', lambda obj: [obj, other_rank])
    with mmengine_log() as records:
        hook.after_test(runner)
    assert [r.getMessage() for r in records if r.getMessage().startswith('--show-dir')] == [
        f'--show-dir: painted 3 test image(s) to {tmp_path}/t/pics']


def test_two_ranks_painting_images_of_one_name_from_two_folders_write_two_pictures(tmp_path):
    """Each process numbered only the names it painted itself: rank 0 painting day/0001.jpg and
    rank 1 night/0001.jpg both wrote 0001.png, one over the other. The names now come from the
    test set's list, the same on every rank."""
    from types import SimpleNamespace
    from reparam_mm.visualization import SavePredictionsHook, _picture_names
    paths = ['day/0001.jpg', 'night/0001.jpg', 'day/0002.jpg', 'dusk/0001.png']

    class Listed:
        def __len__(self):
            return len(paths)

        def get_data_info(self, i):
            return dict(img_path=paths[i])
    assert _picture_names(Listed()) == {'day/0001.jpg': '0001.png', 'night/0001.jpg': '0001_1.png',
                                        'day/0002.jpg': '0002.png', 'dusk/0001.png': '0001_2.png'}
    runner = SimpleNamespace(work_dir=str(tmp_path), timestamp='t', test_loop=SimpleNamespace(
        dataloader=SimpleNamespace(dataset=Listed())))
    rank0, rank1 = SavePredictionsHook('pics'), SavePredictionsHook('pics')
    for hook in (rank0, rank1):
        hook.before_test(runner)
    written = [rank0._out_file('day/0001.jpg'), rank1._out_file('night/0001.jpg'),
               rank0._out_file('day/0002.jpg'), rank1._out_file('dusk/0001.png'),
               rank0._out_file('night/0001.jpg')]  # the sampler's padding: painted twice, one file
    assert [Path(w).name for w in written] == ['0001.png', '0001_1.png', '0002.png', '0001_2.png',
                                               '0001_1.png']
    assert _picture_names(None) == {}  # nothing listed: numbered per process, as before
