"""Reading checkpoints and matching their keys to a model: the one path every load takes.

* :func:`load_from_local` replaces mmengine's loader of local files (``import reparam_mm``
  registers it), so a file torch cannot read -- cut off while being written or copied, an
  HTML page saved under a ``.pth`` name -- is one sentence naming the file and the fix,
  wherever it is loaded: ``--resume`` and ``load_from`` in training, pretrained weights,
  ``tools/test.py``, ``tools/fuse.py``.
* :func:`load_checkpoint_strict` loads a checkpoint into a model only when keys and shapes
  match exactly (mmengine's runner loads with ``strict=False``), and :func:`compare_keys` /
  :func:`mismatch_error` are the comparison and the message it and RepLKNet's pretrained
  loader share.
* :func:`check_training_load` does the same for what training loads (``load_from``,
  ``--resume``) before mmengine's runner loads it non-strictly; ``load_from_partial = True``
  in the config opts into a partial ``load_from`` (fine-tuning with a new head, say).
"""
import copy
import logging
import os
import os.path as osp
import re
import zipfile
from collections import OrderedDict

import torch
from mmengine.model import BaseTTAModel, is_model_wrapper

__all__ = ['CheckpointMismatchError', 'CheckpointReadError', 'load_from_local', 'read_checkpoint',
           'check_checkpoint_file',
           'state_dict_of', 'compare_keys', 'mismatch_error', 'check_state_dict',
           'load_checkpoint_strict', 'loadable_state_keys', 'check_training_load']


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint's keys or shapes differ from the model's."""


class CheckpointReadError(RuntimeError):
    """A checkpoint file that torch cannot read (truncated, corrupt, not a checkpoint)."""


def unreadable_reason(filename, error=None, thorough=True):
    """Why ``filename`` is not a readable checkpoint, or None when the file itself looks
    sound (then torch's own error, e.g. the safe unpickler refusing an object, stands).
    Without ``thorough`` only what is cheap to see: no checksums, which read every byte."""
    size = osp.getsize(filename)
    if size == 0:
        return 'is empty (0 bytes)'
    with open(filename, 'rb') as f:
        head = f.read(4)
    if head.startswith(b'PK'):  # torch's zip format: the archive's directory is at the end
        if not zipfile.is_zipfile(filename):
            return f'is truncated ({size:,} bytes; its zip archive ends before its directory)'
        if not thorough:
            return None
        try:
            with zipfile.ZipFile(filename) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f'is corrupt ({e})'
        return f'is corrupt (its part {bad} fails its checksum)' if bad else None
    if head.startswith(b'\x80'):  # a legacy (pickle) checkpoint
        # EOFError, pickle's 'data was truncated', torch's 'unexpected EOF, expected N more bytes'
        cut = isinstance(error, EOFError) or any(
            sign in str(error) for sign in ('truncated', 'unexpected EOF'))
        return f'is truncated ({size:,} bytes; its data ends early)' if cut else None
    for magic, kind in _OTHER_FILES:
        if head.startswith(magic):
            return f'is {kind}, not a PyTorch checkpoint'
    return f'is not a PyTorch checkpoint (it starts with {head!r})'


# files that get passed for a checkpoint by mistake (arguments in another order): said by name,
# without the advice for a damaged download
_OTHER_FILES = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
                (b'%PDF', 'a PDF document'))


def load_from_local(filename, map_location=None):
    """mmengine's ``load_from_local`` (same name: its log says 'by local backend'), plus one
    sentence naming the file and the fix when torch cannot read it."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        return torch.load(filename, map_location=map_location)
    except Exception as error:  # noqa: BLE001 - re-raised unless the file itself is broken
        reason = unreadable_reason(filename, error)
        found = _pickled_functions(filename, error) if reason is None else []
        if found:
            raise CheckpointReadError(
                f"checkpoint {filename} holds {' and '.join(found)} pickled as functions "
                "(builtins.getattr), as mmengine saves them in a script that did not import "
                "reparam_mm, and torch's safe loader refuses that; if you trust the file, re-save "
                'it once without them (reparam_mm pickles plain data; the config rebuilds the '
                "functions): python -c \"import reparam_mm, torch; p = '" + filename + "'; "
                "c = torch.load(p, weights_only=False); s = c.get('param_schedulers') or []; "
                "[d.pop('anneal_func', None) for g in (s.values() if isinstance(s, dict) else [s]) "
                'for d in g]; torch.save(c, p)"') from None
        if reason is None:
            raise
    raise _read_error(filename, reason)


def _pickled_functions(filename, error):
    """What the safe loader refused in ``filename`` for its ``getattr`` global: mmengine's
    ``HistoryBuffer`` pickled with its method table, and OneCycleLR's annealing function, both
    of which reparam_mm leaves out of what it saves (``compat.py``); [] for anything else."""
    if 'GLOBAL getattr' not in str(error):
        return []
    try:
        with zipfile.ZipFile(filename) as archive:
            pickled = next((archive.read(n) for n in archive.namelist() if n.endswith('/data.pkl')),
                           b'')
    except (zipfile.BadZipFile, OSError):
        return []
    import pickletools
    owners, memo, pushed, after_getattr = set(), {}, None, False
    try:  # the class whose attribute each getattr fetches: the global pushed right after it
        for op, arg, _ in pickletools.genops(pickled):  # (torch pickles with protocol 2)
            if op.name in ('PUT', 'BINPUT', 'LONG_BINPUT'):
                if pushed is not None:
                    memo[arg] = pushed  # a global memoised: later uses are GETs of it
                continue
            pushed = (str(arg) if op.name == 'GLOBAL' else
                      memo.get(arg) if op.name in ('GET', 'BINGET', 'LONG_BINGET') else None)
            if pushed is not None and after_getattr:
                owners.add(pushed.rsplit(' ', 1)[-1])
            after_getattr = pushed is not None and pushed.endswith(' getattr')
    except Exception:  # noqa: BLE001 - an unreadable pickle: the loader's own error stands
        return []
    return [what for what, owner in (("mmengine's HistoryBuffer", 'HistoryBuffer'),
                                     ("OneCycleLR's annealing function", 'OneCycleParamScheduler'))
            if owner in owners]


def _read_error(filename, reason):
    if any(reason == f'is {kind}, not a PyTorch checkpoint' for _, kind in _OTHER_FILES):
        return CheckpointReadError(f'checkpoint {filename} {reason}; pass the .pth file written by '
                                   'training or tools/fuse.py in its place (the tools take the '
                                   'config first, then the checkpoint).')
    return CheckpointReadError(
        f'checkpoint {filename} {reason}: it was cut off or damaged while being written, '
        'copied or downloaded, so copy or download it again, or use another checkpoint such '
        'as an earlier iter_*.pth of the same run, where the run kept one.')


def check_checkpoint_file(filename, fix='pass an existing .pth file'):
    """Before anything is built: a missing local checkpoint is a FileNotFoundError ending in
    ``fix``, and one visibly damaged (empty, cut off, not a checkpoint) the loader's error."""
    filename = str(filename)
    if '://' in filename:
        return
    if osp.isdir(filename):
        raise IsADirectoryError(f'checkpoint {filename} is a folder, not a file; pass a .pth file '
                                f'in it{_latest_in(filename)}.')
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint {filename} does not exist; {fix}.')
    reason = unreadable_reason(filename, thorough=False)
    if reason is not None:
        raise _read_error(filename, reason)


def _latest_in(folder):
    """', such as X' naming a run folder's latest checkpoint (mmengine's last_checkpoint), or ''."""
    try:
        with open(osp.join(folder, 'last_checkpoint')) as f:
            latest = f.read().strip()
    except OSError:
        latest = None
    if not latest or not osp.isfile(latest):
        found = sorted((p for p in os.listdir(folder) if p.endswith('.pth')),
                       key=lambda p: osp.getmtime(osp.join(folder, p)))
        latest = osp.join(folder, found[-1]) if found else None
    return f', such as the latest, {latest}' if latest else ''


def latest_to_resume(work_dir):
    """The checkpoint ``--resume`` alone continues from: the one ``work_dir/last_checkpoint``
    names (mmengine writes an absolute path there), or None when there is none. A run folder
    copied or moved keeps the old absolute path: mmengine then resumed from the other folder's
    file (while it existed) or stopped with its '... can not be found.'. The folder's own copy
    of that file (same name, same size) is taken instead; a named file found nowhere, or an
    empty record, is one sentence. A URL (a remote ``out_dir``) is left to mmengine."""
    record = osp.join(work_dir, 'last_checkpoint')
    try:
        with open(record) as f:
            named = f.read().strip()
    except OSError:
        return None
    if not named:
        raise FileNotFoundError(f'--resume: {record} is empty, so it names no checkpoint; pass one '
                                f'as --resume PATH{_latest_in(work_dir)}.')
    if '://' in named:  # CheckpointHook(out_dir='s3://...'): mmengine resumes from there
        return named
    own = osp.join(work_dir, osp.basename(named))
    if osp.isfile(named) and (not osp.isfile(own) or osp.samefile(own, named)
                              or osp.getsize(own) != osp.getsize(named)):
        return named  # the file it names (an out_dir's, say), unless a copy lies here
    if osp.isfile(own):
        from mmengine.logging import print_log
        print_log(f'--resume: {record} names {named}, outside this work_dir (a copied or moved '
                  f"run folder); resuming from the work_dir's own {own}.", logger='current')
        return own
    raise FileNotFoundError(f'--resume: {record} names {named}, which does not exist; pass a '
                            f'checkpoint as --resume PATH{_latest_in(work_dir)}.')


def check_checkpoint_form(module, state_dict):
    """Raise :class:`CheckpointMismatchError` when ``state_dict`` is the other form of
    ``module``: the fused (deploy) form of a model built unfused (from its training config), or
    the training (unfused) form of a model built fused (from the deploy config).

    mmengine loads with ``strict=False`` wherever upstream code loads a whole model
    (``mmseg.apis.init_model``, ``MMSegInferencer``, ``mmdet.apis.init_detector``, ...), and
    such a load fills the layers both forms share and leaves the others at their
    initialisation: a model that predicts, wrongly, with one warning among the logs. Checked
    by fusing a copy of the model, only when the model misses keys and the checkpoint has others
    (a pretrained classifier's extra head keys, which leave nothing out, cost nothing)."""
    target = _target(module)
    keys = set(state_dict)
    own = set(target.state_dict())
    if not (own - keys) or not (keys - own):
        return
    from .fuse import fuse
    try:
        fused_keys = set(fuse(copy.deepcopy(target).eval()).state_dict())
    except Exception:  # noqa: BLE001 - a model this walker cannot fuse: mmengine's load decides
        return
    if fused_keys == keys:
        _refuse_the_fused_form(target, state_dict, own)
    elif fused_keys == own and _is_the_training_form(target, keys, own):
        missing = sorted(own - keys)
        raise CheckpointMismatchError(
            f'the checkpoint is the training (unfused) form of this model, which was built fused '
            f'(from a deploy config): loading it would leave {len(missing)} tensors of the '
            f're-parameterised layers at their initialisation ({_few(missing, 2)}); build the '
            'model from the training config, or fuse the checkpoint first (tools/fuse.py '
            'TRAINING_CONFIG CHECKPOINT OUT_DIR) and load the *_deploy.pth it writes.')


def _refuse_the_fused_form(target, state_dict, own):
    loadable, allowed = loadable_state_keys(target, state_dict)  # DO-Conv takes weight as W
    stray = sorted(own - set(loadable) - allowed)
    if not stray:  # every layer starts as the fused one computes (W = weight, D = 0)
        return
    raise CheckpointMismatchError(
        f'the checkpoint is the deploy (fused) form of this model, which was built unfused (from '
        f'its training config): loading it would leave {len(stray)} tensors of the '
        f're-parameterised layers at their initialisation ({_few(stray, 2)}); build the model '
        'from the deploy config tools/fuse.py wrote beside the checkpoint (*_deploy.py), or '
        'load the training checkpoint it came from.')


def _is_the_training_form(target, keys, own):
    """Whether the keys a fused model (one a fuse pass leaves as it is) and a checkpoint do not
    share are the two forms of the same layers: DO-Conv's W / D where the model has a plain
    conv's weight, and other branches inside a re-parameterisable module (a module with a fuse
    method, in its deploy form here) for each such module's fused kernel."""
    from .fuse import CONVENTIONS, _no_arg_method
    missing, unexpected = own - keys, keys - own
    doconv = {k[:-len('weight')] for k in missing if k.endswith('.weight')
              and k[:-len('weight')] + 'W' in keys}
    missing -= {p + 'weight' for p in doconv}
    unexpected -= {p + n for p in doconv for n in ('W', 'D', 'd_diag', 'D_diag')}
    owners = sorted((f'{n}.' for n, m in target.named_modules()
                     if n and any(_no_arg_method(m, c) for c in CONVENTIONS)), key=len, reverse=True)

    def owner(key):
        return next((o for o in owners if key.startswith(o)), None)
    in_missing, in_unexpected = {owner(k) for k in missing}, {owner(k) for k in unexpected}
    return None not in in_missing and in_missing == in_unexpected and bool(doconv or missing)


def patch_mmengine_loads():
    """Make mmengine's non-strict ``load_state_dict`` (every whole-model load upstream makes)
    refuse a checkpoint of the other form than the model's, fused or unfused
    (:func:`check_checkpoint_form`); idempotent."""
    import mmengine.runner.checkpoint as mmengine_checkpoint
    original = mmengine_checkpoint.load_state_dict
    if getattr(original, '_reparam_mm', False):
        return

    def load_state_dict(module, state_dict, strict=False, logger=None):
        check_checkpoint_form(module, state_dict)
        return original(module, state_dict, strict, logger)
    load_state_dict._reparam_mm = True
    load_state_dict.__doc__ = original.__doc__
    mmengine_checkpoint.load_state_dict = load_state_dict


def register_local_loader():
    """Make :func:`load_from_local` mmengine's loader of local paths (idempotent)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)


def read_checkpoint(filename, map_location='cpu', fix='pass an existing .pth file'):
    """The checkpoint object at ``filename`` (a path or URL), through mmengine's loaders; a
    missing local file is a FileNotFoundError ending in ``fix``."""
    from mmengine.runner.checkpoint import CheckpointLoader
    check_checkpoint_file(filename, fix)
    return CheckpointLoader.load_checkpoint(str(filename), map_location=map_location)


def state_dict_of(checkpoint, name='checkpoint'):
    """The state dict a checkpoint holds (under ``state_dict`` or ``model``, or the checkpoint
    itself), with DDP's ``module.`` prefixes stripped as mmengine does."""
    state = checkpoint
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise TypeError(f'{name} holds a {type(state).__name__}, not a state dict.')
    metadata = getattr(state, '_metadata', None)
    state = OrderedDict((re.sub(r'^module\.', '', k), v) for k, v in state.items())
    if metadata is not None:
        state._metadata = OrderedDict((re.sub(r'^module\.?', '', k), v)
                                      for k, v in metadata.items())
    return state


def compare_keys(expected, state, allowed_missing=()):
    """``(missing, unexpected, wrong_shapes)`` of ``state`` against ``expected`` (key ->
    shape, or None where any shape is accepted, on either side); ``allowed_missing`` keys may be
    absent."""
    missing = [k for k in expected if k not in state and k not in allowed_missing]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(s)}' for k, s in expected.items()
              if s is not None and state.get(k) is not None and tuple(state[k].shape) != tuple(s)]
    return missing, unexpected, shapes


