"""Scores for unsupervised segmentation, as the literature computes them (notes: "Evaluation on CUB").

Foreground masks (binary, or K-part label maps where foreground = class != 0):
  - per image: foreground IoU and pixel accuracy, then averaged over images. Convention: an image whose
    prediction and ground truth are both empty (no foreground pixel) has IoU 1.0 (a perfect answer).
  - data set: one 2x2 confusion matrix over all pixels -> ACC, fg IoU, bg IoU, mIoU = mean(fg IoU, bg IoU).
  The mask is never swapped with its inverse to pick the better score: a method must say which is foreground.
  - per GT part (where a set labels its object pixels by part, as shapes does): the share of the part's pixels
    predicted foreground (recall), to see which parts a segmenter leaves in the background.
Clustering (ILSGAN's NMI of the private code against class labels): NMI (arithmetic-mean normalisation) and
ARI (Hubert & Arabie), both from the contingency table.
Keypoints (GANSeg's CUB protocol, sec. 4): linear regression without bias from predicted part centres to GT
keypoints, fit by least squares on a train set; error = mean L2 distance over visible GT keypoints / image edge.
`predicted_parts` gives a part segmenter's soft part centres on real images, `keypoint_scores` the whole protocol.
`format_table` renders rows of scores as a markdown table headed by the evaluation protocol.
"""

import numpy as np
import torch


def _as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _foreground(labels, name):
    """(N, H, W) or (N, 1, H, W) labels of any integer/bool/float type -> bool (N, H*W), foreground = != 0."""
    labels = _as_numpy(labels)
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {labels.shape}")
    return labels.reshape(len(labels), -1) != 0


