"""Reading a config and applying ``--cfg-options`` to it, and which OpenMMLab package builds its
model (its ``default_scope``)."""
import importlib
import json
import os
import re

from mmengine.config import Config, DictAction

SCOPES = ('mmseg', 'mmdet')


class ConfigImportError(ImportError):
    """A module of a config's ``custom_imports`` does not import."""


class ConfigError(ValueError):
    """A setting of a config, or a command-line flag applied to it, that cannot work; the
    message names the setting and the fix (the tools print it as one line)."""


class CfgOptionsAction(DictAction):
    """mmengine's ``--cfg-options`` parser, with a usage error instead of a traceback for an item
    that is not ``KEY=VALUE``, or whose value mmengine's parser cannot read (``dict(...)``, on
    which it recurses until Python stops it)."""

    def __call__(self, parser, namespace, values, option_string=None):
        for item in values or ():
            if '=' not in item:
                parser.error(f"{option_string} takes KEY=VALUE items; {item!r} has no '=' "
                             f'(write {item}=VALUE).')
            key, value = item.split('=', 1)
            if 'dict(' in value.replace(' ', ''):
                parser.error(f'{option_string} {item}: a dict(...) value is not read by '
                             "mmengine's --cfg-options parser; set its fields one by one, e.g. "
                             f'{key}.FIELD=VALUE (a list or tuple value is read: '
                             f'{key}.FIELD=[a,b]).')
        super().__call__(parser, namespace, values, option_string)


def _one_edit_apart(a, b):
    """True when ``b`` is ``a`` with one typing slip past the first letter: a character inserted,
    deleted or replaced, or two neighbours swapped (``max_iter`` for ``max_iters``). Not related
    names (``stage_with_doconv`` beside ``stage_with_dcn``), nor a new first letter (``dtype``
    beside ``type``, both real keys of an optimizer wrapper)."""
    if a == b or abs(len(a) - len(b)) > 1 or a[:1] != b[:1]:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(1, len(long_)))


def _near_miss(cfg, key):
    """``(written, existing)`` when ``key`` adds a name one typing slip away from one the config
    has at that place (``train_cfg.max_iter`` beside ``max_iters``), else None."""
    node, parts = cfg, key.split('.')
    for i, part in enumerate(parts):
        if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not hasattr(node, 'keys'):
            return None
        if part in node:
            node = node[part]
            continue
        if len(part) < 3:  # too short to tell a slip from another name
            return None
        close = sorted(k for k in node.keys() if isinstance(k, str) and _one_edit_apart(part, k))
        return ('.'.join(parts[:i + 1]), '.'.join(parts[:i] + close[:1])) if close else None
    return None


#: top-level keys that something reads from the config itself: mmengine's runners and config
#: parser, mmseg's and mmdet's tools (``tta_model`` / ``tta_pipeline`` with ``--tta``) and this
#: project's (``large_dw_dispatch``, ``load_from_partial``; ``crop_size``: tools/export_onnx.py's
#: default ``--shape``). Any other top-level key is a variable of the config file (``data_root``,
#: ``norm_cfg``, ``train_pipeline``, ``max_iters``; ``vis_backends`` too: the visualizer holds its
#: own copy), whose value mmengine copied where the file uses it while reading it.
READ_KEYS = frozenset({
    '_base_', 'custom_imports', 'default_scope', 'model', 'work_dir', 'experiment_name',
    'train_dataloader', 'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg', 'test_cfg',
    'auto_scale_lr', 'optim_wrapper', 'param_scheduler', 'val_evaluator', 'test_evaluator',
    'default_hooks', 'custom_hooks', 'data_preprocessor', 'load_from', 'resume', 'launcher',
    'env_cfg', 'log_processor', 'log_level', 'visualizer', 'randomness', 'runner_type',
    'model_wrapper_cfg', 'find_unused_parameters', 'compile', 'strategy', 'sync_bn',
    'efficient_conv_bn_eval', 'activation_checkpointing', 'tta_model', 'tta_pipeline',
    'large_dw_dispatch', 'load_from_partial', 'crop_size'})


