"""Segmenters built from scratch: `UNet` (ILSGAN, independence prior, supervised baseline) and a light
`DeepLab` V3 (GANSeg). Both map images in [-1, 1] (B, 3, H, W) to logits (B, num_classes, H, W) at input
resolution: num_classes = 1 is a binary foreground logit, K + 1 is background + K parts.

build_net(kind, **kwargs) -> nn.Module, with kind in NETS ("unet" | "deeplab").
"""

from minseg.nets.deeplab import DeepLab
from minseg.nets.unet import UNet

NETS = {"unet": UNet, "deeplab": DeepLab}


def build_net(kind, **kwargs):
    """The segmenter named `kind`, built with constructor kwargs (e.g. num_classes=1, width=32)."""
    if kind not in NETS:
        raise ValueError(f"unknown segmenter kind {kind!r}; choose one of {sorted(NETS)}")
    return NETS[kind](**kwargs)
