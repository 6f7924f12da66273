"""Pictures of predictions: ``--show-dir`` for every test image, and the demo's grid.

* :class:`SavePredictionsHook` (what ``tools/test.py --show-dir D`` adds): paints each
  test image's prediction (beside its ground truth where the pipeline loads it) with the
  config's mmseg / mmdet visualizer and writes ``D/<image name>.png``, one per image; a
  relative ``D`` lies under ``work_dir/<timestamp>/``, where mmseg's and mmdet's
  ``--show-dir`` put it. mmseg 1.2.2's ``SegVisualizationHook`` paints only every
  ``interval``-th (50th) batch, so a small test set gave no picture at all; mmdet 3.3.0's
  ``DetVisualizationHook`` joins a relative ``test_out_dir`` under ``work_dir/timestamp``
  again on every batch, nesting the pictures one level deeper each time.
* :func:`segmentation_grid`: rows of input / ground truth / prediction in one small PNG;
  :func:`onnx_segmentation_grid` fills the prediction column from an exported ONNX file.
"""
import contextlib
import os
import os.path as osp
import warnings

import numpy as np
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

__all__ = ['SavePredictionsHook', 'segmentation_grid', 'onnx_segmentation_grid', 'colorize']


def _visualizer_for(sample):
    """The mmseg / mmdet local visualizer class that paints ``sample``."""
    if type(sample).__name__ == 'SegDataSample':
        from mmseg.visualization import SegLocalVisualizer
        return SegLocalVisualizer
    from mmdet.visualization import DetLocalVisualizer
    return DetLocalVisualizer


def _picture_names(dataset):
    """``{image path: picture file name}`` for every image of ``dataset``, in its order: the
    image's stem, with ``_1``, ``_2``, ... after it for later images of the same stem in other
    folders. Every process reads the same list, so two ranks painting two such images do not
    write one file (each rank numbered only the names it painted itself); {} where the dataset
    does not list its images."""
    names, taken = {}, set()
    try:
        paths = [dataset.get_data_info(i).get('img_path') for i in range(len(dataset))]
    except Exception:  # noqa: BLE001 - no list to read (a custom dataset): numbered per process
        return {}
    for path in paths:
        if path is None or path in names:
            continue
        stem = osp.splitext(osp.basename(path))[0]
        name, n = stem, 0
        while name in taken:
            n += 1
            name = f'{stem}_{n}'
        taken.add(name)
        names[path] = f'{name}.png'
    return names


@contextlib.contextmanager
def _as_main_process():
    """Within the block, mmengine's ``master_only`` methods run in this process too. The
    visualizers' ``add_datasample`` and ``dataset_meta`` are master_only, so in a 2-process
    test rank 0 painted its half of the images and rank 1 none, and the count said all."""
    import mmengine.dist.utils as dist_utils
    saved = dist_utils.is_main_process
    dist_utils.is_main_process = lambda *args, **kwargs: True
    try:
        yield
    finally:
        dist_utils.is_main_process = saved