def _plain(value):
    """``value`` with tuples as lists and without ``_scope_`` keys, for comparing parsed config
    values: mmengine adds ``_scope_='mmseg'`` to the top-level dicts of an ``mmseg::`` base (its
    ``norm_cfg``, ``vis_backends``), not to the copies the base made of them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != '_scope_'}
    return value


def _copies(node, value, path, name):
    """Config keys under ``node`` (at ``path``) that hold ``value`` (plain): anywhere for a string
    or a non-empty list or dict, only under a key called ``name`` for a number, bool or None (a
    600 elsewhere need not be ``max_iters``)."""
    if path.rsplit('.', 1)[-1] == name or (isinstance(value, (str, list, dict)) and value):
        if _plain(node) == value:
            yield path
            return
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _copies(child, value, f'{path}.{key}', name)
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _copies(child, value, f'{path}.{i}', name)


def _starts_with(node, prefix, path):
    """``(key, rest)`` for each string under ``node`` (at ``path``) that is the path ``prefix``
    followed by more of it (``data_root + 'annotations/instances_val2017.json'``), ``rest`` being
    what follows the prefix, without the ``/`` between them."""
    if isinstance(node, str):
        if prefix.endswith('/') and node.startswith(prefix) and node != prefix:
            yield path, node[len(prefix):]
        elif not prefix.endswith('/') and node.startswith(prefix + '/'):
            yield path, node[len(prefix) + 1:]
    elif isinstance(node, dict):
        for key, child in node.items():
            yield from _starts_with(child, prefix, f'{path}.{key}')
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _starts_with(child, prefix, f'{path}.{i}')


def _is_read(cfg, top, unread=()):
    """Whether something reads the top-level key ``top`` of ``cfg`` (:data:`READ_KEYS`), unless
    named in ``unread``; mmengine reads a top-level ``data_preprocessor`` only for a model config
    that has none."""
    if top in unread or top not in READ_KEYS:
        return False
    if top == 'data_preprocessor':
        return not (cfg.get('model') or {}).get('data_preprocessor')
    return True


def _cli_value(value):
    """``value`` as written on the command line (``[64,64]``, not ``[64, 64]``)."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(_cli_value(v) for v in value)
        return f'[{inner}]' if isinstance(value, list) else f'({inner})'
    return str(value)


def _variable_copies(cfg, key, value, unread=()):
    """``(top, copies)`` when ``key`` sets a top-level variable of the config file (one nothing
    reads) whose value is found copied elsewhere in the config, else None. ``copies``: ``(key,
    value, whole)`` for each key to set instead: ``key`` below a copy (``value`` as given, whole
    True), and for a path variable set whole (``data_root=...``) each string that starts with its
    old value too (COCO's ``val_evaluator.ann_file``), the new value in place of the old (whole
    False)."""
    top, _, rest = key.partition('.')
    if top not in cfg or _is_read(cfg, top, unread):
        return None
    old = _plain(cfg[top])
    read = [name for name in cfg.keys() if name != top and _is_read(cfg, name, unread)]
    suffix = f'.{rest}' if rest else ''
    copies = [(path + suffix, value, True)
              for name in read for path in _copies(cfg[name], old, name, top)]
    if copies and not rest and isinstance(old, str) and old.strip('/'):
        copies += [(path, str(value).rstrip('/') + '/' + tail, False) for name in read
                   for path, tail in _starts_with(cfg[name], old, name)]
    return (top, copies) if copies else None


