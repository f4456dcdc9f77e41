"""The fused ops every method shares, each with a pure-PyTorch reference and an `impl` switch.

composite(layers, alphas, background, theta=None, impl="auto") -> (image, warped_alphas)      op A
perturbation(batch, size, log2_scale, rotation_deg, shift_px, generator) -> theta (B, 1, 2, 3)
contrast_jitter(images, factor_range, generator) -> images: PerturbGAN's background contrast jitter
part_heatmaps(centers, sigmas, embeddings, size, margin=0, impl="auto") -> (heat, embedding_map)  op B
positional_encoding(points, weight, bias, size, margin=0, impl="auto") -> (B, 2F, H', W')      op B
backend(device="cpu") -> "cpp" | "cuda" | "reference": the path impl="auto" takes on that device.
"""

import torch

from minseg.ops._build import extension_status, load_extension
from minseg.ops.composite import composite, composite_reference, contrast_jitter, perturbation
from minseg.ops.heatmaps import (part_heatmaps, part_heatmaps_reference, pixel_grid, positional_encoding,
                                 positional_encoding_reference)

__all__ = ["composite", "composite_reference", "contrast_jitter", "perturbation", "part_heatmaps", "part_heatmaps_reference",
           "pixel_grid", "positional_encoding", "positional_encoding_reference", "backend", "extension_status",
           "load_extension"]


def backend(device="cpu"):
    """Name the live implementation for tensors on `device` (builds the extension if not yet tried)."""
    device = torch.device(device)
    if not load_extension():
        return "reference"
    if device.type == "cuda":
        return "cuda" if extension_status()["cuda"] else "reference"
    return "cpp"