def _few(keys, n=4):
    keys = list(keys)
    return ', '.join(keys[:n]) + (f' ... (+{len(keys) - n})' if len(keys) > n else '')


def mismatch_error(what, missing, unexpected, shapes, hint):
    """The :class:`CheckpointMismatchError` naming the mismatched keys, or None if none."""
    parts = [f'{len(missing)} missing keys ({_few(missing)})' if missing else '',
             f'{len(unexpected)} unexpected keys ({_few(unexpected)})' if unexpected else '',
             f'{len(shapes)} shape mismatches ({_few(shapes, 2)})' if shapes else '']
    if not (missing or unexpected or shapes):
        return None
    return CheckpointMismatchError(f"{what}: {'; '.join(p for p in parts if p)} -- {hint}.")


def _target(model):
    """The module whose state dict a checkpoint holds (no DDP, no TTA wrapper)."""
    model = model.module if is_model_wrapper(model) else model
    return model.module if isinstance(model, BaseTTAModel) else model


def _doconv_in_checkpoint_only(missing, unexpected):
    """The layers whose ``weight`` the model misses while the checkpoint has their DO-Conv
    ``W`` and ``D`` instead."""
    extra = set(unexpected)
    return [k[:-len('.weight')] for k in missing if k.endswith('.weight')
            and {k[:-len('weight')] + 'W', k[:-len('weight')] + 'D'} <= extra]


