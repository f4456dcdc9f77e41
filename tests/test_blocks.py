"""Shared GAN blocks (minseg/nets/blocks.py): orthogonal init reaches spectrally normalised layers."""
import torch
import torch.nn as nn

from minseg.methods import ilsgan
from minseg.nets.blocks import orthogonal_init, sn_conv, sn_linear


def singular_values(layer):
    return torch.linalg.svdvals(layer.weight.detach().flatten(1))


def test_orthogonal_init_reaches_spectral_norm_layers():
    torch.manual_seed(0)
    net = nn.Sequential(sn_conv(8, 16, 4, 2, 1), sn_conv(16, 16, 3), sn_linear(16, 4), nn.Conv2d(4, 8, 3))
    default = [singular_values(m) for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert all(s.min() < 0.9 for s in default[:3])  # torch's default init: spread singular values under SN
    orthogonal_init(net)
    for m in net:
        s = singular_values(m)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-3), s  # orthogonal, and SN's sigma is then 1
        assert (m.bias == 0).all()


def test_layered_gan_discriminator_starts_orthogonal():
    torch.manual_seed(0)
    method = ilsgan.ILSGAN(ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4))
    convs = [m for m in method.D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs
    for m in convs:
        s = singular_values(m)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-3), (m, s)
