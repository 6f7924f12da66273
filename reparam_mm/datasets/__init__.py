"""Datasets: the generated demo set (ADE20K layout) and the CamVid converter."""
from .camvid import (CAMVID_CITYSCAPES_CLASSES, CAMVID_TO_TRAINID, camvid_to_trainids,
                     convert_camvid)
from .demo_ade import DemoADEDataset
from .synthetic import (DEMO_CLASSES, DEMO_PALETTE, draw_sample, ensure_demo_ade,
                        generate_demo_ade)

__all__ = ['CAMVID_CITYSCAPES_CLASSES', 'CAMVID_TO_TRAINID', 'camvid_to_trainids',
           'convert_camvid', 'DemoADEDataset', 'DEMO_CLASSES', 'DEMO_PALETTE', 'draw_sample',
           'ensure_demo_ade', 'generate_demo_ade']
