"""Shared GAN blocks (minseg/nets/blocks.py): orthogonal init reaches spectrally normalised layers; freezing a
discriminator for the generator's step changes no parameter of any method."""
import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minseg.methods import ilsgan
from minseg.nets.blocks import orthogonal_init, sn_conv, sn_linear, standing_statistics


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


def _small_methods():
    """Factories of one small instance per method whose step runs a generator loss through a discriminator."""
    from minseg.methods.ganseg import GANSeg, GANSegConfig, PRESETS
    from minseg.methods.hoc import ClusterConfig, ClusterGAN
    from minseg.methods.independence import ForegroundCarver, IndependenceConfig, PatchPool
    from minseg.methods.plain_gan import PlainConfig, PlainGAN
    noise = torch.Generator().manual_seed(3)
    pool = PatchPool(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=noise))
    return {
        "ilsgan": lambda: ilsgan.ILSGAN(ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4)),
        "plain_gan": lambda: PlainGAN(PlainConfig(size=32, z_dim=8, gen_width=4, disc_width=4)),
        "independence": lambda: ForegroundCarver(IndependenceConfig(size=32, seg_width=4, seg_depth=2, disc_width=4),
                                                 pool, torch.zeros(2, 3, 32, 32)),
        "hoc": lambda: ClusterGAN(ClusterConfig(size=32, gen_width=8, disc_width=4, num_layers=2), pool),
        "ganseg": lambda: GANSeg(GANSegConfig(**dict(PRESETS["shapes"], widths=(8, 8, 8), mask_width=8, emb_dim=8,
                                                     spade_hidden=8, disc_width=4, z_dim=8))),
    }


@pytest.mark.parametrize("name", ["ilsgan", "plain_gan", "independence", "hoc", "ganseg"])
def test_freezing_the_discriminator_changes_no_parameter(name, monkeypatch):
    """Every method's generator step runs inside `frozen(D)`; with D left trainable instead, two steps must give the
    same networks and optimiser states bit for bit (only D's unused weight gradients are skipped)."""
    module = importlib.import_module(f"minseg.methods.{name}")
    real = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(2)]

    def train(freeze):
        if not freeze:
            monkeypatch.setattr(module, "frozen", lambda *nets: contextlib.nullcontext())
        torch.manual_seed(0)
        method = _small_methods()[name]()
        for batch in real:
            method.train_step({"image": batch})
        monkeypatch.undo()
        return method

    def tensors(method):
        nets = {k: v for k, v in vars(method).items() if isinstance(v, (nn.Module, torch.optim.Optimizer))}
        return {f"{k}.{key}": t for k, net in nets.items() for key, t in _flat(net.state_dict())}

    shipped, trainable = tensors(train(True)), tensors(train(False))
    assert shipped.keys() == trainable.keys() and len(shipped) > 10
    different = [k for k in shipped if not torch.equal(shipped[k], trainable[k])]
    assert not different, different


def _flat(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            yield from _flat(dict(enumerate(value)), f"{prefix}{key}.")
        elif torch.is_tensor(value):
            yield f"{prefix}{key}", value


def test_standing_statistics_average_the_nets_own_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2, momentum=0.3))
    inputs = [torch.randn(16, 3) * 2 + 1 for _ in range(5)]
    params = [p.clone() for p in net.parameters()]
    feed = iter(inputs)
    standing_statistics(net, lambda: (next(feed),), batches=5)
    # independently: each BatchNorm's input per batch, in train mode, then the plain mean over the 5 batches
    expected_mean, expected_var = [[], []], [[], []]
    reference = copy.deepcopy(net).train()
    for x in inputs:
        h = reference[0](x)
        expected_mean[0].append(h.mean(0)), expected_var[0].append(h.var(0))
        h = reference[3](F.relu(F.batch_norm(h, None, None, reference[1].weight, reference[1].bias, training=True)))
        expected_mean[1].append(h.mean(0)), expected_var[1].append(h.var(0))
    for bn, means, variances in zip((net[1], net[4]), expected_mean, expected_var):
        assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, torch.stack(variances).mean(0), atol=1e-5)
    assert not net.training and net[1].momentum == 0.1 and net[4].momentum == 0.3
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters()))


def test_standing_statistics_with_no_batches_leave_the_net_alone():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    net[1].running_mean.fill_(0.5)

    def never():
        raise AssertionError("no batch may be drawn (the random stream must stay as it was)")
    standing_statistics(net, never, batches=0)
    assert (net[1].running_mean == 0.5).all()