def _unread_variable(cfg, key, value, found):
    """The sentence for ``--cfg-options key=value`` where ``key`` sets a top-level variable of the
    config file whose copies are ``found`` (:func:`_variable_copies`): the copies keep the value
    the file gave them, so the override changes nothing. The command it ends with sets every
    copy, however many."""
    top, copies = found

    def listed(paths):
        return ', '.join(paths[:-1]) + ' and ' + paths[-1] if len(paths) > 1 else paths[0]

    if len(copies) > 6:  # the command names them all
        where = f'into {len(copies)} keys'
    else:
        exact = [path for path, _, whole in copies if whole]
        started = [path for path, _, whole in copies if not whole]
        where = ', and '.join(filter(None, (exact and f'into {listed(exact)}',
                                            started and f'to the start of {listed(started)}')))
    rest = key.partition('.')[2]
    below_none = bool(rest) and cfg[top] is None  # keys set below None: mmengine needs _delete_

    def item(path, new, whole):
        set_it = f'{path}={_cli_value(new)}'
        return f'{path[:-len(rest) - 1]}._delete_=True {set_it}' if whole and below_none else set_it

    docs = (" (docs/datasets.md lists each dataset's)" if top == 'data_root' else
            ' (with _delete_=True, which lets mmengine put keys where the file has None)'
            if below_none else '')
    return (f'--cfg-options {key}={_cli_value(value)} changes nothing: {top} is a variable of the '
            f'config file, copied {where} when the file was read, so set '
            f"{'those' if len(copies) > 1 else 'that'} instead{docs}: --cfg-options "
            + ' '.join(item(*copy) for copy in copies) + '.')


def _sets(options, key):
    """Whether ``options`` sets ``key``, or a key above it."""
    parts = key.split('.')
    return any('.'.join(parts[:i]) in options for i in range(1, len(parts) + 1))


def merge_cfg_options(cfg, options, unread=()):
    """Apply ``--cfg-options`` to ``cfg`` as mmengine does (a new key is added), refusing a key
    that looks like a misspelling of one the config has (mmengine would add it and the run
    would fail pages later with a ``TypeError`` naming a class, or silently ignore it), and a
    top-level variable of the config file (``data_root=...``: its value was copied into the
    dataloaders when the file was read, so the run would use the old one without a word), unless
    the same options set each of its copies too. ``unread``: keys of :data:`READ_KEYS` the
    calling tool does not read (``crop_size`` in training)."""
    for key, value in (options or {}).items():
        miss = _near_miss(cfg, key)
        if miss is not None:
            raise ConfigError(
                f'--cfg-options {key}: the config has no {miss[0]}, but has {miss[1]}; fix the '
                'spelling (a new key that is meant so goes into a config file that inherits '
                'this one).')
        found = _variable_copies(cfg, key, value, unread)
        if found is not None and not all(_sets(options, path) for path, _, _ in found[1]):
            raise ConfigError(_unread_variable(cfg, key, value, found))
    if options:
        cfg.merge_from_dict(options)
    return cfg


def fit_persistent_workers(cfg):
    """A loader given ``num_workers=0`` (say, ``--cfg-options train_dataloader.num_workers=0`` to
    debug in one process) keeps the shipped ``persistent_workers=True``, which PyTorch's
    DataLoader refuses with a ValueError while the runner builds its loop: it is switched off
    for that loader, and a line says so."""
    from mmengine.logging import print_log
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        spec = cfg.get(loader)
        if hasattr(spec, 'get') and spec.get('persistent_workers') and not spec.get('num_workers'):
            spec['persistent_workers'] = False
            print_log(f'{loader}: num_workers=0, so persistent_workers=False (PyTorch keeps '
                      'workers alive only when there are some).', logger='current')
    return cfg


#: packages a config may import that need more than ``pip install`` beside the CPU torch
_IMPORT_HINTS = {
    'mmpretrain': ('mmpretrain imports torchvision, which must match the installed torch: install '
                   'mmpretrain 1.x with the torchvision built for your torch (the README\'s '
                   '"timm and mmpretrain models" names a venv that has both)'),
}


#: what the name of a checkpoint file ends with
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin', '.safetensors', '.pth.tar')
#: what mmengine reads a config from
CONFIG_SUFFIXES = ('.py', '.json', '.yaml', '.yml')


