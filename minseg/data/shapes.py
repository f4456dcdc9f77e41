"""Built-in synthetic "shapes": four-part bird-like objects on procedural clutter, with full ground truth.

The embedded default data set (no files needed), a small stand-in for CUB: each object is a body
(ellipse), a head (disk + beak wedge), a tail (wedge) and a wing (ellipse) in a fixed canonical
arrangement; 10 categories each have their own part palette, proportions and wing/tail stripes, and
every instance jitters those, adds texture noise in its own frame and takes a random pose (scale,
rotation +-30 deg, position, h-flip). Backgrounds are independent: multi-octave smooth noise blending
two colours, a gradient towards a third, soft blobs and fine texture, with every colour drawn from
the same pool as the objects' palettes so that no global colour threshold separates object from
background (`difficulty` measures that). What does separate them: sharp edges, part layout, stripes.

Ground truth: fg mask, part labels (0 = bg, 1 body, 2 head, 3 tail, 4 wing), box, one keypoint per
part (its centre; the body's is its belly, which the wing never covers) and the category. Objects
cover ~20 % of the image on average (5th-95th percentile ~13-29 %), like a bird in a CUB crop.
Scenes are functions of continuous coordinates, rendered in batches on coordinate grids, so any
size draws the same scene and the "box" protocol re-renders the GT box at full resolution. Deterministic: scene i depends only on (seed, split, i).
"""
import hashlib
import math

import torch
import torch.nn.functional as F

from minseg.data.base import PROTOCOLS, crop_window

PART_NAMES = ("body", "head", "tail", "wing")
NUM_CATEGORIES = 10
SPLIT_SIZES = {"train": 10_000, "test": 1_000}
CHUNK = 500  # scenes drawn per generator, so that a prefix (limit) is the same as in the full split
_CATEGORY_SEED = 20_11  # the category table is fixed, not drawn per data set
# pose ranges: object-frame unit in half image widths, and the centre's shift from the middle
SCALE_LO, SCALE_HI, SHIFT = 0.95, 1.4, 0.35
_PAINT_ORDER = (3, 1, 4, 2)  # tail under body, wing over body, head on top


def _hsv_to_rgb(h, s, v):
    """(...,) hue, saturation, value in [0, 1] -> (..., 3) RGB."""
    def channel(n):
        k = (n + 6 * h) % 6
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return torch.stack([channel(5), channel(3), channel(1)], -1)


def category_table():
    """Per-category palettes (C, 4, 3) in part order and proportions (each (C,)), fixed for all splits."""
    g = torch.Generator().manual_seed(_CATEGORY_SEED)
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=g)
    c = NUM_CATEGORIES
    palette = _hsv_to_rgb(u(0, 1, c, 4), u(0.25, 0.9, c, 4), u(0.3, 0.95, c, 4))  # (C, 4, 3)
    return {"palette": palette, "body_aspect": u(0.6, 0.8, c), "head_radius": u(0.16, 0.22, c),
            "tail_length": u(0.22, 0.4, c), "tail_spread": u(0.25, 0.5, c),
            "wing_length": u(0.28, 0.4, c), "stripe_amp": u(0.0, 0.35, c),
            "stripe_freq": u(25.0, 60.0, c)}


