"""minseg.metrics against hand-computed cases, brute-force recomputations and properties."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from minseg.metrics import (SegmentationMeter, apply_keypoint_regressor, ari, box_layout_error, confusion_matrix,
                            contingency_table, fit_keypoint_regressor, format_table, keypoint_error,
                            keypoint_regression_error, nmi, per_image_scores, segmentation_scores)

# Two 2x3 images. Image 0: GT fg at (0,0),(0,1); prediction fg at (0,0),(1,0) -> tp 1, fp 1, fn 1, tn 3.
# Image 1: GT and prediction both empty -> tn 6, IoU 1.0 by convention.
GT = np.array([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
PRED = np.array([[[1, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]]])


def test_hand_computed_scores():
    iou, acc = per_image_scores(PRED, GT)
    np.testing.assert_allclose(iou, [1 / 3, 1.0])
    np.testing.assert_allclose(acc, [4 / 6, 1.0])
    np.testing.assert_array_equal(confusion_matrix(PRED, GT), [[9, 1], [1, 1]])  # rows GT (bg, fg), cols pred
    s = segmentation_scores(PRED, GT)
    assert s["acc"] == pytest.approx(10 / 12)
    assert s["iou"] == pytest.approx(1 / 3)
    assert s["miou"] == pytest.approx((1 / 3 + 9 / 11) / 2)  # bg IoU = tn / (tn + fp + fn) = 9 / 11
    assert s["per_image_iou"] == pytest.approx(2 / 3)
    assert s["per_image_acc"] == pytest.approx(5 / 6)
    assert s["n_images"] == 2


def test_empty_gt_with_false_positives_scores_zero():
    gt = np.zeros((1, 2, 2))
    iou, acc = per_image_scores(np.array([[[1, 0], [0, 0]]]), gt)
    assert iou[0] == 0.0 and acc[0] == 0.75


def test_inverted_prediction_is_not_rescued():
    """No max over mask and inverted mask: predicting the complement scores IoU 0."""
    gt = np.zeros((1, 4, 4), dtype=np.int64)
    gt[0, :2] = 1
    s = segmentation_scores(1 - gt, gt)
    assert s["iou"] == 0.0 and s["acc"] == 0.0 and s["per_image_iou"] == 0.0


def test_part_maps_count_every_nonzero_class_as_foreground():
    parts = np.array([[[0, 2, 3], [1, 0, 0]]])  # K-part prediction
    gt = np.array([[[0, 1, 1], [0, 0, 1]]])[:, None]  # (N, 1, H, W) mask layout is accepted too
    iou, acc = per_image_scores(torch.from_numpy(parts), torch.from_numpy(gt))
    assert iou[0] == pytest.approx(2 / 4) and acc[0] == pytest.approx(4 / 6)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        per_image_scores(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="pred must have shape"):
        per_image_scores(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="before any update"):
        SegmentationMeter().result()


masks = arrays(np.int64, st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)),
               elements=st.integers(0, 2))


@settings(max_examples=60, deadline=None)
@given(masks, st.data())
def test_meter_matches_brute_force(gt, data):
    pred = data.draw(arrays(np.int64, gt.shape, elements=st.integers(0, 2)))
    split = data.draw(st.integers(0, len(gt)))
    meter = SegmentationMeter()
    for lo, hi in ((0, split), (split, len(gt))):
        if hi > lo:
            meter.update(pred[lo:hi], gt[lo:hi])
    r = meter.result()
    ious, accs, counts = [], [], np.zeros((2, 2))
    for p_img, g_img in zip(pred, gt):  # pixel by pixel, from the definitions
        tp = fp = fn = tn = 0
        for p, g in zip(p_img.ravel() != 0, g_img.ravel() != 0):
            tp, fp, fn, tn = tp + (p and g), fp + (p and not g), fn + (g and not p), tn + (not p and not g)
        ious.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
        accs.append((tp + tn) / (tp + fp + fn + tn))
        counts += [[tn, fp], [fn, tp]]
    (tn, fp), (fn, tp) = counts
    fg = tp / (tp + fp + fn) if tp + fp + fn else 0.0
    bg = tn / (tn + fp + fn) if tn + fp + fn else 0.0
    assert r["per_image_iou"] == pytest.approx(np.mean(ious))
    assert r["per_image_acc"] == pytest.approx(np.mean(accs))
    assert r["acc"] == pytest.approx((tp + tn) / counts.sum())
    assert r["iou"] == pytest.approx(fg) and r["miou"] == pytest.approx((fg + bg) / 2)


@settings(max_examples=40, deadline=None)
@given(arrays(np.int64, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)), elements=st.integers(0, 3)),
       st.data())
def test_part_recall_matches_pixel_count(parts, data):
    pred = data.draw(arrays(np.int64, parts.shape, elements=st.integers(0, 1)))
    meter = SegmentationMeter(num_parts=3)
    for lo in range(len(parts)):  # one image a batch
        meter.update(pred[lo:lo + 1], parts[lo:lo + 1] > 0, parts[lo:lo + 1])
    for k, recall in enumerate(meter.result()["part_recall"], 1):  # pixel by pixel, from the definition
        kept = [p for p, g in zip(pred.ravel(), parts.ravel()) if g == k]
        assert recall == (pytest.approx(sum(kept) / len(kept)) if kept else None)


def test_part_recall_of_a_headless_prediction():
    parts = np.array([[[1, 1, 2], [1, 1, 0], [0, 3, 0]]])  # body 1, head 2, tail 3
    pred = (parts == 1) | (np.arange(3)[None, :, None] == 2)  # the body and the bottom row
    r = SegmentationMeter(num_parts=4)
    r.update(pred, parts > 0, parts)
    assert r.result()["part_recall"] == [1.0, 0.0, 1.0, None]
    assert "part_recall" not in segmentation_scores(pred, parts)
    with pytest.raises(ValueError, match="pass parts"):
        r.update(pred, parts > 0)
    with pytest.raises(ValueError, match="part labels must be in 0..4"):
        r.update(pred, parts > 0, parts + 3)


# ----------------------------------------------------------------------------------------------- clustering

def test_nmi_ari_hand_computed():
    a, b = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(contingency_table(a, b), [[2, 1, 0], [0, 1, 2]])
    # I = 2 * (2/6) ln((2/6) / (1/2 * 1/3)) = (2/3) ln 2; H(a) = ln 2, H(b) = ln 3
    assert nmi(a, b) == pytest.approx((2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2))
    # pairs: cells 1 + 1 = 2, rows 3 + 3 = 6, cols 1 + 1 + 1 = 3, all 15; expected 6 * 3 / 15 = 1.2
    assert ari(a, b) == pytest.approx((2 - 1.2) / (4.5 - 1.2))
    # crossed 2x2 design: independent -> NMI 0; ARI = (0 - 2/3) / (2 - 2/3) = -0.5
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert nmi([0, 0, 1, 1], [5, 5, 5, 5]) == 0.0  # one trivial partition carries no information
    assert nmi([3, 3], [7, 7]) == 1.0 and ari([3, 3], [7, 7]) == 1.0  # both trivial: identical


labels = arrays(np.int64, st.integers(2, 40), elements=st.integers(0, 4))


@settings(max_examples=60, deadline=None)
@given(labels, st.data())
def test_nmi_ari_properties(a, data):
    b = data.draw(arrays(np.int64, a.shape, elements=st.integers(0, 4)))
    perm = np.array(data.draw(st.permutations(range(5))))
    assert nmi(a, a) == pytest.approx(1.0) and ari(a, a) == pytest.approx(1.0)
    assert nmi(a, perm[a]) == pytest.approx(1.0)  # renamed clusters are the same partition
    assert nmi(perm[a], b) == pytest.approx(nmi(a, b)) and ari(perm[a], b) == pytest.approx(ari(a, b))
    assert nmi(a, b) == pytest.approx(nmi(b, a)) and ari(a, b) == pytest.approx(ari(b, a))
    assert -1e-9 <= nmi(a, b) <= 1 + 1e-9 and ari(a, b) <= 1 + 1e-9


def test_independent_labels_score_near_zero():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 20000), rng.integers(0, 7, 20000)
    assert abs(nmi(a, b)) < 0.005 and abs(ari(a, b)) < 0.005
    noisy = np.where(rng.random(20000) < 0.5, a, rng.integers(0, 5, 20000))  # half the labels kept
    assert 0.1 < nmi(a, noisy) < 0.9 and 0.1 < ari(a, noisy) < 0.9


# ------------------------------------------------------------------------------------------------ keypoints

def test_keypoint_error_hand_computed():
    pred = np.array([[[0.0, 0.0], [1.0, 1.0]]])
    gt = np.array([[[3.0, 4.0, 1], [50.0, 50.0, 0]]])  # the second keypoint is invisible: not scored
    assert keypoint_error(pred, gt, image_size=10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no visible"):
        keypoint_error(pred, gt * [1, 1, 0], image_size=10)


def test_keypoint_regression_recovers_a_linear_map_without_bias():
    rng = np.random.default_rng(1)
    K, P = 4, 6
    W = rng.normal(size=(2 * K, 2 * P))
    centres = rng.uniform(0, 64, size=(80, K, 2))
    kp = np.concatenate([(centres.reshape(80, -1) @ W).reshape(80, P, 2), rng.random((80, P, 1)) < 0.7], -1)
    kp[..., :2] = np.where(kp[..., 2:] > 0, kp[..., :2], 1e6)  # invisible targets are garbage: must be ignored
    W_fit = fit_keypoint_regressor(centres[:60], kp[:60])
    np.testing.assert_allclose(W_fit, W, atol=1e-6)
    np.testing.assert_allclose(apply_keypoint_regressor(W_fit, centres[60:])[kp[60:, :, 2] > 0],
                               kp[60:, :, :2][kp[60:, :, 2] > 0], atol=1e-5)
    assert keypoint_regression_error(centres[:60], kp[:60], centres[60:], kp[60:], 64) < 1e-6
    # one keypoint, one centre on the x axis: y = 2x fits exactly; y = 2x + 5 cannot (no bias term)
    c = np.array([[[1.0, 0.0]], [[2.0, 0.0]], [[4.0, 0.0]]])
    assert fit_keypoint_regressor(c, np.array([[[2.0, 0, 1]], [[4.0, 0, 1]], [[8.0, 0, 1]]]))[0, 0] == pytest.approx(2)
    shifted = np.array([[[7.0, 0, 1]], [[9.0, 0, 1]], [[13.0, 0, 1]]])
    assert keypoint_regression_error(c, shifted, c, shifted, 1) > 0.5


def test_box_layout_baseline():
    # every object carries the same two keypoints at (1/4, 1/2) and (3/4, 1/2) of its box: the layout is exact
    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 20, (30, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 30, (30, 2))], 1)
    layout = np.array([[0.25, 0.5], [0.75, 0.5]])
    kp = boxes[:, None, :2] + layout * (boxes[:, None, 2:] - boxes[:, None, :2])
    kp = np.concatenate([kp, np.ones((30, 2, 1))], -1)
    garbage = kp.copy()
    garbage[:10, 1] = [999, 999, 0]  # invisible keypoints must not enter the mean layout
    assert box_layout_error(boxes[:20], garbage[:20], boxes[20:], kp[20:], 64) < 1e-12
    # boxes shifted by 4 px along x: every prediction is 4 px off
    moved = boxes[20:] + [4, 0, 4, 0]
    assert box_layout_error(boxes[:20], kp[:20], moved, kp[20:], 64) == pytest.approx(4 / 64)


def test_keypoint_shape_errors():
    with pytest.raises(ValueError, match=r"centres must have shape \(N, K, 2\)"):
        fit_keypoint_regressor(np.zeros((3, 2)), np.zeros((3, 1, 3)))
    with pytest.raises(ValueError, match="same N images"):
        fit_keypoint_regressor(np.zeros((3, 1, 2)), np.zeros((2, 1, 3)))


def test_format_table_names_the_protocol():
    text = format_table([dict(method="supervised U-Net", acc=0.979, iou=0.883, n_images=1000),
                         dict(method="layered GAN", iou=0.697, note="seed 1", ari=-0.05, train_s=0.5, fid=12.93)],
                        "CUB test, P2 centre crop, 128 px")
    lines = text.splitlines()
    assert "CUB test, P2 centre crop, 128 px" in lines[0]
    assert lines[2] == "| method | acc | iou | n_images | note | ari | train_s | fid |"
    assert lines[4] == "| supervised U-Net | 97.9 | 88.3 | 1000 |  |  |  |  |"
    assert lines[5] == "| layered GAN |  | 69.7 |  | seed 1 | -5.0 | 0.5 | 12.93 |"