def _task_of(keys):
    """'segmentor' / 'detector' when ``keys`` hold the heads of one (mmseg's decode_head; mmdet's
    rpn_head / roi_head / bbox_head), else None."""
    heads = {k.split('.', 1)[0] for k in keys}
    if 'decode_head' in heads:
        return 'segmentor'
    if heads & {'rpn_head', 'roi_head', 'bbox_head'}:
        return 'detector'
    return None


def _other_part(missing, unexpected):
    """The top-level part (``backbone``, ``neck``, ...) that is another network in the
    checkpoint, or None: a key the model misses there (beyond what DO-Conv explains) whose
    block holds none of the checkpoint's unexpected keys (``backbone.layer1.0`` against
    ``backbone.stages...``). A fused and an unfused form of one network differ inside the same
    blocks (``...lk.lkb_reparam`` against ``...lk.lkb_origin``), so they are never one."""
    doconv = set(_doconv_in_checkpoint_only(missing, unexpected))
    explained = {f'{layer}.{name}' for layer in doconv for name in ('weight', 'W', 'D')}
    extra = [k for k in unexpected if k not in explained]
    for k in missing:
        fields = k.split('.')
        if k in explained or len(fields) < 3:
            continue
        block = '.'.join(fields[:-2]) + '.'  # the module around the layer holding the key
        if not any(u.startswith(block) for u in extra) and any(u.startswith(fields[0] + '.')
                                                                for u in extra):
            return fields[0]
    return None