def _in_config_parser(code):
    """Whether ``code`` is mmengine's config parser (``mmengine/config/*.py``)."""
    return os.path.dirname(code.co_filename).replace('\\', '/').endswith('mmengine/config')


def _config_line(error):
    """``(file, line)`` of the config code that ``error`` came from: the deepest module-level frame
    mmengine's parser ran (the config or one of its bases); None when it came from elsewhere."""
    found, parser, tb = None, False, error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if parser and code.co_name == '<module>':
            found = (code.co_filename, tb.tb_lineno)
        parser = _in_config_parser(code)
        tb = tb.tb_next
    return found


def _parsed_file(error):
    """The file mmengine's parser was reading when ``error`` was raised (its ``filename``)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_locals.get('filename') if _in_config_parser(tb.tb_frame.f_code) else None
        found = name if isinstance(name, str) else found
        tb = tb.tb_next
    return found


def _frames(error):
    """The frames of ``error``'s traceback, outermost first."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _raised_by_parser(error, leaf):
    """Whether ``error`` was raised by mmengine's config parser itself, reading the config or its
    ``_base_`` files: from its first frame on, the traceback is in the parser, but for innermost
    frames of a file ending in ``leaf`` (Python's ``ast.py``, mmengine's ``utils/path.py``); not
    by a module of ``custom_imports`` (importlib's frames, then the module's) or by the config's
    own code."""
    codes = [frame.f_code for frame in _frames(error)]
    start = next((i for i, code in enumerate(codes) if _in_config_parser(code)), len(codes))
    inner = codes[start:]
    while inner and inner[-1].co_filename.replace('\\', '/').endswith(leaf):
        inner.pop()
    return bool(inner) and all(_in_config_parser(code) for code in inner)


def _missing_base(config, error):
    """The sentence for a ``FileNotFoundError`` mmengine's parser raised for a ``_base_`` file of
    ``config`` that does not exist (``open`` of a relative base, ``check_file_exist`` of a JSON
    or YAML one or of an ``mmseg::`` one), else None."""
    if not isinstance(error, FileNotFoundError) or \
            not _raised_by_parser(error, 'mmengine/utils/path.py'):
        return None
    named = re.fullmatch(r'file "(.*)" does not exist', str(error))
    path = error.filename or (named and named.group(1))
    if not path or os.path.abspath(path) == os.path.abspath(config):
        return None
    scope = next((f.f_locals.get('scope') for f in _frames(error)
                  if f.f_code.co_name == '_get_cfg_path'), None)
    if isinstance(scope, str):  # an ``mmseg::`` base: a file of the installed package
        named = os.path.normpath(path).replace('\\', '/').rpartition('/.mim/configs/')[2]
        return (f'config {config} reads {scope}::{named} (its _base_), which the installed {scope} '
                f'does not have ({os.path.normpath(path)} does not exist); fix that path in _base_.')
    return (f'config {config} reads {os.path.normpath(path)} (its _base_), which does not exist; '
            'fix that path in _base_ (it is relative to the folder of the config that names it).')


def _source(file, line):
    import linecache
    text = ' '.join(linecache.getline(file, line).split())
    return text if len(text) <= 80 else text[:77] + '...'


def _one_line(text):
    return ' '.join(str(text).split())


