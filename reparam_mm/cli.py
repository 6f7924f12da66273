"""What the command-line tools share: bad input ends the run with its one sentence.

The library raises each input error with a sentence naming the problem and the fix; a tool run
from the shell prints that sentence alone (``error: ...``, exit status 1) instead of the Python
traceback above it. ``REPARAM_MM_TRACEBACK=1`` shows the traceback, as do all other errors.
"""
import argparse
import os
import re
import sys

from .checkpoint import CheckpointMismatchError, CheckpointReadError
from .apis import DeployCheckError
from .export import NotExportableError, OnnxCheckError
from .inference import FusedCheckError
from .scope import ConfigError, ConfigImportError
from .train import NotAvailableHereError

__all__ = ['INPUT_ERRORS', 'input_error_message', 'run_tool', 'end_process_group', 'picture_file']

#: errors that name a file, checkpoint, config setting or flag the user gave (or hardware it
#: needs), and the fix; and a model that failed its check (the fused one in tools/infer.py, the
#: deploy one in tools/fuse.py, the ONNX file in tools/export_onnx.py), which name the fix too
INPUT_ERRORS = (FileNotFoundError, IsADirectoryError, FileExistsError, CheckpointMismatchError,
                CheckpointReadError, ConfigError, ConfigImportError, NotAvailableHereError,
                FusedCheckError, NotExportableError, DeployCheckError, OnnxCheckError)
TRACEBACK_ENV = 'REPARAM_MM_TRACEBACK'

# what mmengine's registry says for a config ``type`` it does not know
_UNKNOWN_TYPE = re.compile(r'^(\S+) is not in the (\S+) registry')
_BAD_KEYWORD = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")
# what mmengine's BaseDataset says when a config's metainfo names classes its dataset type lacks
_NOT_A_SUBSET = re.compile(r'^new classes (.*) is not a subset of classes (.*) in METAINFO')
# what torch's BatchNorm says in training when a batch holds one value per channel
_ONE_VALUE_PER_CHANNEL = re.compile(r'^Expected more than 1 value per channel when training, '
                                    r'got input size torch\.Size\((\[[\d, ]*\])\)')
# what torch's GroupNorm says, in training and in eval, for one value per group (the size it
# prints is a list: images x channels per group, groups, spatial)
_ONE_VALUE_PER_GROUP = re.compile(r'^Expected more than 1 value per channel when training, '
                                  r'got input size (\[[\d, ]*\])$')


