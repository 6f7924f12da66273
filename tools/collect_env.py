"""Print the environment for bug reports (same as ``python -m reparam_mm.env``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_mm.env import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