def _configured_type(meta, part):
    """``model.<part>.type`` in the config a training checkpoint records (mmengine keeps its
    text in ``meta['cfg']``), or None."""
    text = (meta or {}).get('cfg')
    if not isinstance(text, str):
        return None
    match = re.search(rf'\b{part}=dict\(', text)
    if match is None:
        return None
    depth, start = 1, match.end()
    for i in range(start, len(text)):  # the dict's own text, without nested dicts
        depth += {'(': 1, ')': -1}.get(text[i], 0)
        if depth == 0:
            own = re.sub(r'dict\([^()]*\)', '', text[start:i])
            found = re.search(r"\btype\s*=\s*'([\w.:]+)'", own)
            return found.group(1) if found else None
    return None


def _mismatch_hint(meta, missing, unexpected, shapes, model=None):
    """Why a whole-model checkpoint does not match its config, and which config it needs."""
    info = (meta or {}).get('reparam_mm', {})
    tasks = _task_of(missing), _task_of(unexpected)
    other_task = all(tasks) and tasks[0] != tasks[1]
    part = None if info.get('deploy') or other_task else _other_part(missing, unexpected)
    if part is not None:
        ours = getattr(_target(model), part, None) if model is not None else None
        theirs = _configured_type(meta, part)
        names = ', '.join(n for n in (f'{theirs} in the config it records' if theirs else '',
                                       f'{type(ours).__name__} here' if ours is not None else '')
                          if n)
        hint = (f"its {part} is another network than the config's"
                + (f' ({names})' if names else '') + ': use the config it was trained with')
    elif info.get('deploy'):
        hint = (f"it is a deploy (fused) checkpoint written by tools/fuse.py: use the deploy config "
                f"written beside it ({info.get('deploy_config', '*_deploy.py')})")
    elif shapes and not (missing or unexpected):  # fused and unfused forms differ in keys
        hint = ('the same layers with other sizes: it was trained with another variant of this '
                'config (e.g. another num_classes or width); use the config it was trained with')
    elif _doconv_in_checkpoint_only(missing, unexpected):
        hint = ('layers that are DO-Conv in the checkpoint (W, D) are plain convs in the config '
                f'({_few(_doconv_in_checkpoint_only(missing, unexpected), 2)}): a training '
                'checkpoint needs its training config, not the deploy config tools/fuse.py wrote; '
                'to start a plain model from it, switch DO-Conv on for those layers, or start from '
                'its deploy checkpoint (tools/fuse.py), whose DO-Conv layers are plain convs')
    elif other_task:
        hint = (f'it is a {tasks[1]} checkpoint and the config builds a {tasks[0]}: use the config '
                'it was trained with')
    else:
        hint = ('a training (unfused) checkpoint needs the training config and a deploy checkpoint '
                'the deploy config written by tools/fuse.py; a checkpoint of another model needs '
                'the config it was trained with')
    return hint


