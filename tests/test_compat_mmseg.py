"""mmseg's CrossEntropyLoss with class weights trains on labels with ignored pixels
(open-mmlab/mmsegmentation#3734), and gives F.cross_entropy's weighted mean."""
import pytest
import torch
import torch.nn.functional as F

import reparam_mm  # noqa: F401  (applies the fix)


def _case(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, 4, 6, 5, generator=g)
    label = torch.randint(0, 4, (2, 6, 5), generator=g)
    if ignore:
        label[0, :2] = 255
        label[1, 3, 1:4] = 255
    return pred, label


@pytest.mark.parametrize('avg_non_ignore', [False, True])
def test_class_weighted_loss_with_ignored_pixels_is_the_weighted_mean(avg_non_ignore):
    from mmseg.models.losses import CrossEntropyLoss
    weights = [0.5, 2.0, 1.0, 3.0]
    loss = CrossEntropyLoss(class_weight=weights, avg_non_ignore=avg_non_ignore)
    pred, label = _case()
    got = loss(pred, label, ignore_index=255)
    want = F.cross_entropy(pred, label, weight=torch.tensor(weights), ignore_index=255)
    torch.testing.assert_close(got, want)


def test_without_ignored_pixels_the_value_is_mmsegs_own():
    from mmseg.models.losses import cross_entropy_loss as ce
    from mmseg.models.losses import CrossEntropyLoss
    assert getattr(ce.cross_entropy, '_reparam_mm_fixed', False)
    pred, label = _case(ignore=False)
    weights = torch.tensor([0.5, 2.0, 1.0, 3.0])
    # mmseg's denominator: the class weight of every pixel, summed
    per_pixel = F.cross_entropy(pred, label, weight=weights, reduction='none')
    mmseg_value = per_pixel.sum() / weights[label].sum()
    got = CrossEntropyLoss(class_weight=weights.tolist())(pred, label, ignore_index=255)
    torch.testing.assert_close(got, mmseg_value)
    # unweighted losses take mmseg's path untouched
    plain = CrossEntropyLoss()(pred, label, ignore_index=255)
    torch.testing.assert_close(plain, F.cross_entropy(pred, label))
