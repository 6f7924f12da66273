"""Which OpenMMLab package builds a config's model: its ``default_scope``, mmseg or mmdet."""
import importlib

SCOPES = ('mmseg', 'mmdet')


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