def sample_scenes(n, generator):
    """Draw n scenes: a dict of per-scene parameter tensors, (n, ...) each."""
    g = generator
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=g)
    jitter = lambda x, rel: x * (1 + rel * torch.randn(x.shape, generator=g))
    cats = category_table()
    cat = torch.randint(NUM_CATEGORIES, (n,), generator=g)
    body_a = jitter(torch.full((n,), 0.45), 0.06)
    body_b = jitter(body_a * cats["body_aspect"][cat], 0.06)
    head_r = jitter(cats["head_radius"][cat], 0.08)
    neck = u(-0.25, 0.25, n)  # head position turns about the body's front
    head_c = torch.stack([0.75 * body_a + 0.3 * head_r * neck.sin(),
                          -(0.5 * body_b + 0.4 * head_r) * (1 + 0.3 * neck)], 1)
    tail_l = jitter(cats["tail_length"][cat], 0.1) + 0.3 * body_a
    tail_angle = math.pi + u(-0.15, 0.35, n)  # pointing back, mostly a little raised (y is down)
    wing_a = jitter(cats["wing_length"][cat], 0.08)
    palette = (cats["palette"][cat] + 0.06 * torch.randn(n, 4, 3, generator=g)).clamp(0.02, 0.98)
    pool = cats["palette"].reshape(-1, 3)  # every part colour of every category
    bg_colours = pool[torch.randint(len(pool), (n, 6), generator=g)]
    bg_colours = (bg_colours + 0.08 * torch.randn(n, 6, 3, generator=g)).clamp(0.02, 0.98)
    return {
        "category": cat,
        # pose: object frame -> normalised image coords [-1, 1]
        "scale": u(SCALE_LO, SCALE_HI, n), "angle": u(-math.pi / 6, math.pi / 6, n),
        "centre": u(-SHIFT, SHIFT, n, 2), "flip": torch.randint(2, (n,), generator=g) * 2.0 - 1,
        # parts, in the object frame (x forward, y down, body centred at 0)
        "body_axes": torch.stack([body_a, body_b], 1), "head_centre": head_c, "head_radius": head_r,
        "beak_length": 1.35 * head_r, "beak_angle": u(-0.25, 0.25, n),
        "tail_apex": torch.stack([-0.7 * body_a, 0.1 * body_b], 1), "tail_angle": tail_angle,
        "tail_length": tail_l, "tail_spread": jitter(cats["tail_spread"][cat], 0.1),
        "wing_centre": torch.stack([-0.15 * body_a, -0.45 * body_b], 1),
        "wing_axes": torch.stack([wing_a, 0.38 * body_b], 1), "wing_angle": u(0.0, 0.45, n),
        "palette": palette, "texture": torch.randn(n, 1, 6, 6, generator=g),
        "stripe_amp": cats["stripe_amp"][cat], "stripe_freq": cats["stripe_freq"][cat],
        # background
        "bg_colours": bg_colours,  # (n, 6, 3): two blended, one gradient, three blobs
        "bg_octaves": [torch.randn(n, 1, r, r, generator=g) for r in (3, 6, 12)],
        "bg_fine": torch.randn(n, 1, 24, 24, generator=g), "bg_gain": u(1.5, 5.0, n),
        "grad_angle": u(0, 2 * math.pi, n), "grad_strength": u(0, 0.6, n),
        "blob_centres": u(-1, 1, n, 3, 2), "blob_axes": u(0.15, 0.5, n, 3, 2),
        "blob_angles": u(0, math.pi, n, 3), "blob_opacity": u(0.3, 0.9, n, 3),
    }


def _rotate(x, y, angle):
    """Rotate coordinate grids (n, S, S) by per-scene angles (n,)."""
    c, s = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    return c * x - s * y, s * x + c * y


def _ellipse_sdf(x, y, centre, axes, angle):
    """Approximate signed distance to ellipses (negative inside); (n, S, S) grids, (n, 2) params."""
    qx, qy = _rotate(x - centre[:, 0].view(-1, 1, 1), y - centre[:, 1].view(-1, 1, 1), -angle)
    a, b = axes[:, 0].view(-1, 1, 1), axes[:, 1].view(-1, 1, 1)
    return (torch.sqrt((qx / a) ** 2 + (qy / b) ** 2) - 1) * torch.minimum(a, b)


def _wedge_sdf(x, y, apex, angle, half_angle, length):
    """Signed distance to circular sectors with a given apex, direction, half-angle and radius."""
    qx, qy = _rotate(x - apex[:, 0].view(-1, 1, 1), y - apex[:, 1].view(-1, 1, 1), -angle)
    half = half_angle.view(-1, 1, 1)
    sides = qy.abs() * half.cos() - qx * half.sin()
    return torch.maximum(sides, torch.sqrt(qx ** 2 + qy ** 2) - length.view(-1, 1, 1))


def _sample(grid, x, y):
    """Smoothly interpolate per-scene noise grids (n, 1, r, r) at coordinates (n, S, S) -> (n, 1, S, S)."""
    return F.grid_sample(grid, torch.stack([x, y], -1), mode="bicubic", padding_mode="reflection",
                         align_corners=False)


