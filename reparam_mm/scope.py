"""Reading a config and applying ``--cfg-options`` to it, and which OpenMMLab package builds its
model (its ``default_scope``)."""
import importlib
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


def merge_cfg_options(cfg, options):
    """Apply ``--cfg-options`` to ``cfg`` as mmengine does (a new key is added), refusing a key
    that looks like a misspelling of one the config has: mmengine would add it and the run
    would fail pages later with a ``TypeError`` naming a class, or silently ignore it."""
    for key in options or {}:
        miss = _near_miss(cfg, key)
        if miss is not None:
            raise ConfigError(
                f'--cfg-options {key}: the config has no {miss[0]}, but has {miss[1]}; fix the '
                'spelling (a new key that is meant so goes into a config file that inherits '
                'this one).')
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


def load_config(config):
    """``config`` as a :class:`Config` (a path is read). A module of its ``custom_imports``
    that does not import is one sentence naming the config, the module and the fix, instead of
    mmengine's advice to set ``PYTHONPATH``."""
    if isinstance(config, Config):
        return config
    if not os.path.isfile(config):
        raise FileNotFoundError(f'config {config} does not exist; pass the path of a config file, '
                                'e.g. one under configs/ (docs/configs.md lists them).')
    try:
        return Config.fromfile(config)
    except ImportError as error:
        failed = re.match(r'Failed to import (\S+)', str(error.__cause__ or ''))
        if failed is None:
            raise
        module = failed.group(1)
        root = error.__cause__.__context__
        why = f'{type(root).__name__}: {root}' if root is not None else 'it does not import'
        package = module.split('.')[0]
        fix = _IMPORT_HINTS.get(package, f'install the package that provides {package}, or take '
                                          f'{module} out of custom_imports')
        raise ConfigImportError(f'config {config} imports {module} (custom_imports), which '
                                f'fails here ({why}); {fix}.') from None


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
    meta = dict(getattr(cls, 'METAINFO', None) or {})
    meta.update(node.get('metainfo') or {})
    if not meta.get('classes'):
        return None
    return dict(classes=tuple(meta['classes']), palette=meta.get('palette'))
