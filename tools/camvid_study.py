"""README's CamVid table: train each variant (plain / DO-Conv backbone / heads / both,
ResNet-18 and RepLKNet-tiny) for each seed on CPU and print fused mIoU.

    python tools/camvid_study.py [--variants ...] [--seeds 0 1] [--iters 500]
                                 [--out-dir work_dirs/camvid_study] [--report-only]

Finished rows (work_dir/result.json) are kept, so an interrupted study resumes, and two
processes with different --variants can share the machine. Logic: reparam_mm/camvid_study.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reparam_mm  # noqa: E402,F401  (first: registers modules, fixes checkpoint loading)
from reparam_mm.camvid_study import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
