"""Print the environment for bug reports (same as ``python -m reparam_mm.env``)."""
from reparam_mm.env import main

if __name__ == '__main__':
    main()