@HOOKS.register_module()
class SavePredictionsHook(Hook):
    """Write every test image's painted prediction to ``out_dir`` as ``<image name>.png``.

    Args:
        out_dir (str): folder for the pictures (created); a relative one is taken under the
            run's ``work_dir/<timestamp>/``, as mmseg's and mmdet's ``--show-dir``.
        draw_gt (bool): paint the ground truth beside the prediction when the test
            pipeline loads it. Defaults to True.
        score_thr (float): detectors: lowest score of a painted box. Defaults to 0.3
            (mmdet's default).
    """
    priority = 'NORMAL'

    def __init__(self, out_dir, draw_gt=True, score_thr=0.3, backend_args=None):
        self.out_dir = out_dir
        self.draw_gt = draw_gt
        self.score_thr = score_thr
        self.backend_args = backend_args
        self.written = []  # paths written by the latest test
        self.folder = None  # where the latest test wrote them
        self._names = set()
        self._named = {}  # image path -> picture name, for every image of the test set
        self._painter = None
        self._warned = False

    def before_test(self, runner) -> None:
        # an absolute out_dir is kept as given (os.path.join drops what precedes it)
        self.folder = osp.join(runner.work_dir, runner.timestamp, self.out_dir)
        os.makedirs(self.folder, exist_ok=True)
        self.written, self._names, self._painter = [], set(), None
        loader = getattr(getattr(runner, 'test_loop', None), 'dataloader', None)
        self._named = _picture_names(getattr(loader, 'dataset', None))

    def after_test(self, runner) -> None:
        from mmengine.dist import all_gather_object, is_distributed
        # each process paints the images of its own shard: the count is of all of them, once
        # each (the sampler pads the last shard with images another rank paints too)
        written = all_gather_object(self.written) if is_distributed() else [self.written]
        painted = len(set().union(*written))
        print_log(f'--show-dir: painted {painted} test image(s) to '
                  f'{osp.abspath(self.folder)}', logger='current')

    def _get_painter(self, runner, sample):
        if self._painter is not None:
            return self._painter
        cls = _visualizer_for(sample)
        painter = runner.visualizer
        if not isinstance(painter, cls):  # e.g. no `visualizer` in the config: mmengine's base one
            painter = cls.get_instance(f'reparam_mm_show_dir_{id(self)}')
        dataset = getattr(runner.test_loop.dataloader, 'dataset', None)
        if getattr(dataset, 'metainfo', None):
            with _as_main_process():
                painter.dataset_meta = dataset.metainfo
        self._painter = painter
        return painter

    def _out_file(self, img_path):
        if img_path in self._named:  # the dataset's own list: the same name on every rank
            return osp.join(self.folder, self._named[img_path])
        stem = osp.splitext(osp.basename(img_path))[0]
        name, n = stem, 0
        while name in self._names:  # two images of the same name in different folders
            n += 1
            name = f'{stem}_{n}'
        self._names.add(name)
        return osp.join(self.folder, f'{name}.png')

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        import mmcv
        from mmengine import fileio
        for sample in outputs or []:
            img_path = sample.get('img_path')
            if img_path is None:
                if not self._warned:
                    warnings.warn('--show-dir: test samples carry no img_path, so no picture is '
                                  'painted; keep img_path in the test pipeline meta_keys.', stacklevel=2)
                    self._warned = True
                continue
            img = mmcv.imfrombytes(fileio.get(img_path, backend_args=self.backend_args),
                                   channel_order='rgb')
            painter = self._get_painter(runner, sample)
            is_seg = type(sample).__name__ == 'SegDataSample'
            extra = {} if is_seg else dict(pred_score_thr=self.score_thr)
            out_file = self._out_file(img_path)
            with _as_main_process():  # every process paints the images of its own shard
                painter.add_datasample(osp.basename(img_path), img, data_sample=sample,
                                       draw_gt=self.draw_gt, show=False, out_file=out_file, **extra)
            self.written.append(out_file)


# -- the demo's grid -------------------------------------------------------------------------------
def colorize(label, palette, ignore_index=255):
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 colours; ``ignore_index`` is black."""
    palette = np.asarray(palette, dtype=np.uint8)
    out = np.zeros(label.shape + (3,), np.uint8)
    valid = (label >= 0) & (label < len(palette)) & (label != ignore_index)
    out[valid] = palette[label[valid]]
    return out


def segmentation_grid(rows, out_file, titles=('input', 'ground truth', 'prediction'), scale=2,
                      gap=4):
    """Write one PNG of ``rows`` (each a list of ``(H, W, 3)`` uint8 RGB images of one size),
    upscaled ``scale`` times (nearest), with a title above each column."""
    from PIL import Image, ImageDraw
    tiles = [[np.kron(img, np.ones((scale, scale, 1), np.uint8)) for img in row] for row in rows]
    th, tw = tiles[0][0].shape[:2]
    ncol, head = max(len(r) for r in tiles), 14
    canvas = Image.new('RGB', (ncol * tw + (ncol - 1) * gap, head + len(tiles) * (th + gap) - gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles[:ncol]):
        draw.text((c * (tw + gap) + 2, 1), title, fill=(0, 0, 0))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (c * (tw + gap), head + r * (th + gap)))
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    canvas.save(out_file, optimize=True)
    return out_file


def onnx_segmentation_grid(onnx_path, cfg, pairs, palette, out_file, reduce_zero_label=True,
                           titles=('input', 'ground truth', 'prediction (onnxruntime)')):
    """Grid of ``pairs`` (image path, label path): image, ground truth and the argmax of the
    logits that the ONNX file (tools/export_onnx.py) computes for it in onnxruntime."""
    from PIL import Image

    from .export import normalise_image, ort_session
    session = ort_session(str(onnx_path))
    name = session.get_inputs()[0].name
    rows = []
    for img_path, label_path in pairs:
        img = np.array(Image.open(img_path).convert('RGB'))
        label = np.array(Image.open(label_path)).astype(np.int64)
        if reduce_zero_label:  # mmseg's LoadAnnotations(reduce_zero_label=True)
            label = np.where(label == 0, 255, label - 1)
        logits = session.run(None, {name: normalise_image(img, cfg).numpy()})[0]
        rows.append([img, colorize(label, palette), colorize(logits[0].argmax(0), palette)])
    return segmentation_grid(rows, out_file, titles=titles)
