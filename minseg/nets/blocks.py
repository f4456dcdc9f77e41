"""Building blocks shared by the GANs of every method: up/down blocks, spectral norm, orthogonal init, 3-layer
MLPs, style-conditioned blocks (SPADE and its ResBlock on style maps, AdaIN on style vectors: GANSeg), EMA of a
generator and standing BatchNorm statistics, and the adversarial losses (hinge: ILSGAN eq. 6; non-saturating
logistic: GANSeg and the independence prior).
"""

import copy
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


def orthogonal_init(module):
    """Orthogonal weights, zero biases for every conv/linear layer (ILSGAN appendix A).

    A spectrally normalised layer's `weight` is recomputed from `parametrizations.weight.original` on every
    access, so initialising `weight` in place would change nothing: the original is what gets initialised."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            parametrized = parametrize.is_parametrized(m, "weight")
            nn.init.orthogonal_(m.parametrizations.weight.original if parametrized else m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def sn_conv(cin, cout, kernel=3, stride=1, padding=None):
    padding = kernel // 2 if padding is None else padding
    return spectral_norm(nn.Conv2d(cin, cout, kernel, stride, padding))


def sn_linear(cin, cout):
    return spectral_norm(nn.Linear(cin, cout))


class UpBlock(nn.Sequential):
    """Nearest 2x upsample -> conv3x3 -> BN -> ReLU (FineGAN's upsampling block with ReLU for GLU)."""

    def __init__(self, cin, cout):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                                  nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return F.relu(x + self.body(x))


class DownBlock(nn.Sequential):
    """Spectrally normalised conv4x4 stride 2 -> LeakyReLU(0.2): halves the resolution."""

    def __init__(self, cin, cout):
        super().__init__(sn_conv(cin, cout, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True))


def downsampling_trunk(in_ch, width, resolution, min_resolution=4, max_width=512):
    """DownBlocks from `resolution` to `min_resolution`; returns (trunk, out_channels)."""
    layers, ch, res = [], in_ch, resolution
    out = width
    while res > min_resolution:
        layers.append(DownBlock(ch, out))
        ch, out, res = out, min(out * 2, max_width), res // 2
    return nn.Sequential(*layers), ch


def mlp(cin, cout, hidden):
    """GANSeg's 3-layer MLPs (points, appearance, background appearance)."""
    return nn.Sequential(nn.Linear(cin, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, cout))


class SPADE(nn.Module):
    """BatchNorm without affine, then a per-pixel scale and shift predicted from a style map (GANSeg appendix B.2)."""

    def __init__(self, ch, style_ch, hidden):
        super().__init__()
        self.norm = nn.BatchNorm2d(ch, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(style_ch, hidden, 3, 1, 1), nn.LeakyReLU(0.2))
        self.gamma, self.beta = nn.Conv2d(hidden, ch, 3, 1, 1), nn.Conv2d(hidden, ch, 3, 1, 1)

    def forward(self, x, style):
        h = self.shared(style)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """(SPADE, LReLU, conv) twice, plus the input; SPADE + 1x1 conv on the shortcut when the width changes."""

    def __init__(self, cin, cout, style_ch, hidden):
        super().__init__()
        mid = min(cin, cout)
        self.spade1, self.conv1 = SPADE(cin, style_ch, hidden), nn.Conv2d(cin, mid, 3, 1, 1)
        self.spade2, self.conv2 = SPADE(mid, style_ch, hidden), nn.Conv2d(mid, cout, 3, 1, 1)
        self.learned_shortcut = cin != cout
        if self.learned_shortcut:
            self.spade_s, self.conv_s = SPADE(cin, style_ch, hidden), nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x, style):
        h = self.conv1(F.leaky_relu(self.spade1(x, style), 0.2))
        h = self.conv2(F.leaky_relu(self.spade2(h, style), 0.2))
        return h + (self.conv_s(self.spade_s(x, style)) if self.learned_shortcut else x)


class AdaINBlock(nn.Module):
    """BatchNorm without affine, per-channel scale and shift from a style vector, LReLU, conv (GANSeg appendix B.3)."""

    def __init__(self, cin, cout, style_dim, hidden):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin, affine=False)
        self.style = nn.Sequential(nn.Linear(style_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 2 * cin))
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1)

    def forward(self, x, style):
        gamma, beta = self.style(style)[:, :, None, None].chunk(2, 1)  # (B, cin, 1, 1) each
        return self.conv(F.leaky_relu(self.norm(x) * (1 + gamma) + beta, 0.2))


class EMA:
    """Exponential moving average of a network's parameters (buffers copied): the generator used for sampling.
    The decay ramps up as min(beta, (1 + n) / (10 + n)) over updates n, so short runs are not dominated by init."""

    def __init__(self, net, beta=0.999):
        self.beta, self.updates = beta, 0
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net):
        beta = min(self.beta, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for ema_p, p in zip(self.net.parameters(), net.parameters()):
            ema_p.lerp_(p.detach(), 1 - beta)
        for ema_b, b in zip(self.net.buffers(), net.buffers()):
            ema_b.copy_(b)


@torch.no_grad()
def standing_statistics(net, make_inputs, batches):
    """BigGAN's "standing statistics": replace every BatchNorm's running mean and variance by the average of
    `batches` batches' statistics of this very net (make_inputs() -> a tuple of forward arguments), then eval mode.

    An EMA generator copies its running statistics from the trained generator, whose weights differ from the
    average's, so in eval mode it normalises with statistics of another net; this measures its own. Restores each
    layer's momentum; a net without BatchNorm, or batches = 0, is left as it is.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    net.train()
    for _ in range(batches):
        net(*make_inputs())
    net.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@contextmanager
def frozen(*nets):
    """Inside the block the nets' parameters take no gradient: a generator's loss still flows through the
    discriminator to the generator, without the discriminator's weight gradients that nobody would use (the
    generator's gradients are the same). Each parameter's own requires_grad comes back afterwards."""
    params = [p for net in nets for p in net.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def d_hinge_loss(real_logits, fake_logits):
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_hinge_loss(fake_logits):
    return -fake_logits.mean()


def d_logistic_loss(real_logits, fake_logits):
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_logistic_loss(fake_logits):
    """Non-saturating generator loss."""
    return F.softplus(-fake_logits).mean()
