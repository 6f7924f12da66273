# Shared by every config of this project.
# `import reparam_mm` registers DO-Conv, RepLKNet, the DO-Conv ResNets, the
# conv_cfg-aware RPN head and FusedEvalHook in mmengine's root registries, so
# they resolve under both the mmseg and the mmdet default scope.
custom_imports = dict(imports=['reparam_mm'], allow_failed_imports=False)
# Validate / test the re-parameterised (fused) model, the one that is deployed.
custom_hooks = [dict(type='FusedEvalHook')]