def _unreadable_config(config, error):
    """The sentence for ``error``, raised by mmengine reading the config file ``config``, naming
    the file, the line where there is one, and the cause; None for an error that did not come
    from the file (re-raised as it is)."""
    from mmengine.config.utils import ConfigParsingError

    def where(file, line):
        same = os.path.abspath(file) == os.path.abspath(config)
        return f'line {line}' + ('' if same else f' of {os.path.normpath(file)} (a base it reads)')

    if isinstance(error, SyntaxError) and _raised_by_parser(error, '/ast.py'):
        file = error.filename if error.filename and os.path.isfile(error.filename) else \
            _parsed_file(error) or config
        code = f' (in `{_source(file, error.lineno)}`)' if error.lineno else ''
        return (f'config {config} has a syntax error at {where(file, error.lineno)}: '
                f'{error.msg}{code}; fix it there.')
    missing = _missing_base(config, error)
    if missing is not None:
        return missing
    line = _config_line(error)
    if isinstance(error, ConfigParsingError):
        return f'config {config} does not read as a config: {_one_line(error)}'
    if isinstance(error, json.JSONDecodeError):
        return f'config {config} is not valid JSON ({_one_line(error)}); fix it there.'
    mark = getattr(error, 'problem_mark', None)  # yaml's
    if config.endswith(('.yaml', '.yml')) and mark is not None:
        return (f'config {config} is not valid YAML ({getattr(error, "problem", None) or "unreadable"} '
                f'at line {mark.line + 1}, column {mark.column + 1}); fix it there.')
    if line is None:
        return None
    frames = [frame.f_code for frame in _frames(error)]
    if type(error) is RuntimeError and not error.args and frames[-1].co_filename.replace(
            '\\', '/').endswith('mmengine/config/lazy.py'):  # an imported name called
        return (f'config {config} does not read as a config: mmengine reads a .py file that '
                f'imports modules as a lazy-import config, in which {where(*line)} '
                f'(`{_source(*line)}`) cannot call what it imports; pass a config file, e.g. one '
                'under configs/ (docs/configs.md lists them).')
    said = _one_line(error)
    return (f'config {config} fails at {where(*line)}: {type(error).__name__}'
            f'{": " + said if said else ""} (in `{_source(*line)}`); fix it there.')


#: what a config's text has at the start of a line (a script's ``model = init_model(...)`` is not
#: a ``dict(``)
_CONFIG_TEXT = re.compile(r'^(_base_\s*=|model\s*=\s*dict\()', re.M)


def _a_config_in(folder, entries=2000, depth=3, reads=8):
    """The path of a config file under ``folder`` (a ``.py`` file, not in a ``_base_``, whose text
    sets ``_base_`` or ``model = dict(...)``), or None: a ``configs`` folder is looked in first,
    and the search stops after ``entries`` names listed (a dataset's folders), ``depth`` folders
    down or ``reads`` files read (a folder of scripts)."""
    budget = dict(entries=entries, reads=reads)

    class Spent(Exception):
        pass

    def names(path):
        found = []
        with os.scandir(path) as listing:
            for entry in listing:
                budget['entries'] -= 1
                if budget['entries'] < 0:
                    raise Spent
                if not entry.name.startswith(('_', '.')):
                    found.append((entry.name, entry.is_dir()))
        return sorted(found)

    def is_config(path):
        if budget['reads'] <= 0:
            raise Spent
        budget['reads'] -= 1
        try:
            with open(path, encoding='utf-8', errors='replace') as f:
                return _CONFIG_TEXT.search(f.read(1 << 16)) is not None
        except OSError:
            return False

    def search(path, level):
        try:
            listed = names(path)
        except OSError:
            return None
        for name, is_dir in listed:
            if not is_dir and name.endswith('.py') and is_config(os.path.join(path, name)):
                return os.path.join(path, name)
        if level < depth:
            folders = sorted((name != 'configs', name) for name, is_dir in listed if is_dir)
            for _, name in folders:
                found = search(os.path.join(path, name), level + 1)
                if found:
                    return found
        return None

    if '_base_' in os.path.abspath(folder).replace('\\', '/').split('/'):
        return None  # what is in it is read by configs, not run
    try:
        return search(folder, 0)
    except Spent:
        return None


