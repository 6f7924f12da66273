"""Datasets: the generated demo set (ADE20K layout), the CamVid converter and a fixed COCO split."""
from .camvid import (CAMVID_CITYSCAPES_CLASSES, CAMVID_TO_TRAINID, camvid_class_weights,
                     camvid_to_trainids, convert_camvid)
from .coco_split import class_counts, split_coco
from .demo_ade import DemoADEDataset
from .synthetic import (DEMO_CLASSES, DEMO_PALETTE, draw_sample, ensure_demo_ade,
                        generate_demo_ade)

__all__ = ['CAMVID_CITYSCAPES_CLASSES', 'CAMVID_TO_TRAINID', 'camvid_class_weights',
           'camvid_to_trainids', 'class_counts', 'convert_camvid', 'split_coco', 'DemoADEDataset', 'DEMO_CLASSES',
           'DEMO_PALETTE', 'draw_sample', 'ensure_demo_ade', 'generate_demo_ade']
