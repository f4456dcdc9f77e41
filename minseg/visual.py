"""Pictures: sample grids (rows of images / masks / part maps), mask overlays, part tints and point dots, a part
segmenter's predictions on real test images, optional matplotlib plots (GAN annotation's few-label curve)."""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PART_COLOURS = torch.tensor([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                             [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                             [0, 128, 128], [220, 190, 255], [170, 110, 40]], dtype=torch.float32) / 127.5 - 1


def to_rgb(x):
    """Map a batch to (B, 3, H, W) in [-1, 1]: images pass, masks (B, 1, H, W) in [0, 1] become grey,
    label maps (B, H, W) integer become part colours."""
    if x.dim() == 3:  # (B, H, W) labels
        return PART_COLOURS.to(x.device)[x.long() % len(PART_COLOURS)].permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        return (x * 2 - 1).expand(-1, 3, -1, -1)
    return x[:, :3]


def overlay(images, masks, colour=(1.0, -1.0, -1.0), strength=0.5):
    """Tint the foreground of images (B, 3, H, W) in [-1, 1] by masks (B, 1, H, W) in [0, 1]."""
    tint = torch.tensor(colour, device=images.device).view(1, 3, 1, 1)
    return images + strength * masks * (tint - images)


def draw_points(images, points, num_parts, radius=1):
    """Copy of images (B, 3, H, W) with each point (B, P, 2), normalised, part-major, as a dot in its part's colour."""
    out = images.detach().clone()
    B, P, _ = points.shape
    H, W = images.shape[-2:]
    colours = PART_COLOURS.to(images.device)[(1 + torch.arange(P, device=images.device) // (P // num_parts))
                                             % len(PART_COLOURS)]  # (P, 3)
    cols = ((points[..., 0] + 1) * W / 2 - 0.5).round().long()  # (B, P) pixel indices
    rows = ((points[..., 1] + 1) * H / 2 - 0.5).round().long()
    batch = torch.arange(B, device=images.device)[:, None].expand(B, P)
    canvas = out.permute(0, 2, 3, 1)  # (B, H, W, 3) view
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            canvas[batch, (rows + dy).clamp(0, H - 1), (cols + dx).clamp(0, W - 1)] = colours.expand(B, P, 3)
    return out


def tint_parts(images, labels, strength=0.5):
    """Images (B, 3, H, W) with each part label (B, H, W) > 0 tinted in its colour."""
    return images + strength * (labels > 0)[:, None] * (to_rgb(labels) - images)


def save_grid(rows, path, columns=None):
    """Save rows (a list of batches, each shown as one row of tiles; see to_rgb) as a PNG; returns the path."""
    rows = [to_rgb(r.detach().float().cpu()) for r in rows]
    n = min(len(r) for r in rows) if columns is None else columns
    tiles = torch.stack([r[:n] for r in rows])  # (R, n, 3, H, W)
    R, _, _, H, W = tiles.shape
    pad = 2
    canvas = torch.ones(3, R * (H + pad) + pad, n * (W + pad) + pad)
    for i in range(R):
        for j in range(n):
            canvas[:, pad + i * (H + pad):pad + i * (H + pad) + H, pad + j * (W + pad):pad + j * (W + pad) + W] = tiles[i, j]
    array = ((canvas.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # written whole, then renamed: a killed run tears none
    try:
        Image.fromarray(array).save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@torch.no_grad()
def show_test_parts(segmenter, test_set, path, num_parts, n=12):
    """Real test images | predicted parts tinted, centres dotted | predicted part map | GT part map (if any)."""
    from minseg.metrics import predicted_parts
    from minseg.segmenter import predict
    batch = test_set.batch(list(range(min(n, len(test_set)))))
    images, pred = batch["image"], predict(segmenter, test_set.images[:n])  # (n, 3, S, S), (n, S, S)
    centres = predicted_parts(segmenter, test_set.images[:n])[0] * 2 / test_set.size - 1  # normalised
    rows = [images, draw_points(tint_parts(images, pred), centres, num_parts), pred]
    if "parts" in batch:
        rows.append(batch["parts"])
    save_grid(rows, path)


def plot_curves(series, path, xlabel, ylabel, title=""):
    """Line plot of {name: (xs, ys, yerr or None)} to a PNG with matplotlib; returns None when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("minseg: matplotlib is not installed (pip install minseg[plot]); skipping the plot", path)
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (xs, ys, err) in series.items():
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_curve(curve_json):
    """curve.png next to a curve.json (`annotate curve`): test IoU against N for both routes, mean and std over
    seeds (matplotlib)."""
    saved = json.loads(Path(curve_json).read_text())
    runs, ns = saved["runs"], saved["ns"]
    ious = lambda route, n: [r["iou"] for r in runs if (r["route"], r["n"]) == (route, n)]
    series = {name: (ns, [float(np.mean(ious(route, n))) for n in ns], [float(np.std(ious(route, n))) for n in ns])
              for name, route in (("decoder on N generated", "decoder"), ("N real labels", "real"))}
    ceiling = [r["iou"] for r in runs if r["route"] == "oracle-labelled"]
    if ceiling:  # flat: the decoder route's ceiling does not depend on N
        series["oracle labels every sample"] = (ns, [float(np.mean(ceiling))] * len(ns), None)
    return plot_curves(series, Path(curve_json).with_name("curve.png"), "annotated images N", "test foreground IoU",
                       saved.get("data", Path(curve_json).parent.name))


def as_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> numpy (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)
