"""What the command-line tools share: bad input ends the run with its one sentence.

The library raises each input error with a sentence naming the problem and the fix; a tool run
from the shell prints that sentence alone (``error: ...``, exit status 1) instead of the Python
traceback above it. ``REPARAM_MM_TRACEBACK=1`` shows the traceback, as do all other errors.
"""
import os
import sys

from .checkpoint import CheckpointMismatchError, CheckpointReadError
from .scope import ConfigImportError
from .train import NotAvailableHereError

__all__ = ['INPUT_ERRORS', 'run_tool']

#: errors that name a file, checkpoint or config the user gave (or hardware it needs), and the fix
INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, CheckpointMismatchError,
                CheckpointReadError, ConfigImportError, NotAvailableHereError)
TRACEBACK_ENV = 'REPARAM_MM_TRACEBACK'


def run_tool(main, argv=None):
    """Run a tool's ``main(argv)``; return its exit status (0, or 1 after an input error)."""
    try:
        main(argv)
    except INPUT_ERRORS as error:
        if os.environ.get(TRACEBACK_ENV, '0') not in ('', '0'):
            raise
        print(f'error: {error}', file=sys.stderr)
        return 1
    return 0
