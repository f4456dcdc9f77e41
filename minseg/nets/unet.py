"""U-Net segmenter (Ronneberger et al. 2015), from scratch: the segmenter S of the layered GAN (ILSGAN sec. 3.3,
eq. 7-8), the foreground provider / distilled student of the independence prior (App. 1), and the supervised
upper bound every method is compared with.

Encoder: `depth` stride-2 downsamplings, each level two (conv3x3 -> BN -> ReLU); channels width * 2**level,
capped at `max_width` so the deep levels of a 128 px net stay cheap. Decoder: bilinear 2x upsample, concat the
skip of the same level, two conv blocks. A 1x1 conv gives `num_classes` logits at input resolution (1 = binary
foreground logit; K + 1 = background + K parts). Input images in [-1, 1]; H and W must be divisible by 2**depth.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_block(cin, cout):
    """Two (conv3x3 -> BatchNorm -> ReLU); the unit of every U-Net level."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    kind = "unet"

    def __init__(self, num_classes=1, width=32, depth=4, max_width=256, in_channels=3):
        super().__init__()
        if num_classes < 1 or width < 1 or depth < 1:
            raise ValueError(f"UNet needs num_classes, width, depth >= 1, got {num_classes}, {width}, {depth}")
        self.config = dict(num_classes=num_classes, width=width, depth=depth, max_width=max_width,
                           in_channels=in_channels)
        self.num_classes, self.depth = num_classes, depth
        widths = [min(width * 2 ** level, max_width) for level in range(depth + 1)]  # level 0 .. depth
        self.stem = conv_block(in_channels, widths[0])
        self.down = nn.ModuleList(conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(conv_block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        B, _, H, W = x.shape
        if H % 2 ** self.depth or W % 2 ** self.depth:
            raise ValueError(f"UNet of depth {self.depth} needs H and W divisible by {2 ** self.depth}, "
                             f"got {H}x{W}")
        skips = [self.stem(x)]  # (B, w0, H, W)
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))  # (B, w_l, H / 2**l, W / 2**l)
        h = skips.pop()  # bottleneck (B, w_depth, H / 2**depth, W / 2**depth)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], 1))
        return self.head(h)  # (B, num_classes, H, W) logits
