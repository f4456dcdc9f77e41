"""Batched augmentations on tensors: horizontal flip, random resized crop, colour jitter.

What the papers train with: real images get h-flip + random resized crop (ILSGAN, GANSeg: crop scale
0.9-1.0 in its code, ours defaults to 0.8-1.0), and segmenters trained on generated pairs get colour
augmentation (ILSGAN's alternate training). Every op works on a whole batch at once, draws one random
setting per sample from the given torch.Generator, and applies the same geometry to an image and to
its label maps (bilinear for the image, nearest for masks and part maps, so labels stay labels).
"""
import math

import torch
import torch.nn.functional as F


def _rand(n, generator, device):
    """n uniform numbers in [0, 1) drawn from `generator` (on its own device), moved to `device`."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=gen_device).to(device)


def _uniform(n, low, high, generator, device):
    return low + (high - low) * _rand(n, generator, device)


def _one_or_tuple(tensors):
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def hflip(*tensors, generator=None, p=0.5):
    """Mirror each sample left-right with probability p; the same samples flip in every tensor.

    tensors: batched tensors sharing the batch size, last dim = width: (B, C, H, W) or (B, H, W).
    Returns one tensor if one was given, else a tuple in the same order.
    """
    batch, device = tensors[0].shape[0], tensors[0].device
    flip = _rand(batch, generator, device) < p  # (B,)
    out = []
    for t in tensors:
        which = flip.view(batch, *([1] * (t.dim() - 1)))
        out.append(torch.where(which, t.flip(-1), t))
    return _one_or_tuple(out)


def random_resized_crop(image, *labels, generator=None, scale=(0.8, 1.0), ratio=(0.9, 1.1), size=None):
    """Crop a random window of each sample and resize it back to (size or the input) H x W.

    The window covers a fraction U(scale) of the area, with aspect (w/h) log-uniform in `ratio`,
    placed uniformly inside the image. image: (B, C, H, W) float, resampled bilinearly. labels:
    masks (B, 1, H, W) or part maps (B, H, W) of any dtype, resampled with nearest neighbour.
    Returns the cropped image (and labels, as a tuple) with the input dtypes.
    """
    batch, _, height, width = image.shape
    out_h, out_w = (height, width) if size is None else (size, size)
    device = image.device
    area = _uniform(batch, scale[0], scale[1], generator, device)
    log_ratio = _uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = log_ratio.exp()
    crop_w = (area * aspect).sqrt().clamp(max=1.0)  # fraction of the width, (B,)
    crop_h = (area / aspect).sqrt().clamp(max=1.0)
    left = _rand(batch, generator, device) * (1 - crop_w)
    top = _rand(batch, generator, device) * (1 - crop_h)
    # affine_grid maps output coords v in [-1, 1] to input coords theta @ (v, 1)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = crop_w
    theta[:, 0, 2] = 2 * left + crop_w - 1
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = 2 * top + crop_h - 1
    grid = F.affine_grid(theta, (batch, 1, out_h, out_w), align_corners=False)  # (B, h, w, 2)
    out = [F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).to(image.dtype)]
    for lab in labels:
        as_4d = lab.unsqueeze(1) if lab.dim() == 3 else lab
        sampled = F.grid_sample(as_4d.float(), grid, mode="nearest", padding_mode="border",
                                align_corners=False)
        sampled = sampled.round().to(lab.dtype)
        out.append(sampled.squeeze(1) if lab.dim() == 3 else sampled)
    return _one_or_tuple(out)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])


def colour_jitter(image, generator=None, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05):
    """Random brightness, contrast, saturation and hue per sample, for images in [-1, 1].

    image: (B, 3, H, W) float in [-1, 1]. Factors are U(1 - a, 1 + a) for brightness (scale),
    contrast (towards the image's mean grey) and saturation (towards each pixel's grey); hue turns
    the chroma plane of YIQ by U(-hue, hue) of a full turn. Applied in that order; result clamped.
    """
    batch, device = image.shape[0], image.device
    x = (image + 1) / 2  # (B, 3, H, W) in [0, 1]
    x = x * _uniform(batch, 1 - brightness, 1 + brightness, generator, device).view(batch, 1, 1, 1)
    weights = _RGB_TO_YIQ[0].to(device).view(1, 3, 1, 1)
    grey = (x * weights).sum(1, keepdim=True)  # (B, 1, H, W)
    mean_grey = grey.mean(dim=(2, 3), keepdim=True)
    x = mean_grey + (x - mean_grey) * _uniform(batch, 1 - contrast, 1 + contrast, generator,
                                               device).view(batch, 1, 1, 1)
    grey = (x * weights).sum(1, keepdim=True)
    x = grey + (x - grey) * _uniform(batch, 1 - saturation, 1 + saturation, generator,
                                     device).view(batch, 1, 1, 1)
    angle = _uniform(batch, -hue, hue, generator, device) * 2 * math.pi  # (B,)
    to_yiq = _RGB_TO_YIQ.to(device)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    cos, sin = angle.cos().view(batch, 1, 1), angle.sin().view(batch, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    x = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq)
    return (x.clamp(0, 1) * 2 - 1).to(image.dtype)