def load_config(config):
    """``config`` as a :class:`Config` (a path is read). What is not a config file is one sentence
    naming it and the fix: a folder, a checkpoint (the arguments swapped), another kind of file,
    a file mmengine fails to read (with the line and the cause), and a module of its
    ``custom_imports`` that does not import (instead of mmengine's advice to set
    ``PYTHONPATH``)."""
    if isinstance(config, Config):
        return config
    config = os.fspath(config)
    if os.path.isdir(config):
        example = _a_config_in(config)
        raise IsADirectoryError(f'config {config} is a folder, not a config file; pass a config '
                                'file in it' + (f', e.g. {example}' if example else '')
                                + ' (docs/configs.md lists them).')
    if config.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f'config {config} is a checkpoint, not a config: give the config file '
                          'first and the checkpoint after it (tools/test.py CONFIG CHECKPOINT; '
                          'tools/train.py CONFIG --resume CHECKPOINT).')
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config {config} does not exist; pass the path of a config file, '
                                'e.g. one under configs/ (docs/configs.md lists them).')
    if not config.lower().endswith(CONFIG_SUFFIXES):
        raise ConfigError(f'config {config} is not a config file: mmengine reads configs ending '
                          'in .py, .json, .yaml or .yml; pass one, e.g. under configs/ '
                          '(docs/configs.md lists them).')
    try:
        return Config.fromfile(config)
    except ImportError as error:
        failed = re.match(r'Failed to import (\S+)', str(error.__cause__ or ''))
        if failed is None:
            message = _unreadable_config(config, error)
            if message is None:
                raise
            raise ConfigError(message) from error
        module = failed.group(1)
        root = error.__cause__.__context__
        why = f'{type(root).__name__}: {root}' if root is not None else 'it does not import'
        package = module.split('.')[0]
        fix = _IMPORT_HINTS.get(package, f'install the package that provides {package}, or take '
                                          f'{module} out of custom_imports')
        raise ConfigImportError(f'config {config} imports {module} (custom_imports), which '
                                f'fails here ({why}); {fix}.') from None
    except Exception as error:  # noqa: BLE001 - what did not come from the file is re-raised
        message = _unreadable_config(config, error)
        if message is None:
            raise
        raise ConfigError(message) from error


def init_scope(cfg):
    """Register the modules of the config's ``default_scope`` (mmseg or mmdet), make it the
    current scope and return its name; any other scope is an error saying what to set."""
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        name = f'{cfg.filename}: ' if getattr(cfg, 'filename', None) else ''
        raise ConfigError(f"{name}config default_scope is {scope!r}; reparam_mm's tools support "
                          f"{' and '.join(SCOPES)} configs, so set default_scope to one of them.")
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return scope


def dataset_metainfo(cfg, loader='test_dataloader'):
    """``dict(classes, palette)`` of the dataset ``cfg[loader]`` reads (its class's ``METAINFO``,
    updated by the config's ``metainfo``; through dataset wrappers), or None when the config
    does not say. Needs the config's scope registered (:func:`init_scope`)."""
    node = (cfg.get(loader) or {}).get('dataset') or {}
    while 'type' in node and ('dataset' in node or 'datasets' in node):  # dataset wrappers
        node = node.get('dataset') or node['datasets'][0]
    kind = node.get('type')
    try:
        registry = importlib.import_module(f"{cfg.get('default_scope')}.registry").DATASETS
        cls = registry.get(kind) if isinstance(kind, str) else kind
    except Exception:  # noqa: BLE001 - another scope or an unregistered type: nothing to read
        cls = None
    base = dict(getattr(cls, 'METAINFO', None) or {})
    meta = dict(base, **(node.get('metainfo') or {}))
    if not meta.get('classes'):
        return None
    classes, palette = tuple(meta['classes']), meta.get('palette')
    if isinstance(palette, (list, tuple)) and len(palette) != len(classes):
        # the type's palette beside a subset of its classes: each class keeps its colour, as
        # mmseg's dataset picks them (a palette of another length failed mmseg's visualizer)
        known = tuple(base.get('classes') or ())
        palette = ([palette[known.index(c)] for c in classes]
                   if len(palette) == len(known) and set(classes) <= set(known) else None)
    return dict(classes=classes, palette=palette)
