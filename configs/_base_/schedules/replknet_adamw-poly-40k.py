# RepLKNet authors' segmentation fine-tuning recipe: AdamW (lr 2e-4,
# betas (0.9, 0.999), weight decay 0.05, no decay on norm layers), linear
# warm-up from 1e-6 then poly decay with power 1.0 to 0. 40k iterations at
# their batch of 128 (64 GPUs x 2) see as many images as the 160k x 32 (8 GPUs
# x 4) their configs call the default schedule.
# Configs with another length redefine max_iters, param_scheduler, train_cfg.
# Validation and checkpoints every 4k iterations (a tenth of the run, mmseg's
# schedule_40k), where the authors' configs use 2k: 10 evaluations, not 20.
_base_ = 'mmseg::_base_/schedules/schedule_40k.py'  # loops, hooks (4k interval)

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0))

max_iters = 40000
warmup_iters = 400  # the authors' 1500 / 160k, scaled to 40k
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-6,
        by_epoch=False,
        begin=0,
        end=warmup_iters),
    dict(
        type='PolyLR',
        power=1.0,
        eta_min=0.0,
        by_epoch=False,
        begin=warmup_iters,
        end=max_iters)
]
train_cfg = dict(max_iters=max_iters)
