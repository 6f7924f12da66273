"""reparam_mm.complexity and tools/get_flops.py: parameters and multiply-adds, trained and fused."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import ROOT, load_tool

DEMO_SEG = ROOT / 'configs/demo/upernet_replknet-tiny-doconv_1xb8-600i_demoade-64x64.py'
DEMO_DET = ROOT / ('configs/demo/faster-rcnn-doconv_r18-narrow-doconv_fpn_4conv1fc_1xb4-400i_'
                   'coco128-person-320.py')
CASCADE_MASK_31B = ('replknet/cascade-mask-rcnn_replknet-31b-in1k-pre_fpn_4conv1fc-giou_16xb1-ms-'
                    'crop-3x_coco.py')


def _config(path, **options):
    from reparam_mm.scope import load_config, merge_cfg_options
    cfg = load_config(str(path))
    merge_cfg_options(cfg, options)
    return cfg


@pytest.mark.timeout(120)
def test_counts_equal_an_independent_trace_counter_and_on_meta_what_a_real_forward_counts():
    """mmengine's FlopAnalyzer (a TorchScript trace, another counter) finds the same convolution
    and matrix-product multiply-adds in both forms of the RepLKNet + DO-Conv demo: the trained one
    also composes DO-Conv's kernels (bmm), the fused one runs plain convs only. The meta device
    gives what a real forward on CPU tensors does."""
    from mmengine.analysis import FlopAnalyzer

    from reparam_mm.apis import build_model
    from reparam_mm.complexity import _preprocessed, count_macs, model_complexity
    from reparam_mm.fuse import fuse
    from reparam_mm.layers.large_kernel import fft_min_kernel
    cfg = _config(DEMO_SEG)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs, samples = _preprocessed(cfg, 96, 128, 'cpu')

    class TensorForward(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x, samples, mode='tensor')

    def traced(net):
        with fft_min_kernel(10**9):
            analyzer = FlopAnalyzer(TensorForward(net), (inputs, ))
            analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_op = analyzer.by_operator()
        return by_op, by_op.get('conv', 0) + by_op.get('bmm', 0) + by_op.get('addmm', 0)

    trained_ops, trained = traced(model)
    assert trained_ops['bmm'] > 0 and trained_ops['batch_norm'] > 0  # BN is left out of ours
    fused = fuse(model)
    fused_ops, fused_macs = traced(fused)
    assert 'bmm' not in fused_ops and fused_macs < trained
    counted = model_complexity(cfg, (96, 128))
    assert (counted.macs, counted.macs_fused) == (trained, fused_macs)
    assert count_macs(fused, inputs, samples) == fused_macs
    assert model_complexity(cfg, (96, 128), device='cpu') == counted
    assert counted.input_shape == (96, 128)
    assert counted.params > counted.params_fused > counted.params_run > 0  # + the FCN aux head


@pytest.mark.timeout(120)
def test_two_stage_heads_are_counted_per_proposal_and_per_detection():
    """The box head runs on the RPN's max_per_img proposals: halving them removes exactly the
    demo Faster R-CNN's per-RoI box head (4 convs 64->64 3x3 at 7x7, fc 3136->256, fc_cls 2,
    fc_reg 4) per proposal. The Cascade Mask R-CNN's three mask heads (4 convs 256->256 3x3 at
    14x14, a 2x2 deconv, 80 logits at 28x28) run on the R-CNN's max_per_img detections."""
    from reparam_mm.complexity import model_complexity
    full = model_complexity(_config(DEMO_DET), (320, 512))
    half = model_complexity(_config(DEMO_DET, **{'model.test_cfg.rpn.max_per_img': 500}), (320, 512))
    assert (full.proposals, half.proposals, full.detections) == (1000, 500, 100)
    # on CPU tensors, mmdet's own RoI extractor runs (the meta device only gets the shapes)
    assert model_complexity(_config(DEMO_DET), (320, 512), device='cpu') == full
    per_roi = 4 * 64 * 64 * 9 * 49 + 64 * 49 * 256 + 256 * 2 + 256 * 4
    assert full.macs_fused - half.macs_fused == 500 * per_roi
    # the trained form also composes DO-Conv's kernels, once per forward, whatever the RoIs
    assert full.macs - half.macs == 500 * per_roi and full.macs > full.macs_fused

    # a batch of two images costs twice one, heads included (each image has its own RoIs)
    from reparam_mm.apis import build_model
    from reparam_mm.complexity import _preprocessed, count_macs
    from reparam_mm.fuse import fuse
    cfg = _config(DEMO_DET)
    with torch.device('meta'):
        model = fuse(build_model(cfg).eval())
    one, two = (count_macs(model, *_preprocessed(cfg, 320, 512, 'meta', images=n)) for n in (1, 2))
    assert (one, two) == (full.macs_fused, 2 * full.macs_fused)

    cascade = ROOT / 'configs' / CASCADE_MASK_31B
    masks = model_complexity(_config(cascade), (320, 480))
    fewer = model_complexity(_config(cascade, **{'model.test_cfg.rcnn.max_per_img': 50}), (320, 480))
    per_mask = 4 * 256 * 256 * 9 * 14 * 14 + 256 * 256 * 4 * 14 * 14 + 256 * 80 * 28 * 28
    assert masks.macs_fused - fewer.macs_fused == 3 * 50 * per_mask


