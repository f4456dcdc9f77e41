"""A light DeepLabV3-style segmenter (Chen et al. 2017), from scratch: GANSeg's final segmenter (sec. 4, trained
on (image, argmax mask) pairs with K + 1 classes, CE + Dice).

Backbone: a small residual net that reaches `output_stride` (4 or 8) with strided basic blocks, then keeps that
resolution with atrous (dilated) blocks instead of striding further. ASPP: parallel 1x1 conv, 3x3 atrous convs
at `rates`, and image-level pooling, concatenated and projected. Head: 3x3 conv -> 1x1 conv to `num_classes`
logits, bilinearly upsampled to the input size. No pretrained weights exist here, so the net is small enough to
train from scratch on CPU at 64 px. The defaults (width 16, output stride 4) keep a 16x16 feature grid at 64 px,
the grid DeepLabV3's usual output stride 8 gives at 128 px; a coarser grid visibly rounds off small parts.
Input images in [-1, 1].
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn_relu(cin, cout, kernel=3, stride=1, dilation=1):
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs (the first strided or dilated) plus a (projected) shortcut."""

    def __init__(self, cin, cout, stride=1, dilation=1):
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, 3x3 at each rate, global pooling; concat -> 1x1 projection."""

    def __init__(self, cin, cout, rates):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, 1, r) for r in rates])
        self.pool = conv_bn_relu(cin, cout, 1)
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x):  # (B, cin, h, w)
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))  # (B, cout, 1, 1)
        outs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, 1))  # (B, cout, h, w)


class DeepLab(nn.Module):
    kind = "deeplab"

    def __init__(self, num_classes=1, width=16, output_stride=4, rates=(2, 4, 6), in_channels=3):
        super().__init__()
        if output_stride not in (4, 8):
            raise ValueError(f"DeepLab output_stride must be 4 or 8, got {output_stride}")
        if num_classes < 1 or width < 1:
            raise ValueError(f"DeepLab needs num_classes, width >= 1, got {num_classes}, {width}")
        self.config = dict(num_classes=num_classes, width=width, output_stride=output_stride, rates=list(rates),
                           in_channels=in_channels)
        self.num_classes = num_classes
        w = width
        self.stem = nn.Sequential(conv_bn_relu(in_channels, w, 3, 2), conv_bn_relu(w, w))  # stride 2
        self.layer1 = BasicBlock(w, 2 * w, stride=2)  # stride 4
        self.layer2 = BasicBlock(2 * w, 4 * w, stride=2 if output_stride == 8 else 1)  # stride output_stride
        self.atrous = nn.Sequential(BasicBlock(4 * w, 4 * w, dilation=2), BasicBlock(4 * w, 4 * w, dilation=4))
        self.aspp = ASPP(4 * w, 4 * w, rates)
        self.head = nn.Sequential(conv_bn_relu(4 * w, 4 * w), nn.Conv2d(4 * w, num_classes, 1))

    def forward(self, x):  # (B, 3, H, W) in [-1, 1]
        h = self.atrous(self.layer2(self.layer1(self.stem(x))))  # (B, 4w, H / os, W / os)
        logits = self.head(self.aspp(h))  # (B, num_classes, H / os, W / os)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, H, W)