def _background(sc, ux, uy):
    """(n, 3, S, S) background in [0, 1] at normalised image coordinates."""
    cols = sc["bg_colours"].view(-1, 6, 3, 1, 1)
    field = sum(amp * _sample(oct_, ux, uy) for amp, oct_ in zip((1.0, 0.6, 0.35), sc["bg_octaves"]))
    mix = torch.sigmoid(sc["bg_gain"].view(-1, 1, 1, 1) * field)
    img = torch.lerp(cols[:, 0], cols[:, 1], mix)  # (n, 3, S, S)
    gx, gy = sc["grad_angle"].cos().view(-1, 1, 1), sc["grad_angle"].sin().view(-1, 1, 1)
    ramp = ((ux * gx + uy * gy + 1) / 2).clamp(0, 1).unsqueeze(1) * sc["grad_strength"].view(-1, 1, 1, 1)
    img = torch.lerp(img, cols[:, 2], ramp)
    for k in range(3):
        qx, qy = _rotate(ux - sc["blob_centres"][:, k, 0].view(-1, 1, 1),
                         uy - sc["blob_centres"][:, k, 1].view(-1, 1, 1), -sc["blob_angles"][:, k])
        axes = sc["blob_axes"][:, k].view(-1, 2, 1, 1)
        r2 = (qx / axes[:, 0]) ** 2 + (qy / axes[:, 1]) ** 2
        weight = (sc["blob_opacity"][:, k].view(-1, 1, 1) * torch.exp(-2 * r2)).unsqueeze(1)
        img = torch.lerp(img, cols[:, 3 + k], weight)
    return img * (1 + 0.15 * _sample(sc["bg_fine"], ux, uy))


def _part_sdfs(sc, x, y):
    """Signed distances (n, S, S) of the four parts, keyed by part label, in the object frame."""
    head = torch.minimum(
        _ellipse_sdf(x, y, sc["head_centre"], sc["head_radius"].unsqueeze(1).expand(-1, 2),
                     torch.zeros_like(sc["head_radius"])),
        _wedge_sdf(x, y, sc["head_centre"], sc["beak_angle"], torch.full_like(sc["beak_angle"], 0.28),
                   sc["beak_length"]))
    return {1: _ellipse_sdf(x, y, torch.zeros_like(sc["head_centre"]), sc["body_axes"],
                            torch.zeros_like(sc["angle"])),
            2: head,
            3: _wedge_sdf(x, y, sc["tail_apex"], sc["tail_angle"], sc["tail_spread"], sc["tail_length"]),
            4: _ellipse_sdf(x, y, sc["wing_centre"], sc["wing_axes"], sc["wing_angle"])}


def part_centres(sc):
    """(n, 4, 2) one keypoint per part in the object frame, label order body, head, tail, wing: the
    centres of head, tail and wing, and for the body (whose centre the wing may cover) its belly,
    halfway between the centre and the lower edge."""
    tail_dir = torch.stack([sc["tail_angle"].cos(), sc["tail_angle"].sin()], 1)
    tail = sc["tail_apex"] + tail_dir * (sc["tail_length"] / 2).unsqueeze(1)
    belly = torch.stack([torch.zeros_like(sc["scale"]), 0.5 * sc["body_axes"][:, 1]], 1)
    return torch.stack([belly, sc["head_centre"], tail, sc["wing_centre"]], 1)


def _object_to_pixels(sc, points, size):
    """Map (n, P, 2) object-frame points to pixels of the full size x size image."""
    px, py = points[..., 0] * sc["flip"].view(-1, 1), points[..., 1]
    c, s = sc["angle"].cos().view(-1, 1), sc["angle"].sin().view(-1, 1)
    scale = sc["scale"].view(-1, 1)
    ux = sc["centre"][:, 0:1] + scale * (c * px - s * py)
    uy = sc["centre"][:, 1:2] + scale * (s * px + c * py)
    return torch.stack([(ux + 1) * size / 2, (uy + 1) * size / 2], -1)


