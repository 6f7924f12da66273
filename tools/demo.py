"""The main job (`make demo`): generate the demo set, train UperNet + RepLKNet-tiny with
DO-Conv on CPU, test the fused model with tools/test.py and print a summary.

    python tools/demo.py [--work-dir work_dirs/demo] [--data-root data/demo_ade] [--max-iters N]

The logic lives in reparam_mm/demo.py; exit status 1 if the fused model does not
reproduce the unfused one.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reparam_mm  # noqa: E402,F401  (first: registers modules, fixes checkpoint loading)
from reparam_mm.demo import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