# The authors' model sizes (RepLKNet-pytorch's and UniRepLKNet's READMEs: parameters in M and
# FLOPs in G, rounded; FLOPs at 2048x512 for ImageNet-1K backbones, 2560x640 for 22K ones, 1280x800
# for detection): our configs' fused models, counted at those sizes, within the rounding.
REPORTED = [
    ('replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py', (512, 2048), 112, 1170),
    (CASCADE_MASK_31B, (800, 1280), 137, 965),
    ('unireplknet/upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py', (512, 2048), 61, 946),
    ('unireplknet/upernet_unireplknet-b-in22k-pre_8xb2-160k_ade20k-640x640.py', (640, 2560), 130, 1850),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize('config,shape,params_m,gflops', REPORTED,
                         ids=['upernet-31b', 'cascade-mask-31b', 'upernet-uni-t', 'upernet-uni-b'])
def test_shipped_configs_have_the_authors_model_sizes(config, shape, params_m, gflops):
    from reparam_mm.complexity import model_complexity
    counted = model_complexity(_config(ROOT / 'configs' / config), shape)
    assert counted.input_shape == shape
    assert abs(counted.params_run / 1e6 - params_m) <= 0.5, counted
    assert abs(counted.macs_fused / 1e9 - gflops) / gflops < 0.005, counted


@pytest.mark.timeout(120)
def test_the_input_defaults_to_the_test_resize_scale_then_the_preprocessor_size_then_is_asked_for():
    """The demo configs test their 64 x 64 images as they are (no Resize) and pad every batch to
    model.data_preprocessor.size: counting took no size from there and asked for --shape."""
    from mmengine.config import Config

    from reparam_mm.complexity import default_input_size, input_size_from_pipeline, model_complexity
    from reparam_mm.scope import ConfigError
    ade = _config(ROOT / 'configs/replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py')
    assert input_size_from_pipeline(ade) == (512, 2048)  # mmcv's scale (2048, 512) is (W, H)
    assert default_input_size(ade) == ((512, 2048), "the test pipeline's Resize scale")
    wrapped = Config(dict(test_dataloader=dict(dataset=dict(type='RepeatDataset', dataset=dict(
        pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize', scale=320)])))))
    assert input_size_from_pipeline(wrapped) == (320, 320)
    cfg = _config(DEMO_SEG, **{'model.data_preprocessor.size': (48, 80)})  # (H, W), as mmseg pads
    assert input_size_from_pipeline(cfg) is None
    counted = model_complexity(cfg)
    assert (counted.input_shape, counted.input_from) == ((48, 80), 'model.data_preprocessor.size')
    given = model_complexity(cfg, (48, 80))
    assert given.input_from is None and given.macs_fused == counted.macs_fused
    cfg.model.data_preprocessor.size = None
    with pytest.raises(ConfigError, match=r'^the config has no Resize step with a scale in its '
                                          r'test pipeline and no model\.data_preprocessor\.size to '
                                          r'count at; give the input size'):
        model_complexity(cfg)


@pytest.mark.timeout(60)
def test_gmacs_keep_one_decimal_for_big_models_and_three_significant_digits_for_small_ones():
    """One decimal printed the 64 x 64 demo's 26.8 M multiply-adds as 0.0; docs/configs.md's
    full-size rows (one decimal) read as before. A pair shares its number of decimals."""
    gmacs = load_tool('get_flops').gmacs
    assert gmacs(1170.9e9, 1169.3e9) == ['1170.9', '1169.3']
    assert gmacs(321.04e9, 320.9e9) == ['321.0', '320.9'] and gmacs(12.34e9) == ['12.3']
    assert gmacs(26.8e6, 25.06e6) == ['0.0268', '0.0251']
    assert gmacs(1.2346e9, 0.5e9) == ['1.235', '0.500'] and gmacs(3.14159e9) == ['3.14']
    assert gmacs(0) == ['0.0']


@pytest.mark.timeout(120)
def test_tool_prints_a_row_per_config_and_writes_json(tmp_path, capsys):
    out = tmp_path / 'counts.json'
    load_tool('get_flops').main([str(DEMO_SEG), str(DEMO_DET), '--shape', '64', '96', '--json', str(out)])
    lines = capsys.readouterr().out.splitlines()
    counts = json.loads(out.read_text())
    seg, det = counts[str(DEMO_SEG)], counts[str(DEMO_DET)]
    assert lines[0].startswith('| config | input H x W | params M (trained / fused / run) |')
    assert 0.01 < seg['macs_fused'] / 1e9 < seg['macs'] / 1e9 < 0.1  # three digits: 4 decimals
    assert lines[2] == (f'| {DEMO_SEG.name} | 64 x 96 | {seg["params"] / 1e6:.2f} / '
                        f'{seg["params_fused"] / 1e6:.2f} / {seg["params_run"] / 1e6:.2f} | '
                        f'{seg["macs"] / 1e9:.4f} / {seg["macs_fused"] / 1e9:.4f} |')
    assert lines[3].startswith(f'| {DEMO_DET.name} | 64 x 96 |')
    assert det['proposals'] == 1000 and seg['proposals'] is None
    assert lines[-1] == ('Two-stage detectors: box heads on 1000 proposals, mask heads on 100 '
                         "detections (the test_cfg's max_per_img).")


@pytest.mark.timeout(120)
def test_tool_without_an_input_size_is_one_sentence_naming_the_config(tmp_path, capsys):
    """The table's header came before the error of a first config that could not be counted;
    it comes with the first row now. The demo's size from its preprocessor is said."""
    from reparam_mm.cli import run_tool
    cfg = tmp_path / 'no_resize.py'
    cfg.write_text(f"_base_ = [{str(DEMO_SEG)!r}]\n"
                   "test_dataloader = dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile')]))\n"
                   "model = dict(data_preprocessor=dict(size=None))\n")
    assert run_tool(load_tool('get_flops').main, [str(DEMO_DET), str(cfg)]) == 1
    said = capsys.readouterr()
    assert said.out.splitlines()[0].startswith('| config |')
    assert said.out.splitlines()[2].startswith(f'| {DEMO_DET.name} | 320 x 512 |')  # the row before
    assert said.err.strip().splitlines()[-1] == (
        f'error: {cfg}: the config has no Resize step with a scale in its test pipeline and no '
        'model.data_preprocessor.size to count at; give the input size (tools/get_flops.py '
        '--shape H W).'), said.err
    assert run_tool(load_tool('get_flops').main, [str(cfg), str(DEMO_SEG)]) == 1
    said = capsys.readouterr()
    assert said.out == '' and said.err.strip().splitlines()[-1].startswith(f'error: {cfg}: ')
    assert run_tool(load_tool('get_flops').main, [str(DEMO_SEG), '--images', '1', '--cfg-options',
                                                  f'test_dataloader.dataset.data_root={tmp_path}/no']) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(  # a FileNotFoundError too
        f"error: {DEMO_SEG}: data root '{tmp_path}/no' (test_dataloader.dataset.data_root) does not exist")
    load_tool('get_flops').main([str(DEMO_SEG)])  # no Resize: the preprocessor's size, said so
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(f'| {DEMO_SEG.name} | 64 x 64 |') and lines[-1] == (
        f'{DEMO_SEG.name}: input 64 x 64 from model.data_preprocessor.size (its test pipeline has '
        'no Resize step; the preprocessor pads images to that size).')


@pytest.mark.timeout(120)
@pytest.mark.parametrize('config', [
    'replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py',
    'unireplknet/upernet_unireplknet-t-in1k-pre_8xb2-160k_ade20k-512x512.py',
    'doconv/faster-rcnn-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py',
    'doconv/deeplabv3plus_mobilenet-v2-d8-doconv_4xb2-80k_cityscapes-512x1024.py',
], ids=['replknet', 'unireplknet', 'doconv-faster', 'withdoconv-mobilenet'])
def test_the_deploy_config_builds_the_fused_model_of_full_size_configs(config):
    """What tools/fuse.py writes builds, without fusing, the model fusing gives: the same
    parameters and the same multiply-adds at the config's test size."""
    from reparam_mm.apis import deploy_config
    from reparam_mm.complexity import model_complexity
    cfg = _config(ROOT / 'configs' / config)
    trained = model_complexity(cfg, (256, 384))
    deploy = model_complexity(deploy_config(cfg)[0], (256, 384))
    assert trained.params > trained.params_fused
    assert (deploy.params, deploy.macs) == (trained.params_fused, trained.macs_fused)
    assert (deploy.params_fused, deploy.macs_fused) == (deploy.params, deploy.macs)  # nothing left


@pytest.mark.timeout(120)
def test_a_sliding_window_test_costs_what_mmsegs_slide_inference_runs(capsys):
    """The crops mmseg's own slide_inference runs, counted around it on CPU tensors: 2 rows x 4
    columns of 32 x 32 crops over a 48 x 80 input (stride 21), each one forward at the crop size."""
    from torch.utils.flop_counter import FlopCounterMode

    from reparam_mm.apis import build_model
    from reparam_mm.complexity import _preprocessed, model_complexity, slide_crops
    from reparam_mm.fuse import fuse
    from reparam_mm.layers.large_kernel import fft_min_kernel
    cfg = _config(DEMO_SEG, **{'model.test_cfg': dict(mode='slide', crop_size=(32, 32), stride=(21, 21))})
    assert slide_crops(cfg, 48, 80) == (8, (32, 32)) and slide_crops(cfg, 20, 40) == (2, (20, 32))
    counted = model_complexity(cfg, (48, 80))
    assert (counted.test_crops, counted.crop_shape) == (8, (32, 32))
    torch.manual_seed(0)
    model = fuse(build_model(cfg).eval())
    inputs, samples = _preprocessed(cfg, 48, 80, 'cpu')
    with fft_min_kernel(10**9), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.slide_inference(inputs, [s.metainfo for s in samples])
    assert counted.macs_test_fused == counter.get_total_flops() // 2
    assert model_complexity(_config(DEMO_SEG), (48, 80)).test_crops is None  # whole-image test
    load_tool('get_flops').main([str(DEMO_SEG), '--shape', '48', '80', '--cfg-options',
                                 'model.test_cfg.mode=slide', 'model.test_cfg.crop_size=(32,32)',
                                 'model.test_cfg.stride=(21,21)'])
    assert 0.01 < counted.macs_test_fused / 1e9 < 0.1
    assert capsys.readouterr().out.splitlines()[-1] == (
        f'{DEMO_SEG.name}: a sliding-window test, 8 crops of 32 x 32 on a 48 x 80 input: '
        f'{counted.macs_test_fused / 1e9:.4f} GMACs fused (the row counts one whole-image forward, '
        'as the papers do).')


@pytest.mark.parametrize('base,refusal', [
    ('ms_rcnn/ms-rcnn_r50_fpn_1x_coco.py', r'^counting a two-stage detector runs its box and mask heads '
     r'as StandardRoIHead and CascadeRoIHead do at test time; MaskScoringRoIHead does more there'),
    ('groie/faste-rcnn_r50_fpn_groie_1x_coco.py', r'^GenericRoIExtractor cannot run on the meta device '
     r'\(only SingleRoIExtractor is stood in for there\); count with --device cpu\.$'),
    ('fast_rcnn/fast-rcnn_r50_fpn_1x_coco.py', r'^FastRCNN takes its proposals from files, which '
     r'counting cannot: it counts two-stage detectors with an RPNHead\.$'),
], ids=['ms-rcnn', 'groie', 'fast-rcnn'])
def test_detectors_with_more_test_time_work_are_refused_not_undercounted(tmp_path, base, refusal):
    """mmdet's own configs whose heads do work the count would leave out (MS R-CNN's mask-IoU
    head), whose RoI extractor runs convolutions the meta device cannot stand in for (GRoIE),
    or that take their proposals from files."""
    from reparam_mm.complexity import model_complexity
    from reparam_mm.scope import ConfigError
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(f"_base_ = ['mmdet::{base}']\n")
    with pytest.raises(ConfigError, match=refusal):
        model_complexity(_config(cfg), (128, 160))


@pytest.mark.timeout(120)
@pytest.mark.parametrize('base', ['mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
                                  'cascade_rcnn/cascade-mask-rcnn_r50_fpn_1x_coco.py'],
                         ids=['mask-rcnn', 'cascade-mask-rcnn'])
def test_two_stage_counts_equal_what_mmdets_own_predict_runs(tmp_path, base):
    """With NMS keeping every box (IoU threshold 1, no score threshold), mmdet's own predict runs its
    box heads on exactly max_per_img proposals and its mask heads on max_per_img detections:
    counted around it on CPU tensors, it gives the count (ResNet-18 Mask / Cascade Mask R-CNN)."""
    from torch.utils.flop_counter import FlopCounterMode

    from reparam_mm.apis import build_model
    from reparam_mm.complexity import _preprocessed, model_complexity
    from reparam_mm.fuse import fuse
    keep_all = 'nms=dict(iou_threshold=1.0)'
    cfg_path = tmp_path / 'cfg.py'
    cfg_path.write_text(f"""_base_ = ['mmdet::{base}']
custom_imports = dict(imports=['reparam_mm'], allow_failed_imports=False)
model = dict(backbone=dict(depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]),
             test_cfg=dict(rpn=dict(max_per_img=100, {keep_all}),
                           rcnn=dict(max_per_img=20, score_thr=0.0, {keep_all})))
""")
    cfg = _config(cfg_path)
    torch.manual_seed(0)
    model = fuse(build_model(cfg).eval())
    inputs, samples = _preprocessed(cfg, 128, 160, 'cpu')
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        predicted = model.predict(inputs, samples)
    assert len(predicted[0].pred_instances) == 20
    counted = model_complexity(cfg, (128, 160))
    assert (counted.proposals, counted.detections) == (100, 20)
    assert counted.macs_fused == counter.get_total_flops() // 2


@pytest.mark.timeout(120)
def test_the_mean_over_test_images_counts_each_image_at_its_tested_size(shared_data, tmp_path, capsys):
    """mmdet's --num-images: the first 10 coco128 images as the demo detector's test pipeline
    sizes them (keep-ratio resize within 512 x 320, from the json's image sizes; two share one)
    give the mean of the counts at those sizes, one per image."""
    import mmcv

    from reparam_mm.complexity import model_complexity, tested_image_sizes
    from reparam_mm.scope import ConfigError
    root = shared_data / 'coco128'
    options = {'test_dataloader.dataset.data_root': str(root) + '/',
               'test_evaluator.ann_file': str(root / 'annotations/instances_train2017.json')}
    cfg = _config(DEMO_DET, **options)
    images = json.loads((root / 'annotations/instances_train2017.json').read_text())['images'][:10]
    expected = []
    for image in images:
        w, h = mmcv.rescale_size((image['width'], image['height']), (512, 320))
        expected.append((h, w))
    assert tested_image_sizes(cfg, 10) == expected and len(set(expected)) == 9
    counted = model_complexity(cfg, images=10)
    mean = sum(model_complexity(cfg, size).macs_fused for size in expected) / 10
    assert (counted.images, counted.input_shape) == (10, None) and counted.macs_fused == round(mean)
    with pytest.raises(ConfigError, match='^count at one input size or over test images, not both'):
        model_complexity(cfg, (64, 64), images=6)
    absent = _config(DEMO_DET, **{**options, 'test_dataloader.dataset.data_root': f'{tmp_path}/no/'})
    with pytest.raises(FileNotFoundError, match=rf"^data root '{tmp_path}/no/' \(test_dataloader\.dataset"
                                                 r"\.data_root\) does not exist: prepare the dataset"):
        model_complexity(absent, images=6)
    load_tool('get_flops').main([str(DEMO_DET), '--images', '2', '--cfg-options',
                                 *(f'{k}={v}' for k, v in options.items())])
    assert f'| {DEMO_DET.name} | mean of 2 test images |' in capsys.readouterr().out