def check_state_dict(model, state_dict, source='checkpoint', meta=None):
    """Raise :class:`CheckpointMismatchError` unless keys and shapes match exactly."""
    expected = {k: v.shape for k, v in _target(model).state_dict().items()}
    missing, unexpected, shapes = compare_keys(expected, state_dict)
    error = mismatch_error(f'{source} does not match the model built from the config', missing,
                           unexpected, shapes, _mismatch_hint(meta, missing, unexpected, shapes, model))
    if error is not None:
        raise error


def loadable_state_keys(model, state_dict):
    """``(state, allowed_missing)``: ``state_dict`` as ``model.load_state_dict`` takes it (key ->
    tensor, None for a key a layer fills from another), and the model keys it may leave out.

    A DO-Conv layer takes a plain conv's ``weight`` into its W (its D restarts at zero, so the
    layer equals that conv: a plain model's checkpoint starts a DO-Conv model) and drops the
    authors' frozen identity ``d_diag`` / ``D_diag``.
    """
    from .layers.doconv import DOConv2d
    state = dict(state_dict)
    allowed = set()
    for name, module in _target(model).named_modules():
        if not isinstance(module, DOConv2d):
            continue
        p = f'{name}.' if name else ''
        for diag in ('d_diag', 'D_diag'):
            state.pop(p + diag, None)
        if p + 'weight' in state and p + 'W' not in state:
            state.pop(p + 'weight')
            state[p + 'W'] = None
            if module.D is not None:
                allowed.add(p + 'D')
    return state, allowed


