"""One picture of a homogeneous object cluster, for the independence prior's second application.

The independence-prior paper (notes/methods.md, App 2) learns the instances of a single image full of
copies of one kind of object (a crowd, a fruit heap, a pile of seeds) by cutting training patches
from that one image. No such photograph is at hand, so `make_cluster_image` draws one: a dense,
overlapping pile of textured blobs of one kind, with the visible (occlusion-resolved) mask of every
instance as ground truth. Dense as the paper's "DSF-HOC" pictures are: the dark, noisy ground shows
through on ~2 % of the picture. (Up to commit 81c7bf9 the piles were sparser, 74 % (seeds) and 86 %
(fruit) covered, and a layer could hold ground around its instance at no cost in realism.)

  kind "seeds": egg-shaped brown seeds (~26 x 14 px at 256), rim shading and a groove along the axis.
  kind "fruit": round fruit (~44 px across at 256) in reds to yellows, rim shading and a highlight.
"""
import math

import torch

KINDS = {
    # half-length, half-width (px at size 256), hue range, saturation range, value range, spacing
    "seeds": dict(axes=(13.0, 7.0), hue=(0.06, 0.10), sat=(0.45, 0.7), val=(0.35, 0.7), spacing=0.5),
    "fruit": dict(axes=(22.0, 22.0), hue=(0.0, 0.13), sat=(0.7, 0.9), val=(0.6, 0.95), spacing=0.75),
}


def _hsv_to_rgb(h, s, v):
    def channel(n):
        k = (n + 6 * h) % 6
        return v - v * s * min(max(min(k, 4 - k), 0.0), 1.0)
    return torch.tensor([channel(5), channel(3), channel(1)])


def make_cluster_image(size=256, seed=0, kind="seeds"):
    """Draw a cluster picture. Returns image (3, size, size) uint8 and instance_masks (M, size, size)
    bool: the visible pixels of each of the M instances (instances hidden entirely are left out),
    pairwise disjoint, in painting order (later instances lie on top)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    spec = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()
    px = size / 256  # instance sizes are given for a 256 px picture
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    ground = torch.tensor([0.16, 0.13, 0.11]).view(3, 1, 1)
    image = ground * (1 + 0.25 * torch.randn(1, size, size, generator=g)).clamp(0.3, 1.7)
    owner = torch.full((size, size), -1, dtype=torch.long)  # topmost instance per pixel

    # centres on a jittered hexagonal grid much tighter than one instance: dense and overlapping
    step = spec["spacing"] * 2 * max(spec["axes"]) * px
    centres = [(x + (row % 2) * step / 2 + u(-0.3, 0.3) * step, y + u(-0.3, 0.3) * step)
               for row, y in enumerate(torch.arange(-step / 2, size + step, step * math.sqrt(3) / 2).tolist())
               for x in torch.arange(-step / 2, size + step, step).tolist()]
    order = torch.randperm(len(centres), generator=g).tolist()
    for index, c in enumerate(order):
        cx, cy = centres[c]
        a, b = (spec["axes"][0] * px * u(0.85, 1.15), spec["axes"][1] * px * u(0.85, 1.15))
        angle = u(0, 2 * math.pi)
        # local frame of the instance, restricted to its bounding square
        x0, x1 = max(int(cx - a) - 2, 0), min(int(cx + a) + 3, size)
        y0, y1 = max(int(cy - a) - 2, 0), min(int(cy + a) + 3, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xs[y0:y1, x0:x1] - cx, ys[y0:y1, x0:x1] - cy
        qx = (math.cos(angle) * dx + math.sin(angle) * dy) / a  # (h, w) along the long axis
        qy = (-math.sin(angle) * dx + math.cos(angle) * dy) / b
        if kind == "seeds":
            qy = qy / (1 - 0.3 * qx).clamp(min=0.4)  # egg shape: narrower towards +x
        radius = torch.sqrt(qx ** 2 + qy ** 2)  # (h, w), 1 on the outline
        alpha = ((1 - radius) * min(a, b) + 0.5).clamp(0, 1)  # one-pixel antialiased edge
        colour = _hsv_to_rgb(u(*spec["hue"]), u(*spec["sat"]), u(*spec["val"])).view(3, 1, 1)
        shade = 1 - 0.35 * radius.clamp(max=1) ** 2  # darker towards the rim
        if kind == "seeds":
            shade = shade * (1 - 0.35 * torch.exp(-(qy / 0.12) ** 2))  # the groove
        else:
            shade = shade + 0.6 * torch.exp(-((qx + 0.35) ** 2 + (qy + 0.35) ** 2) / 0.04)  # highlight
        texture = 1 + 0.08 * torch.randn(y1 - y0, x1 - x0, generator=g)
        patch = image[:, y0:y1, x0:x1]
        image[:, y0:y1, x0:x1] = torch.lerp(patch, colour * shade * texture, alpha)
        owner[y0:y1, x0:x1][radius < 1] = index
    masks = torch.stack([owner == i for i in range(len(order))])  # (M, H, W)
    masks = masks[masks.flatten(1).any(1)]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), masks
