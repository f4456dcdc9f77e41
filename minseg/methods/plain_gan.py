"""A plain unconditional GAN with no notion of masks, trained by minseg so that GAN annotation
(`minseg.methods.annotation`, as in the GAN-annotation paper) applies to a generator that knows nothing of
foreground and background: DCGAN-style generator from ILSGAN's upsampling branch, spectrally normalised
discriminator, hinge loss, EMA; driven by `minseg.train.training_loop`. forward(z, return_features=True) also
returns the multi-resolution features the annotation decoder reads.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from minseg.nets.blocks import EMA, d_hinge_loss, downsampling_trunk, frozen, g_hinge_loss, orthogonal_init, sn_conv
from minseg.visual import save_grid


@dataclass
class PlainConfig:
    size: int = 64
    z_dim: int = 64
    gen_width: int = 8          # channels at full resolution, x2 per halving (capped at 256)
    disc_width: int = 16
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    ema_beta: float = 0.995     # short CPU schedules: 0.999 would still average in the first few hundred steps


class PlainGenerator(nn.Module):
    """z -> Linear -> 4x4 -> UpBlocks to `size` -> conv3x3 -> tanh; features = the 4x4 map and every UpBlock's."""

    def __init__(self, cfg):
        super().__init__()
        from minseg.methods.ilsgan import upsampling_branch
        self.cfg = cfg
        self.branch = upsampling_branch(cfg.z_dim, cfg.gen_width, cfg.size)
        self.to_rgb = nn.Sequential(nn.Conv2d(cfg.gen_width, 3, 3, 1, 1), nn.Tanh())
        orthogonal_init(self)

    def sample_codes(self, batch, device="cpu", generator=None):
        return torch.randn(batch, self.cfg.z_dim, device=device, generator=generator)

    def forward(self, z, return_features=False):
        features, h = [], z
        for block in self.branch:
            h = block(h)
            features.append(h)  # (B, C_i, 4 * 2**i, 4 * 2**i)
        out = {"image": self.to_rgb(h)}  # (B, 3, S, S) in [-1, 1]
        if return_features:
            out["features"] = features
        return out


class PlainGAN:
    """Generator, SN discriminator, EMA and one hinge-loss step (the training_loop protocol of minseg.train)."""

    def __init__(self, cfg, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.G = PlainGenerator(cfg).to(self.device)
        trunk, ch = downsampling_trunk(3, cfg.disc_width, cfg.size)
        self.D = orthogonal_init(nn.Sequential(trunk, sn_conv(ch, 1, 4, 1, 0), nn.Flatten())).to(self.device)
        self.G_ema = EMA(self.G, cfg.ema_beta)
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr, betas=cfg.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), cfg.lr, betas=cfg.betas)

    def train_step(self, real):
        x_real = real["image"].to(self.device)  # (B, 3, S, S)
        z = self.G.sample_codes(len(x_real), self.device)
        with torch.no_grad():
            x_fake = self.G(z)["image"]
        loss_D = d_hinge_loss(self.D(x_real), self.D(x_fake))
        self.opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        self.opt_D.step()
        x_fake = self.G(z)["image"]
        with frozen(self.D):
            loss_G = g_hinge_loss(self.D(x_fake))
        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        self.opt_G.step()
        self.G_ema.update(self.G)
        return dict(loss_D=loss_D.item(), loss_G=loss_G.item())

    @torch.no_grad()
    def snapshot(self, path, n=12):
        z = self.G.sample_codes(n, self.device, torch.Generator(self.device).manual_seed(1234))
        save_grid([self.G_ema.net(z)["image"]], path)

    def state_dict(self):
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.net.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "ema_updates": self.G_ema.updates}

    def load_state_dict(self, state):
        for name in ("G", "D", "opt_G", "opt_D"):
            getattr(self, name).load_state_dict(state[name])
        self.G_ema.net.load_state_dict(state["G_ema"])
        self.G_ema.updates = int(state["ema_updates"])