def check_training_load(model, checkpoint, filename, resume=False, partial=False):
    """Raise :class:`CheckpointMismatchError` when training would load ``checkpoint`` (read from
    ``filename``) into ``model`` only in part, or resume from one without training state.

    mmengine's runner loads ``load_from`` and ``--resume`` with ``strict=False``: it logs the
    keys it skipped among pages of output and trains on, the skipped layers at their
    initialisation, and ``--resume`` from another model's checkpoint ends in a traceback from
    the optimizer. ``partial`` (``load_from_partial = True`` in the config) accepts a partial
    ``load_from`` and logs what was left out; a resume is never partial.
    """
    from mmengine.logging import print_log
    loadable, allowed = loadable_state_keys(model, state_dict_of(checkpoint, f'checkpoint {filename}'))
    expected = {k: v.shape for k, v in _target(model).state_dict().items()}
    missing, unexpected, shapes = compare_keys(expected, loadable, allowed)
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    what = f"{'--resume' if resume else 'load_from'} {filename}"
    # DO-Conv layers the checkpoint fills from a plain conv: mmengine lists their D as missing
    from_plain = sorted(k[:-len('.D')] for k in allowed if k not in loadable)
    said = (f'{what}: {len(from_plain)} DO-Conv layer(s) start from the checkpoint\'s plain conv '
            f'(W = its weight, D = 0: the same convolution), e.g. {_few(from_plain, 2)}; the '
            "'missing keys ... .D' mmengine logs for them are expected.") if from_plain else None
    if resume or not partial:
        fix = ('resume needs a checkpoint written by training this config (an iter_*.pth or '
               'epoch_*.pth in its work_dir)' if resume else
               'or, to start from the matching tensors only (e.g. fine-tuning with another '
               'num_classes), add --cfg-options load_from_partial=True')
        error = mismatch_error(f'{what} does not match the model built from the config', missing,
                               unexpected, shapes,
                               f'{_mismatch_hint(meta, missing, unexpected, shapes, model)}; {fix}')
        if error is not None:
            raise error
    if said:
        print_log(said, logger='current')
    if not resume and partial:
        if missing or unexpected or shapes:
            print_log(f'{what}: loading {len(expected) - len(missing) - len(shapes)} of '
                      f'{len(expected)} model tensors (load_from_partial=True); left at their '
                      f'initialisation: {_few(missing + [s.split()[0] for s in shapes], 6)}'
                      + (f'; {len(unexpected)} checkpoint keys unused ({_few(unexpected)})'
                         if unexpected else ''), logger='current', level=logging.WARNING)
        return
    if resume and not (isinstance(checkpoint, dict) and 'message_hub' in checkpoint
                       and 'iter' in (meta or {})):
        raise CheckpointMismatchError(
            f'{what} holds the model\'s weights but no training state (no message_hub or '
            'iteration in it, as in a checkpoint saved by hand or exported), so training cannot '
            f'resume from it; resume from an iter_*.pth / epoch_*.pth written by training, or '
            f'start from its weights with --cfg-options load_from={filename} without --resume.')