def _raised_by_registry_call(error):
    """True when ``error`` was raised by mmengine's registry calling a class with the config's
    keywords: after its last frame in the registry, only constructors (``super().__init__``
    passing ``**kwargs`` on; binding errors are raised in the caller's frame)."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    calls = [i for i, code in enumerate(frames) if code.co_filename.replace('\\', '/').endswith(
        'mmengine/registry/build_functions.py')]
    return bool(calls) and all(code.co_name == '__init__' for code in frames[calls[-1] + 1:])


def _unknown_type(match):
    return (f"the config names type={match.group(1)!r}, which is not in the {match.group(2)} "
            'registry: fix the spelling, or import the module that registers it (custom_imports).')


def _not_a_subset(match):
    return (f'the config gives a dataset the classes {match.group(1)}, but its type only takes '
            f'(a subset of) its own, {_few_names(match.group(2))}: for a dataset of your own, '
            "replace the type too, e.g. dataset=dict(_delete_=True, type='BaseSegDataset', "
            "metainfo=dict(classes=..., palette=...), ...) (mmdet: CocoDataset takes any classes).")


def _one_value_per_channel(match):
    return (f'a BatchNorm layer got one value per channel in training (input size {match.group(1)}): '
            "one image per process, pooled to 1x1 (as UPerHead / PSPHead's pool scale 1), leaves it "
            'nothing to normalise over; train with at least 2 images per process (--cfg-options '
            'train_dataloader.batch_size=2), or on several GPUs with SyncBN, which normalises over '
            'the images of all processes.')


def _one_value_per_group(match):
    return (f'a GroupNorm layer got one value per group (its input, as images x channels per '
            f'group, groups, height, width: {match.group(1)}): a 1x1 feature map of one image '
            'with one channel per group leaves it nothing to normalise over, in eval mode too; '
            'use a larger input (tools/export_onnx.py --shape, tools/benchmark.py --shape, or a '
            'larger crop) or more images per batch.')


# (error class, pattern its message matches, the sentence to print instead)
_MESSAGES = ((KeyError, _UNKNOWN_TYPE, _unknown_type), (ValueError, _NOT_A_SUBSET, _not_a_subset),
             (ValueError, _ONE_VALUE_PER_CHANNEL, _one_value_per_channel),
             (ValueError, _ONE_VALUE_PER_GROUP, _one_value_per_group))


def _few_names(text, n=4):
    """The first ``n`` names of a printed tuple of class names, then '...'."""
    names = [t.strip(" '\"") for t in text.strip('()[]').split(',') if t.strip()]
    return '(' + ', '.join(names[:n]) + (', ...' if len(names) > n else '') + ')'


def input_error_message(error):
    """The one sentence to print for ``error``, or None when it is not bad input.

    Besides :data:`INPUT_ERRORS`, two errors of mmengine's registry come from the config alone:
    an unknown ``type``, and a keyword the class it builds does not take (a misspelt key); and
    two of torch's, from the batch or input size: BatchNorm training on one value per channel,
    GroupNorm on one value per group.
    """
    if isinstance(error, INPUT_ERRORS):
        return str(error)
    text = str(error.args[0]) if error.args else ''
    for kind, pattern, message in _MESSAGES:
        match = pattern.match(text)
        if isinstance(error, kind) and match:
            return message(match)
    keyword = _BAD_KEYWORD.search(text)
    if isinstance(error, TypeError) and keyword and _raised_by_registry_call(error):
        return (f'{keyword.group(1)} does not take {keyword.group(2)!r}, which the config (or '
                f'--cfg-options) gives it: fix or remove that key ({TRACEBACK_ENV}=1 shows '
                'where it was built).')
    return None


def run_tool(main, argv=None):
    """Run a tool's ``main(argv)``; return its exit status (0, or 1 after an input error)."""
    try:
        main(argv)
    except Exception as error:  # noqa: BLE001 - anything not bad input is re-raised
        message = input_error_message(error)
        if message is None or os.environ.get(TRACEBACK_ENV, '0') not in ('', '0'):
            raise
        print(f'error: {message}', file=sys.stderr)
        end_process_group(after_error=True)
        return 1
    end_process_group(wait_for_ranks=True)
    return 0


#: how long a rank that ended normally waits for the others at the gloo barrier before it
#: ends its process group anyway (rank 0 may still be writing results, pictures or checkpoints)
END_BARRIER_S = 300


def end_process_group(wait_for_ranks=False, after_error=False):
    """Destroy the process group a launched run set up, which mmengine leaves to the interpreter's
    teardown: there gloo's worker threads can abort the process ("terminate called without an
    active exception", SIGABRT) after a run that succeeded, and torchrun then fails the launch.

    ``wait_for_ranks`` (after a normal end): under gloo, first meet the other ranks at a barrier
    of at most :data:`END_BARRIER_S`, so that no rank closes its connections while another is
    still working; a rank that does not come in time is named in a warning and the group ends
    anyway. Not after an error, where other ranks may wait in a collective that never comes.

    ``after_error`` with another backend than gloo (NCCL on GPUs): the group is aborted, not
    destroyed, since NCCL's graceful destroy may wait for ranks that wait in a collective, and
    the process must end for the launcher (torchrun, slurm) to end the others.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if after_error and dist.get_backend() != 'gloo':
        abort = getattr(dist.distributed_c10d, '_abort_process_group', None)
        if abort is not None:
            abort()
        return
    if wait_for_ranks and dist.get_world_size() > 1 and dist.get_backend() == 'gloo':
        from datetime import timedelta
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=END_BARRIER_S))
        except RuntimeError as error:
            print(f'warning: rank {dist.get_rank()} ended its process group without meeting the '
                  f'other ranks at the end (waited at most {END_BARRIER_S} s): '
                  f'{str(error).splitlines()[0]}', file=sys.stderr)
    dist.destroy_process_group()


def picture_file(text):
    """argparse type of a picture to write (``--out FIG.png``): an extension matplotlib writes,
    checked before any work instead of a traceback after it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    kinds = sorted(FigureCanvasAgg.get_supported_filetypes())
    if os.path.splitext(text)[1].lstrip('.').lower() not in kinds:
        raise argparse.ArgumentTypeError(f"{text} is not a picture file name; end it in one of "
                                         f"{', '.join('.' + k for k in kinds)} (e.g. .png)")
    return text
