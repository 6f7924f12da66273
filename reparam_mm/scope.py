"""Reading a config, and which OpenMMLab package builds its model (its ``default_scope``)."""
import importlib
import os
import re

from mmengine.config import Config

SCOPES = ('mmseg', 'mmdet')


class ConfigImportError(ImportError):
    """A module of a config's ``custom_imports`` does not import."""


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
        raise ValueError(f"{name}config default_scope is {scope!r}; reparam_mm's tools support "
                         f"{' and '.join(SCOPES)} configs, so set default_scope to one of them.")
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return scope
