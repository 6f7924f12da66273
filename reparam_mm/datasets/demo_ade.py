"""``DemoADEDataset``: mmseg's ADE20K reading rules for the generated demo set."""
from mmengine.registry import DATASETS
from mmseg.datasets import BaseSegDataset

from .synthetic import DEMO_CLASSES, DEMO_PALETTE


@DATASETS.register_module()
class DemoADEDataset(BaseSegDataset):
    """The procedurally drawn set of :mod:`reparam_mm.datasets.synthetic`.

    Same conventions as ``ADE20KDataset`` (``.jpg`` images, ``.png``
    annotations, ``reduce_zero_label=True``) with the demo's own five classes.
    """
    METAINFO = dict(classes=DEMO_CLASSES, palette=DEMO_PALETTE)

    def __init__(self, img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                 **kwargs):
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)