def render(sc, size, window=None):
    """Draw scenes through windows (n, 4) x0, y0, x1, y1 in pixels of the full size x size image
    (default: the whole image) resized to size x size. Returns images (n, 3, S, S) in [0, 1] and
    part labels (n, S, S) long."""
    n = len(sc["category"])
    if window is None:
        window = torch.tensor([0.0, 0.0, size, size]).expand(n, 4)
    frac = (torch.arange(size) + 0.5) / size  # (S,) pixel centres
    xs = window[:, 0:1] + frac * (window[:, 2:3] - window[:, 0:1])  # (n, S) full-image pixels
    ys = window[:, 1:2] + frac * (window[:, 3:4] - window[:, 1:2])
    ux = (2 * xs / size - 1)[:, None, :].expand(n, size, size)  # (n, S, S) normalised coords
    uy = (2 * ys / size - 1)[:, :, None].expand(n, size, size)
    img = _background(sc, ux, uy)  # (n, 3, S, S)
    # object frame: undo translation, rotation, scale, then the flip
    ox, oy = _rotate(ux - sc["centre"][:, 0].view(-1, 1, 1), uy - sc["centre"][:, 1].view(-1, 1, 1),
                     -sc["angle"])
    ox = ox / sc["scale"].view(-1, 1, 1) * sc["flip"].view(-1, 1, 1)
    oy = oy / sc["scale"].view(-1, 1, 1)
    span = ((window[:, 2] - window[:, 0]) * (window[:, 3] - window[:, 1])).sqrt()  # (n,) pixels
    pixel = (2 * span / size / size / sc["scale"]).view(-1, 1, 1)  # output pixel in object units
    texture = 1 + 0.18 * _sample(sc["texture"], ox / 1.2, oy / 1.2)  # (n, 1, S, S)
    stripes = 1 + sc["stripe_amp"].view(-1, 1, 1, 1) * torch.sin(
        sc["stripe_freq"].view(-1, 1, 1) * ox).unsqueeze(1)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    sdfs = _part_sdfs(sc, ox, oy)
    for part in _PAINT_ORDER:
        alpha = (0.5 - sdfs[part] / pixel).clamp(0, 1).unsqueeze(1)  # one-pixel antialiased edge
        colour = sc["palette"][:, part - 1].view(-1, 3, 1, 1) * texture
        if part in (3, 4):
            colour = colour * stripes
        img = torch.lerp(img, colour, alpha)
        labels[sdfs[part] < 0] = part
    return img.clamp(0, 1), labels


def boxes_from_labels(labels):
    """Tight boxes (n, 4) x0, y0, x1, y1 of labels > 0; the whole image where there is none."""
    n, size, _ = labels.shape
    fg = labels > 0
    cols, rows = fg.any(1), fg.any(2)  # (n, S)
    first = lambda m: m.float().argmax(1)
    last = lambda m: size - m.flip(1).float().argmax(1)
    boxes = torch.stack([first(cols), first(rows), last(cols), last(rows)], 1).float()
    empty = ~cols.any(1)
    boxes[empty] = torch.tensor([0.0, 0.0, size, size])
    return boxes