STRICT_FIX = 'pass the .pth file written by training (work_dirs/...) or by tools/fuse.py'


def load_checkpoint_strict(model, filename, map_location='cpu', checkpoint=None):
    """Load ``filename`` into ``model`` only if keys and shapes match exactly; return the checkpoint
    (``checkpoint``: that file's contents, when the caller has read it already)."""
    if checkpoint is None:
        checkpoint = read_checkpoint(filename, map_location, fix=STRICT_FIX)
    state = state_dict_of(checkpoint, f'checkpoint {filename}')
    check_state_dict(model, state, f'checkpoint {filename}', checkpoint.get('meta'))
    _target(model).load_state_dict(state, strict=True)
    return checkpoint


#: a scheduler's state that moves with training, or follows from what it is compared on
_SCHEDULE_PROGRESS = frozenset({'optimizer', 'last_step', '_global_step', '_last_value', 'verbose',
                                'total_iters', '_get_lr_called_within_step',
                                'best', 'num_bad_epochs', 'cooldown_counter'})  # ReduceOnPlateau's


def _plain_setting(value):
    """Numbers, strings, and lists / dicts of them: what a scheduler was configured with. Not its
    methods (OneCycleLR keeps its annealing function, bound to the scheduler, whose copy would
    copy the optimizer and the model's parameters with it)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_setting(v) for v in value)
    if isinstance(value, dict):  # MultiStepLR's milestones: a Counter
        return all(_plain_setting(k) and _plain_setting(v) for k, v in value.items())
    return False


def schedule_settings(schedulers, config=None):
    """``{name: (type, settings)}`` of mmengine param schedulers (a list, or a dict of lists, one
    per optimizer): what each was built with (``begin``, ``end``, ``eta_min``, its base values,
    ...), without its progress; for :func:`resumed_schedule_changes`. ``config`` (the config's
    ``param_scheduler``) names them as it does: one dict, not a list, is ``param_scheduler``."""
    def single(spec):  # one scheduler's dict, which mmengine wraps into a list
        return hasattr(spec, 'get') and 'type' in spec

    named = (schedulers.items() if isinstance(schedulers, dict) else [('', schedulers or [])])
    found = {}
    for prefix, group in named:
        spec = (config.get(prefix) if prefix and hasattr(config, 'get') and not single(config)
                else config)
        for i, scheduler in enumerate(group or []):
            settings = {k: copy.deepcopy(v) for k, v in vars(scheduler).items()
                        if k not in _SCHEDULE_PROGRESS and _plain_setting(v)}
            key = '.'.join(['param_scheduler'] + ([prefix] if prefix else [])
                           + ([] if single(spec) else [str(i)]))
            found[key] = (type(scheduler).__name__, settings)
    return found


def _same(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
        except TypeError:
            return False
    return a == b


def _said(value):
    if isinstance(value, (list, tuple)) and len(set(map(str, value))) == 1:
        value = value[0]  # one base value per parameter group, all alike
    return f'{value:g}' if isinstance(value, float) else str(value)


def resumed_schedule_changes(built, restored, filename):
    """The warning for a ``--resume`` whose config changed the schedule (``end``, ``eta_min``,
    the learning rate, ...), or None. mmengine restores every scheduler whole from the checkpoint,
    so a run resumed with ``train_cfg.max_iters=80 param_scheduler.1.end=80`` kept the saved end
    60 and trained its last 20 iterations at the floor learning rate, without a word. ``built``
    and ``restored`` are :func:`schedule_settings` before and after the resume."""
    changes = []
    for key, (kind, fresh) in built.items():
        saved = restored.get(key, (kind, {}))[1]
        diffs = [f"{'base ' + fresh.get('param_name', 'lr') if name == 'base_values' else name} "
                 f'{_said(saved[name])} (the config: {_said(value)})'
                 for name, value in fresh.items() if name in saved and not _same(saved[name], value)]
        if diffs:
            changes.append(f"{key} ({kind}) keeps {', '.join(diffs)}")
    if not changes:
        return None
    return (f'--resume {filename}: mmengine restores each param_scheduler as the checkpoint saved '
            f"it, not as this run's config builds it: {'; '.join(changes)}. To "
            'train with the new schedule, start a new run from the checkpoint\'s weights '
            f'(--cfg-options load_from={filename}, without --resume; the optimizer\'s state starts '
            'anew), or resume with the schedule unchanged.')


#: the checkpoint ``meta`` key of the random number generators' states (:func:`random_states`)
RANDOM_STATES = 'reparam_mm_random_states'


def random_states():
    """The states of torch's (CPU and CUDA), NumPy's and Python's global random number
    generators, in types the safe loader reads (tensors, ints, floats, lists): mmengine seeds
    them afresh on ``--resume``, so a resumed run drew other dropout masks and crops than the
    run it continues (the loss 3 iterations on read 0.8663 against 0.8720)."""
    import random

    import numpy as np
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return dict(
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        random=dict(version=version, internal=list(internal), gauss=py_gauss))


def restore_random_states(states, main_process_data=False):
    """Set the generators to ``states`` (:func:`random_states`). NumPy's and Python's are kept as
    they are when the main process loads the data (``num_workers=0``): mmengine's resume
    replays the pipeline of every batch trained before, which left them where the run was."""
    import random

    import numpy as np
    torch.set_rng_state(states['torch'])
    cuda = states.get('cuda') or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if not main_process_data:
        n = states['numpy']
        np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'],
                             n['has_gauss'], n['gauss']))
        r = states['random']
        random.setstate((r['version'], tuple(r['internal']), r['gauss']))