def per_image_scores(pred, gt):
    """Per-image foreground IoU and pixel accuracy, each (N,) float64. Both-empty images get IoU 1.0."""
    p, g = _foreground(pred, "pred"), _foreground(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same shape, got {p.shape} and {g.shape}")
    inter, union = (p & g).sum(1), (p | g).sum(1)
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    acc = (p == g).mean(1)
    return iou, acc


def confusion_matrix(pred, gt):
    """2x2 pixel counts, rows = GT (bg, fg), columns = prediction (bg, fg)."""
    p, g = _foreground(pred, "pred").ravel(), _foreground(gt, "gt").ravel()
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same number of pixels, got {p.size} and {g.size}")
    return np.bincount(2 * g.astype(np.int64) + p, minlength=4).reshape(2, 2)


def part_hits(pred, parts, num_parts):
    """Per GT part 1..num_parts: (pixels predicted foreground, pixels of the part), each (num_parts,) int64.

    pred: label maps (foreground = != 0); parts: (N, H, W) GT part labels, 0 = background. Their ratio is each part's
    recall: which parts of the objects a segmenter keeps and which it leaves in the background.
    """
    p, g = _foreground(pred, "pred").ravel(), _as_numpy(parts).reshape(-1).astype(np.int64)
    if p.shape != g.shape:
        raise ValueError(f"pred and parts must have the same number of pixels, got {p.size} and {g.size}")
    if g.size and (g.min() < 0 or g.max() > num_parts):
        raise ValueError(f"part labels must be in 0..{num_parts}, got {g.min()}..{g.max()}")
    totals = np.bincount(g, minlength=num_parts + 1)[1:]
    hits = np.bincount(g[p], minlength=num_parts + 1)[1:]
    return hits, totals


def scores_from_confusion(cm):
    """Data-set-level ACC, fg IoU, bg IoU and mIoU from a 2x2 confusion matrix (rows GT, columns prediction)."""
    cm = np.asarray(cm, dtype=np.float64)
    iou = [cm[c, c] / max(cm[c, :].sum() + cm[:, c].sum() - cm[c, c], 1.0) for c in (0, 1)]
    return dict(acc=np.trace(cm) / max(cm.sum(), 1.0), iou=iou[1], bg_iou=iou[0], miou=(iou[0] + iou[1]) / 2)


class SegmentationMeter:
    """Accumulate (pred, gt) batches of label maps; `result()` gives data-set and mean per-image scores."""

    def __init__(self, num_parts=0):
        self.cm = np.zeros((2, 2), dtype=np.int64)
        self.image_iou, self.image_acc = [], []  # one (B,) array per batch
        self.num_parts = num_parts
        self.part_hits, self.part_totals = np.zeros(num_parts, np.int64), np.zeros(num_parts, np.int64)

    def update(self, pred, gt, parts=None):
        """parts: (B, H, W) GT part labels, given with every batch when the meter counts parts (num_parts > 0)."""
        if (parts is None) != (self.num_parts == 0):
            raise ValueError(f"this meter counts {self.num_parts} parts: pass parts with every batch iff that is > 0")
        self.cm += confusion_matrix(pred, gt)
        iou, acc = per_image_scores(pred, gt)
        self.image_iou.append(iou)
        self.image_acc.append(acc)
        if parts is not None:
            hits, totals = part_hits(pred, parts, self.num_parts)
            self.part_hits += hits
            self.part_totals += totals

    def result(self):
        if not self.image_iou:
            raise ValueError("SegmentationMeter.result() before any update(): no images were scored")
        scores = scores_from_confusion(self.cm)
        iou, acc = np.concatenate(self.image_iou), np.concatenate(self.image_acc)
        out = dict(acc=float(scores["acc"]), iou=float(scores["iou"]), miou=float(scores["miou"]),
                   per_image_iou=float(iou.mean()), per_image_acc=float(acc.mean()), n_images=len(iou))
        if self.num_parts:  # share of each GT part's pixels predicted foreground; None for a part never seen
            out["part_recall"] = [float(h / t) if t else None for h, t in zip(self.part_hits, self.part_totals)]
        return out


def segmentation_scores(pred, gt):
    """One-shot `SegmentationMeter` over whole arrays (N, H, W)."""
    meter = SegmentationMeter()
    meter.update(pred, gt)
    return meter.result()


# ----------------------------------------------------------------------------------------------- clustering

def contingency_table(labels_a, labels_b):
    """(n_a_clusters, n_b_clusters) counts of items per pair of cluster ids (ids may be any integers)."""
    a, b = _as_numpy(labels_a).ravel(), _as_numpy(labels_b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"labels_a and labels_b must be non-empty and the same length, got {a.size} and {b.size}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), dtype=np.int64)
    np.add.at(table, (ia, ib), 1)
    return table


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_a, labels_b):
    """Normalised mutual information I(A; B) / ((H(A) + H(B)) / 2); 1.0 when both partitions are trivial."""
    table = contingency_table(labels_a, labels_b).astype(np.float64)
    n = table.sum()
    pa, pb = table.sum(1) / n, table.sum(0) / n
    nz = table > 0
    pab = table[nz] / n
    mutual = float((pab * np.log(pab / np.outer(pa, pb)[nz])).sum())
    h = (_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2
    return 1.0 if h == 0 else max(mutual, 0.0) / h


def _pairs(counts):
    """Number of unordered pairs within each count, summed."""
    return float((counts * (counts - 1) / 2).sum())


def ari(labels_a, labels_b):
    """Adjusted Rand index (Hubert & Arabie 1985): (index - expected) / (max - expected) over pair counts."""
    table = contingency_table(labels_a, labels_b).astype(np.float64)
    index, rows, cols = _pairs(table), _pairs(table.sum(1)), _pairs(table.sum(0))  # pairs together in A and B, A, B
    total = _pairs(np.array([table.sum()]))
    expected = rows * cols / total if total > 0 else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


# ------------------------------------------------------------------------------------------------ keypoints

def _check_keypoint_inputs(centres, keypoints):
    centres, keypoints = _as_numpy(centres).astype(np.float64), _as_numpy(keypoints).astype(np.float64)
    if centres.ndim != 3 or centres.shape[2] != 2:
        raise ValueError(f"centres must have shape (N, K, 2), got {centres.shape}")
    if keypoints.ndim != 3 or keypoints.shape[2] != 3:
        raise ValueError(f"keypoints must have shape (N, P, 3) as (x, y, visible), got {keypoints.shape}")
    if len(centres) != len(keypoints):
        raise ValueError(f"centres and keypoints must hold the same N images, got {len(centres)} and {len(keypoints)}")
    return centres, keypoints


def fit_keypoint_regressor(centres, keypoints):
    """Least-squares W (2K, 2P) with keypoints ~ centres.reshape(N, 2K) @ W, no bias term.

    Each output coordinate is fit on the images where that keypoint is visible (invisible ones carry no target).
    """
    centres, keypoints = _check_keypoint_inputs(centres, keypoints)
    N, K, _ = centres.shape
    P = keypoints.shape[1]
    x = centres.reshape(N, 2 * K)  # (N, 2K) as x1, y1, x2, y2, ...
    W = np.zeros((2 * K, 2 * P))
    for p in range(P):
        seen = keypoints[:, p, 2] > 0
        if seen.any():
            W[:, 2 * p:2 * p + 2] = np.linalg.lstsq(x[seen], keypoints[seen, p, :2], rcond=None)[0]
    return W


def apply_keypoint_regressor(W, centres):
    """Predicted keypoints (N, P, 2) from part centres (N, K, 2)."""
    centres = _as_numpy(centres).astype(np.float64)
    N, K, _ = centres.shape
    if W.shape[0] != 2 * K:
        raise ValueError(f"W was fit for {W.shape[0] // 2} part centres, got centres with K={K}")
    return (centres.reshape(N, 2 * K) @ W).reshape(N, -1, 2)


def keypoint_error(pred, keypoints, image_size):
    """Mean L2 distance over visible GT keypoints, divided by the image edge length `image_size` (px)."""
    pred, keypoints = _as_numpy(pred).astype(np.float64), _as_numpy(keypoints).astype(np.float64)
    if pred.shape[:2] != keypoints.shape[:2]:
        raise ValueError(f"pred (N, P, 2) and keypoints (N, P, 3) disagree: {pred.shape} vs {keypoints.shape}")
    seen = keypoints[..., 2] > 0
    if not seen.any():
        raise ValueError("keypoint_error: no visible ground-truth keypoint to score")
    dist = np.linalg.norm(pred - keypoints[..., :2], axis=-1)  # (N, P)
    return float(dist[seen].mean() / image_size)


def keypoint_regression_error(train_centres, train_keypoints, test_centres, test_keypoints, image_size):
    """Fit the regressor on the train set, return the normalised keypoint error on the test set."""
    W = fit_keypoint_regressor(train_centres, train_keypoints)
    _check_keypoint_inputs(test_centres, test_keypoints)
    return keypoint_error(apply_keypoint_regressor(W, test_centres), test_keypoints, image_size)


def box_layout_error(train_boxes, train_keypoints, test_boxes, test_keypoints, image_size):
    """The baseline for part keypoints: the mean layout of the train keypoints in box coordinates ((kp - corner) /
    box extent, each keypoint over the images where it is visible), placed into each test box. Returns the
    normalised error of `keypoint_error`. A part-based predictor should beat it: it knows only where the object is."""
    train_boxes, test_boxes = _as_numpy(train_boxes).astype(np.float64), _as_numpy(test_boxes).astype(np.float64)
    train_keypoints = _as_numpy(train_keypoints).astype(np.float64)
    corner, extent = train_boxes[:, None, :2], np.maximum(train_boxes[:, None, 2:] - train_boxes[:, None, :2], 1.0)
    relative = (train_keypoints[..., :2] - corner) / extent  # (N, P, 2)
    seen = train_keypoints[..., 2:] > 0                     # (N, P, 1)
    layout = (relative * seen).sum(0) / np.maximum(seen.sum(0), 1)  # (P, 2); 0 where never seen
    pred = test_boxes[:, None, :2] + layout[None] * (test_boxes[:, None, 2:] - test_boxes[:, None, :2])
    return keypoint_error(pred, test_keypoints, image_size)


@torch.no_grad()
def predicted_parts(segmenter, images, batch_size=64):
    """Part centres (N, K, 2): soft centre of mass in pixels (x, y) of classes 1..K of the segmenter's softmax on
    uint8 images; and the foreground (N, H, W): argmax not background."""
    device = next(segmenter.parameters()).device
    segmenter.eval()
    centres, foreground = [], []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1
        probs = segmenter(x).softmax(1)  # (b, K + 1, H, W)
        foreground.append((probs.argmax(1) != 0).cpu())
        probs = probs[:, 1:]
        H, W = probs.shape[-2:]
        mass = probs.sum((2, 3)).clamp_min(1e-6)  # (b, K)
        xs = (probs.sum(2) * (torch.arange(W, device=device) + 0.5)).sum(-1) / mass  # pixel i covers [i, i + 1)
        ys = (probs.sum(3) * (torch.arange(H, device=device) + 0.5)).sum(-1) / mass
        centres.append(torch.stack([xs, ys], -1).cpu())
    return torch.cat(centres), torch.cat(foreground)


def keypoint_scores(segmenter, train_set, test_set, fit_images=1000):
    """{kp_error, kp_box_baseline} (fractions of the image edge; GANSeg sec. 4.4), or {} without keypoints.

    kp_error: a linear regressor from the K part centres to the keypoints, fit on `fit_images` train images.
    kp_box_baseline: the mean train keypoint layout placed in the predicted foreground's box (no part information).
    """
    from minseg.data.base import mask_box
    if train_set.keypoints is None or test_set.keypoints is None:
        return {}
    n = min(fit_images, len(train_set))
    train_centres, train_fg = predicted_parts(segmenter, train_set.images[:n])
    test_centres, test_fg = predicted_parts(segmenter, test_set.images)
    size = test_set.size
    boxes = lambda fg: [mask_box(m) for m in fg.numpy()]  # (N, 4) x0, y0, x1, y1 of the predicted foreground
    return {"kp_error": keypoint_regression_error(train_centres, train_set.keypoints[:n], test_centres,
                                                  test_set.keypoints, size),
            "kp_box_baseline": box_layout_error(boxes(train_fg), train_set.keypoints[:n], boxes(test_fg),
                                                test_set.keypoints, size)}


# ---------------------------------------------------------------------------------------------------- tables

def _cell(value, column, percent):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (float, np.floating)):
        return str(value)
    is_duration = column.endswith(("_s", "seconds"))
    return f"{100 * value:.1f}" if percent and abs(value) <= 1 and not is_duration else f"{value:.4g}"


def format_table(rows, protocol, percent=True):
    """Markdown table of `rows` (list of dicts; columns in first-seen key order) headed by the protocol.

    With `percent`, floats in [-1, 1] (scores: ACC, IoU, NMI, ARI, keypoint error) are shown as percentages
    with one decimal, except in duration columns (names ending in "_s" or "seconds"); other floats as 4
    significant digits, everything else as str.
    """
    if not rows:
        raise ValueError("format_table needs at least one row")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"Protocol: {protocol}" + (" (scores in %)" if percent else ""), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, ""), c, percent) for c in columns) + " |")
    return "\n".join(lines)