def _chunk_generator(seed, split, chunk):
    digest = hashlib.sha256(f"minseg-shapes/{split}/{seed}/{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def make_shapes(split="train", size=64, seed=0, limit=None, protocol=None):
    """Generate a split as a dict of SegmentationSet fields.

    protocol: None, "P2" or "P5" (the whole square image), "P4" or "box" (that window around the
    GT box, re-rendered at full resolution, so nothing is blurred by resampling).
    """
    if split not in SPLIT_SIZES:
        raise ValueError(f"shapes split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    if protocol not in (None, "P2", "P4", "P5", "box"):
        raise ValueError(f"shapes protocol must be None, 'P2', 'P4', 'P5' or 'box', got {protocol!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    n = SPLIT_SIZES[split] if limit is None else int(limit)
    per_render = max(1, 2 ** 21 // (size * size))  # keeps temporaries to a few hundred MB
    images, parts, boxes, keypoints, labels = [], [], [], [], []
    for chunk in range(math.ceil(n / CHUNK)):
        scenes = sample_scenes(CHUNK, _chunk_generator(seed, split, chunk))
        count = min(CHUNK, n - chunk * CHUNK)
        for start in range(0, count, per_render):
            stop = min(start + per_render, count)
            sc = {k: ([o[start:stop] for o in v] if isinstance(v, list) else v[start:stop])
                  for k, v in scenes.items()}
            img, lab = render(sc, size)
            box = boxes_from_labels(lab)  # (b, 4)
            kp = _object_to_pixels(sc, part_centres(sc), size)  # (b, 4, 2)
            if protocol in ("P4", "box"):
                window = torch.tensor([crop_window(protocol, size, size, b) for b in box.tolist()])
                img, lab = render(sc, size, window=window)
                origin, extent = window[:, None, :2], window[:, None, 2:] - window[:, None, :2]
                kp = (kp - origin) * size / extent
                box = ((box.view(-1, 2, 2) - origin) * size / extent).clamp(0, size).view(-1, 4)
            visible = ((kp >= 0) & (kp < size)).all(-1, keepdim=True).float()
            images.append((img * 255).round().to(torch.uint8))
            parts.append(lab.to(torch.uint8))
            boxes.append(box.float())
            keypoints.append(torch.cat([kp, visible], -1))
            labels.append(sc["category"])
    cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)
    parts_t = cat(parts, (0, size, size)).to(torch.uint8)
    crop = PROTOCOLS[protocol] if protocol in ("P4", "box") else "whole image"
    return {"images": cat(images, (0, 3, size, size)).to(torch.uint8), "parts": parts_t,
            "masks": (parts_t > 0).to(torch.uint8).unsqueeze(1), "num_parts": len(PART_NAMES),
            "boxes": cat(boxes, (0, 4)), "keypoints": cat(keypoints, (0, 4, 3)),
            "labels": cat(labels, (0,)).long(), "names": [f"shapes-{split}-{i:05d}" for i in range(n)],
            "keypoint_names": list(PART_NAMES), "part_names": list(PART_NAMES),
            "protocol": f"shapes {split} split ({n:,} images, seed {seed}), {crop}, {size} px"}


def _dataset_iou(pred, gt):
    """Foreground IoU over a whole set (one confusion matrix), pred/gt bool of equal shape."""
    return float((pred & gt).sum()) / max(float((pred | gt).sum()), 1.0)


def best_threshold_iou(images, masks):
    """Best fg IoU of one global threshold (either direction) on R, G, B or luminance.

    images (N, 3, S, S) uint8, masks (N, 1, S, S). Returns (iou, description of the best rule)."""
    fg = masks[:, 0].bool().reshape(-1)
    lum = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).round().to(torch.long)
    best = (0.0, "")
    for name, values in (("R", images[:, 0]), ("G", images[:, 1]), ("B", images[:, 2]), ("luminance", lum)):
        v = values.reshape(-1).long()
        hist_all = torch.bincount(v, minlength=256).double()
        hist_fg = torch.bincount(v[fg], minlength=256).double()
        total_fg = hist_fg.sum()
        # predict fg where value >= t (t = 0..255): counts are suffix sums
        pred_ge = hist_all.flip(0).cumsum(0).flip(0)
        inter_ge = hist_fg.flip(0).cumsum(0).flip(0)
        # predict fg where value < t: prefix sums shifted by one
        pred_lt = torch.cat([torch.zeros(1, dtype=torch.double), hist_all.cumsum(0)[:-1]])
        inter_lt = torch.cat([torch.zeros(1, dtype=torch.double), hist_fg.cumsum(0)[:-1]])
        for rule, pred, inter in ((">=", pred_ge, inter_ge), ("<", pred_lt, inter_lt)):
            iou = inter / (total_fg + pred - inter).clamp(min=1)
            t = int(iou.argmax())
            if float(iou[t]) > best[0]:
                best = (float(iou[t]), f"{name} {rule} {t}")
    return best


def difficulty(masks, images):
    """Trivial baselines on a set (dataset-level fg IoU): all foreground, a centred disk covering
    the mean foreground fraction, and the best global colour threshold."""
    n, _, size, _ = masks.shape
    gt = masks[:, 0].bool()
    coverage = gt.float().mean().item()
    centre = (torch.arange(size) + 0.5 - size / 2)
    radius = size * math.sqrt(coverage / math.pi)
    disk = (centre.view(-1, 1) ** 2 + centre.view(1, -1) ** 2) <= radius ** 2  # (S, S)
    thr_iou, thr_rule = best_threshold_iou(images, masks)
    return {"coverage": coverage, "all_foreground_iou": _dataset_iou(torch.ones_like(gt), gt),
            "centre_prior_iou": _dataset_iou(disk.expand_as(gt), gt),
            "best_threshold_iou": thr_iou, "best_threshold_rule": thr_rule}
