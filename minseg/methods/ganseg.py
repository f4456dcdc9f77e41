"""GANSeg (He, Wandt & Rhodin, CVPR 2022): part masks from a hierarchical, translation-equivariant GAN, then a
DeepLab segmenter on generated (image, argmax mask) pairs. Paper sec. 3.1-3.4, appendix B (architecture,
hyper-parameters), E (translation equivariance) and F (ablations); shared notes section 3.

Level 1  z_point -> MLP -> K x n_per points;  x_k = mean,  sigma_k = sqrt(sum_i |x_k^i - x_k|^2) / (n_per - 1)  (eq. 1)
         z_app -> MLP -> w_dyn;  part embedding w_k = w_dyn * w_k^const                                      (eq. 2-3)
Level 2  H_k(p) = exp(-|p - x_k|^2 / sigma_k^2),  W_mask = sum_k H_k w_k,  start = PE(p - x_k^i)              (eq. 4-5)
         SPADE ResBlocks -> softmax over K + 1 channels, channel 0 = background                               (eq. 6)
Level 3  W_fg = sum_k M_k w_k, SPADE ResBlocks from PE(p - x_k) -> F;  z_bg -> w_bg, AdaIN blocks from PE(p - u) -> B
         image = tanh(conv(lrelu(conv((1 - M_bg) F + M_bg B))))                                               (eq. 11)
Every map lives on a grid `margin` px wider than the image at its resolution; after each 2x upsample it is cropped
back to that margin (sec. 3.3). Only differences p - x enter, so moving every point and u by t pixels (a multiple of
the total upsampling factor) moves masks and image by t (appendix E), BatchNorm in eval mode: the masks exactly, the
image outside a border band, because the foreground's coarse levels need W_fg beyond the masks' own margin and
edge-pad it there (tests/test_ganseg.py checks both).
Losses: non-saturating logistic; gradient penalty on reals (lazy); concentration (eq. 16) and area (eq. 17).
Shared pieces live elsewhere: the MLPs and SPADE / AdaIN blocks in minseg.nets.blocks, the point and part pictures
in minseg.visual, part centres and keypoint scores on real images in minseg.metrics.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseg.metrics import keypoint_scores
from minseg.nets.blocks import (EMA, AdaINBlock, SPADEResBlock, d_logistic_loss, downsampling_trunk, frozen,
                                g_logistic_loss, mlp, orthogonal_init, sn_conv)
from minseg.ops import composite, part_heatmaps, pixel_grid, positional_encoding
from minseg.train import guarded_step
from minseg.visual import draw_points, save_grid, show_test_parts, tint_parts


@dataclass
class GANSegConfig:
    size: int = 128                        # image resolution (the last entry of `resolutions`)
    num_parts: int = 8                     # K
    n_per: int = 4                         # points per part (F.3: <= 2 collapses)
    z_dim: int = 256
    emb_dim: int = 64                      # D_emb: part / background embeddings and the blended feature map C
    resolutions: tuple = (32, 32, 64, 128)  # one block per entry; a doubling means 2x upsample + crop first
    widths: tuple = (512, 256, 128, 64)    # fg / bg start tensor width, then block i outputs widths[i + 1] (last: emb_dim)
    mask_width: int = 64                   # channels of the mask branch (its last block outputs K + 1 logits)
    spade_hidden: int = 128                # hidden channels of SPADE's style convs
    margin: int = 10                       # px of grid beyond each border, at every resolution
    point_scale: float = 0.15              # points = tanh(point_scale * MLP(z)): start near the centre, sigma ~0.07
    fixed_sigma: float | None = None       # ablation F.2: one sigma for all parts instead of the points' spread
    lambda_con: float = 10.0               # C_con * K with C_con 1.25 (F.4); 0 = ablation "no concentration loss"
    lambda_area: float = 1.0               # 0 = ablation "no area loss"
    area_reference_size: int | None = 128  # area loss in px of a 128 px image (the paper's): same balance at any size
    penalty_every: int = 2                 # concentration + area on every 2nd G step (*code*)
    gp_weight: float = 10.0
    gp_every: int = 16                     # lazy gradient penalty: every 16th D step, weight as is (*code*)
    gp_centre: float = 0.0                 # 0: R1 |grad|^2 (Mescheder et al., the paper's [35]); 1: the code's (|grad| - 1)^2
    disc_width: int = 64
    lr_G: float = 1e-4
    lr_D: float = 4e-4
    betas: tuple = (0.5, 0.9)
    ema_beta: float = 0.0                  # 0: no EMA (as the authors); e.g. 0.999 samples from an EMA generator

    def __post_init__(self):
        res = tuple(self.resolutions)
        if not res or res[-1] != self.size or any(b not in (a, 2 * a) for a, b in zip(res, res[1:])):
            raise ValueError(f"resolutions must end at size={self.size} and stay or double at each step, got {res}")
        if len(self.widths) != len(res) or any(w < 2 or w % 2 for w in (*self.widths, self.mask_width)):
            raise ValueError(f"widths needs one even width per resolution ({len(res)}), got {self.widths}; "
                             f"mask_width must be even, got {self.mask_width}")
        if self.n_per < 2 and self.fixed_sigma is None:
            raise ValueError(f"n_per={self.n_per} has no spread to take sigma from: use n_per >= 2 or set fixed_sigma")
        if self.area_reference_size is not None and self.area_reference_size < 1:
            raise ValueError(f"area_reference_size must be a size in px or None, got {self.area_reference_size}")
        if self.num_parts < 1 or self.margin < 0:
            raise ValueError(f"num_parts must be >= 1 and margin >= 0, got {self.num_parts}, {self.margin}")


# 64 px on CPU: start at a quarter of the image and double twice, as the paper's 32 -> 128, but with one block at
# the start resolution instead of two and ~1/8 of the widths (cost; also a narrower non-equivariant border band)
CPU_64 = dict(size=64, resolutions=(16, 32, 64), widths=(64, 32, 16), z_dim=64, emb_dim=32, mask_width=16,
              spade_hidden=16, disc_width=32)
# 32 px on CPU (the shapes preset, as the layered GAN's): 8 -> 16 -> 32 px, slimmer still, and a 4 px margin (the
# paper's 10 px at 128 px is 8 % of the edge; 10 px at 32 px would make the grids 2.6x the image): ~6x CPU_64's speed
CPU_32 = dict(CPU_64, size=32, resolutions=(8, 16, 32), widths=(32, 16, 16), disc_width=16, margin=4)
PRESETS = {  # paper settings at 128 px (appendix B.4, Table 4); lambda_con = 1.25 K (F.4) elsewhere
    "cub": dict(size=128, num_parts=8, lambda_con=10.0),
    "shapes": dict(CPU_32, num_parts=4, lambda_con=5.0),
    "horses": dict(CPU_64, num_parts=8, lambda_con=10.0),
}


def crop(x, margin):
    return x[..., margin:x.shape[-2] - margin, margin:x.shape[-1] - margin]


def upsample_crop(x, margin):
    """2x bilinear upsample of a map with a `margin` px border (now 2 margin), cropped back to `margin` px."""
    return crop(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), margin)


def part_geometry(points, num_parts, fixed_sigma=None):
    """points (B, K * n_per, 2), part-major -> centres (B, K, 2), sigmas (B, K) (eq. 1)."""
    B = points.shape[0]
    groups = points.view(B, num_parts, -1, 2)  # (B, K, n_per, 2)
    centres = groups.mean(2)
    if fixed_sigma is not None:
        return centres, torch.full((B, num_parts), float(fixed_sigma), device=points.device, dtype=points.dtype)
    spread = ((groups - centres[:, :, None]) ** 2).sum((2, 3))  # (B, K)
    return centres, torch.sqrt(spread + 1e-8) / (groups.shape[2] - 1)


class GANSegGenerator(nn.Module):
    """Points -> masks -> foreground; independent background; blend in feature space; tanh image."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        K, P, D, w, res = cfg.num_parts, cfg.num_parts * cfg.n_per, cfg.emb_dim, cfg.widths, cfg.resolutions
        self.point_mlp = mlp(cfg.z_dim, 2 * P, cfg.z_dim)
        self.app_mlp = mlp(cfg.z_dim, D, cfg.z_dim)
        self.bg_mlp = mlp(cfg.z_dim, D, cfg.z_dim)
        self.part_const = nn.Parameter(torch.randn(K, D))  # w_k^const
        # positional-encoding projections (FC without activation, eq. 5): weight (width / 2, 2 * points)
        self.mask_pe, self.fg_pe, self.bg_pe = nn.Linear(2 * P, cfg.mask_width // 2), nn.Linear(2 * K, w[0] // 2), \
            nn.Linear(2, w[0] // 2)
        mask_out = [cfg.mask_width] * (len(res) - 1) + [K + 1]
        self.mask_blocks = nn.ModuleList([SPADEResBlock(cin, cout, D, cfg.spade_hidden)
                                          for cin, cout in zip([cfg.mask_width] + mask_out[:-1], mask_out)])
        outs = list(w[1:]) + [D]
        self.fg_blocks = nn.ModuleList([SPADEResBlock(cin, cout, D, cfg.spade_hidden) for cin, cout in zip(w, outs)])
        self.bg_blocks = nn.ModuleList([AdaINBlock(cin, cout, D, cfg.spade_hidden) for cin, cout in zip(w, outs)])
        self.to_rgb = nn.Sequential(nn.Conv2d(D, D, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(D, 3, 3, 1, 1), nn.Tanh())
        orthogonal_init(self)

    def sample_codes(self, batch, device, generator=None):
        """dict(z_point, z_app, z_bg ~ N(0, 1), bg_center ~ U[-1, 1]^2 (B, 1, 2)): keyword arguments of forward."""
        z = lambda: torch.randn(batch, self.cfg.z_dim, device=device, generator=generator)
        u = torch.rand(batch, 1, 2, device=device, generator=generator) * 2 - 1
        return dict(z_point=z(), z_app=z(), z_bg=z(), bg_center=u)

    def points(self, z_point):
        """Level 1 positions: (B, K * n_per, 2) in normalised image coordinates, part-major."""
        return torch.tanh(self.cfg.point_scale * self.point_mlp(z_point)).view(len(z_point), -1, 2)

    def _run_branch(self, blocks, start, style_at, collect):
        """Blocks over cfg.resolutions on margin grids; style_at(res) gives block i's style input.
        Returns the last map with its margin, (B, C, S + 2 margin, S + 2 margin); appends every block's output,
        margin cropped (a view), to the list `collect`."""
        h, res, m = start, self.cfg.resolutions, self.cfg.margin
        for i, (block, r) in enumerate(zip(blocks, res)):
            if i > 0 and r != res[i - 1]:
                h = upsample_crop(h, m)
            h = block(h, style_at(r))
            collect.append(crop(h, m))
        return h

    def _downsample_to_margin_grid(self, x, r):
        """A map x on the full-resolution margin grid -> the margin grid at resolution r: area-average over
        pixel-aligned f x f windows (f = size / r), which keeps (margin // f) px of true margin, and edge-pad
        the rest (the part of the coarse margin that lies beyond the full-resolution grid)."""
        m, f = self.cfg.margin, self.cfg.size // r
        pooled = F.avg_pool2d(x[..., m % f:x.shape[-2] - m % f, m % f:x.shape[-1] - m % f], f)
        return F.pad(pooled, (m - m // f,) * 4, mode="replicate")

    def forward(self, z_app, z_bg, bg_center, z_point=None, points=None, return_features=False):
        """Pass z_point, or explicit points (B, K * n_per, 2) in normalised coordinates. Returns a dict of maps;
        with return_features also "features": per block, coarse to fine, the mask, foreground and background
        branches' outputs side by side (GAN annotation's decoder input)."""
        cfg, K, m = self.cfg, self.cfg.num_parts, self.cfg.margin
        levels = {"mask": [], "fg": [], "bg": []}  # every block's output per branch: GAN annotation's features
        if (points is None) == (z_point is None):
            raise ValueError("GANSegGenerator: pass exactly one of z_point or points")
        points = self.points(z_point) if points is None else points
        if points.dim() != 3 or points.shape[1:] != (K * cfg.n_per, 2):
            raise ValueError(f"points must be (B, K * n_per, 2) = (B, {K * cfg.n_per}, 2), got {tuple(points.shape)}")
        centres, sigmas = part_geometry(points, K, cfg.fixed_sigma)  # (B, K, 2), (B, K)
        emb = self.app_mlp(z_app)[:, None] * self.part_const  # w_k (B, K, D)
        r0 = (cfg.resolutions[0],) * 2

        # level 2: masks from point-relative encodings, styled by the Gaussian embedding map at each resolution
        start = positional_encoding(points, self.mask_pe.weight, self.mask_pe.bias, r0, m)  # (B, mask_width, ...)
        style = lambda r: part_heatmaps(centres, sigmas, emb, (r, r), m)[1]  # W_mask (B, D, r + 2m, r + 2m)
        masks_margin = self._run_branch(self.mask_blocks, start, style, levels["mask"]).softmax(1)  # (B, K+1, S+2m, ..)
        masks = crop(masks_margin, m)  # (B, K + 1, S, S)

        # level 3: foreground styled by W_fg = sum_k M_k w_k, from the masks with their margin, per resolution
        w_fg = torch.einsum("bkhw,bkd->bdhw", masks_margin[:, 1:], emb)  # (B, D, S + 2m, S + 2m)
        start = positional_encoding(centres, self.fg_pe.weight, self.fg_pe.bias, r0, m)
        foreground = crop(self._run_branch(self.fg_blocks, start, lambda r: self._downsample_to_margin_grid(w_fg, r),
                                           levels["fg"]), m)  # (B, D, S, S)

        # background: AdaIN blocks from an encoding relative to its own random centre u
        w_bg = self.bg_mlp(z_bg)  # (B, D)
        start = positional_encoding(bg_center, self.bg_pe.weight, self.bg_pe.bias, r0, m)
        background = crop(self._run_branch(self.bg_blocks, start, lambda r: w_bg, levels["bg"]), m)  # (B, D, S, S)

        # blend in feature space (eq. 11): background + (1 - M_bg) (foreground - background)
        blend, _ = composite(foreground[:, None], (1 - masks[:, :1])[:, None], background)
        out = dict(image=self.to_rgb(blend), masks=masks, parts=masks.argmax(1), points=points, centres=centres,
                   sigmas=sigmas, foreground=foreground, background=background)
        if return_features:
            out["features"] = [torch.cat(maps, 1) for maps in zip(levels["mask"], levels["fg"], levels["bg"])]
        return out


class Discriminator(nn.Module):
    """Spectrally normalised strided convs down to 4 x 4, then one logit."""

    def __init__(self, cfg):
        super().__init__()
        self.trunk, ch = downsampling_trunk(3, cfg.disc_width, cfg.size)
        self.head = sn_conv(ch, 1, 4, 1, 0)  # (B, 1, 1, 1)
        orthogonal_init(self)

    def forward(self, x):
        return self.head(self.trunk(x)).flatten()


def concentration_loss(masks, centres):
    """Eq. 16: sum_k sum_p M_k(p) / sum M_k |p - x_k|^2 (normalised coordinates), mean over the batch."""
    grid = pixel_grid(masks.shape[-2:], 0, masks.device, masks.dtype)  # (S, S, 2)
    parts = masks[:, 1:]  # (B, K, S, S)
    dist = ((grid[None, None] - centres[:, :, None, None]) ** 2).sum(-1)  # (B, K, S, S)
    weights = parts / (parts.sum((2, 3), keepdim=True) + 1e-6)
    return (weights * dist).sum((1, 2, 3)).mean()


def area_loss(masks, centres, sigmas, reference_size=None):
    """Eq. 17: sum_k max(0, sum_p H_k(p) - sum_p M_k(p)) (areas in pixels), mean over the batch.

    The paper counts pixels of its 128 px images while the concentration loss (eq. 16) is in normalised coordinates,
    so lambda_area's weight relative to lambda_con grows with the image area. With reference_size, areas are counted
    in pixels of a reference_size px image, which keeps the paper's balance at any size."""
    heat, _ = part_heatmaps(centres, sigmas, centres.new_zeros(*centres.shape[:2], 1), tuple(masks.shape[-2:]))
    scale = 1.0 if reference_size is None else reference_size ** 2 / (masks.shape[-2] * masks.shape[-1])
    return F.relu(heat.sum((2, 3)) - masks[:, 1:].sum((2, 3))).sum(1).mean() * scale


class GANSeg:
    """Networks, optimisers and one training step of GANSeg."""

    def __init__(self, cfg, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.G = GANSegGenerator(cfg).to(self.device)
        self.D = Discriminator(cfg).to(self.device)
        self.G_ema = EMA(self.G, cfg.ema_beta) if cfg.ema_beta > 0 else None
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr_G, betas=cfg.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), cfg.lr_D, betas=cfg.betas)
        self.d_steps = self.g_steps = self.skipped_steps = 0
        self.last_gp = 0.0

    @torch.no_grad()
    def generate(self, batch, generator=None):
        """Outputs of the sampling generator (the EMA copy if any, else G) in eval mode: pictures and pairs."""
        net = self.G_ema.net if self.G_ema is not None else self.G
        was_training = net.training
        out = net.eval()(**net.sample_codes(batch, self.device, generator))
        net.train(was_training)
        return out

    def sample_pairs(self, batch):
        """Synthetic (image, parts) pairs, parts = argmax over the K + 1 masks: the segmenter's training data."""
        out = self.generate(batch)
        return {"image": out["image"], "parts": out["parts"]}

    def train_step(self, real):
        cfg = self.cfg
        B = len(real["image"])

        # discriminator: logistic loss, gradient penalty on reals every gp_every-th step
        with torch.no_grad():
            x_fake = self.G(**self.G.sample_codes(B, self.device))["image"]
        penalise = cfg.gp_weight > 0 and self.d_steps % cfg.gp_every == 0
        x_real = real["image"].to(self.device).detach().requires_grad_(penalise)
        real_logits = self.D(x_real)
        loss_D = d_logistic_loss(real_logits, self.D(x_fake))
        loss_gp = torch.zeros((), device=self.device)
        if penalise:
            grad, = torch.autograd.grad(real_logits.sum(), x_real, create_graph=True)
            loss_gp = ((grad.flatten(1).norm(dim=1) - cfg.gp_centre) ** 2).mean()
            self.last_gp = loss_gp.item()
        ok_D = self._apply(self.opt_D, loss_D + cfg.gp_weight * loss_gp)
        self.d_steps += 1

        # generator: fool D; concentration and area penalties every penalty_every-th step
        out = self.G(**self.G.sample_codes(B, self.device))
        with frozen(self.D):
            loss_adv = g_logistic_loss(self.D(out["image"]))
        loss_con = concentration_loss(out["masks"], out["centres"])
        loss_area = area_loss(out["masks"], out["centres"], out["sigmas"], cfg.area_reference_size)
        loss_G = loss_adv
        if self.g_steps % cfg.penalty_every == 0:
            loss_G = loss_G + cfg.lambda_con * loss_con + cfg.lambda_area * loss_area
        ok_G = self._apply(self.opt_G, loss_G)
        self.g_steps += 1
        if ok_G and self.G_ema is not None:
            self.G_ema.update(self.G)
        part_share = out["masks"][:, 1:].mean((0, 2, 3))  # (K,) mean area of each part
        # spread = std over the batch of the part centres (normalised units, mean over parts and axes): pose variety
        return dict(loss_D=loss_D.item(), loss_G=loss_adv.item(), loss_gp=self.last_gp, loss_con=loss_con.item(),
                    loss_area=loss_area.item(), fg=part_share.sum().item(), min_part=part_share.min().item(),
                    sigma=out["sigmas"].mean().item(), spread=out["centres"].std(0).mean().item(),
                    skipped=float(not (ok_D and ok_G)))

    def _apply(self, optimizer, loss):
        """Backward and step, unless the loss or a gradient is non-finite: then skip and count (divergence guard)."""
        ok = guarded_step(optimizer, loss)
        self.skipped_steps += not ok
        return ok

    def collapse_message(self, tick):
        if tick["fg"] < 0.01:
            return f"masks collapsed to all background (foreground share {tick['fg']:.3f})"
        if tick["fg"] > 0.99:
            return f"masks collapsed to all foreground (foreground share {tick['fg']:.3f})"
        return None

    # -- pictures and state -------------------------------------------------------------------------------
    def snapshot(self, path, n=12):
        """Rows: images, images with their points, part masks in colour, images tinted by parts."""
        out = self.generate(n, torch.Generator(device=self.device).manual_seed(1234))
        image = out["image"]
        save_grid([image, draw_points(image, out["points"], self.cfg.num_parts), out["parts"],
                   tint_parts(image, out["parts"])], path)

    def state_dict(self):
        state = {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_G": self.opt_G.state_dict(),
                 "opt_D": self.opt_D.state_dict(), "d_steps": self.d_steps, "g_steps": self.g_steps,
                 "skipped_steps": self.skipped_steps}
        if self.G_ema is not None:
            state["G_ema"] = self.G_ema.net.state_dict()
        return state

    def load_state_dict(self, state):
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        if self.G_ema is not None:
            self.G_ema.net.load_state_dict(state["G_ema"])
        self.d_steps, self.g_steps = int(state["d_steps"]), int(state["g_steps"])
        self.skipped_steps = int(state["skipped_steps"])


# -- the whole pipeline: GAN, then DeepLab on generated pairs, then scores on real images -------------------------
@dataclass
class Schedule:
    gan_images: int = 100_000    # real images seen by D (one D and one G step per batch)
    final_steps: int = 2000      # DeepLab steps on generated pairs (paper: 10,000)
    final_self_train: int = 0    # > 0: then this many steps on the real train images labelled by DeepLab
    batch_size: int = 16
    seg_batch_size: int = 32
    seg_lr: float = 3e-4         # Adam, appendix B.4
    tick_images: int = 2_000
    snapshot_images: int = 10_000
    keypoint_fit_images: int = 1000  # train images the part-centre -> keypoint regressor is fit on


SCHEDULES = {
    "quick": {},  # per data set below; sized for 2 CPU cores
    "paper": dict(gan_images=1_920_000, batch_size=64, final_steps=10_000, tick_images=20_000,
                  snapshot_images=100_000),  # 30k G updates at batch 64 (appendix B.4, *code* batch)
}
QUICK = {"shapes": dict(gan_images=40_000, final_steps=1000), "horses": dict(gan_images=100_000, final_steps=1500),
         "cub": dict(gan_images=100_000, final_steps=1500)}


def make_schedule(name, data, **overrides):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    values = dict(QUICK.get(data, {})) if name == "quick" else dict(SCHEDULES[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Schedule(**values)


def run(cfg, schedule, train_set, test_set, out_dir, device="cpu", seed=0, resume=False, progress=True):
    """Train GANSeg per `schedule`, then DeepLab on its pairs; score fg IoU and keypoints; returns the metrics."""
    from pathlib import Path
    from minseg import distributed
    from minseg.pipeline import finish, pair_stream
    from minseg.train import seed_everything, start_run, training_loop

    if train_set.size != cfg.size:
        raise ValueError(f"train images are {train_set.size} px but the GANSeg config is for size={cfg.size}; "
                         f"load the data at {cfg.size} px or pick a config for {train_set.size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    method = GANSeg(cfg, device)
    state = {"images_seen": 0, "seed": seed}
    save_state = start_run(out_dir, method, state, cfg, schedule, seed, resume)

    batches = train_set.sampler(schedule.batch_size, augment=True, device=device, scale=(0.9, 1.0))  # *code* crops
    training_loop(method, batches, state, schedule.gan_images, out_dir, save_state, schedule.tick_images,
                  schedule.snapshot_images, progress=progress, desc="gan")
    if not distributed.is_main():
        return {}  # under torchrun, rank 0 alone trains the segmenter and scores it

    K = cfg.num_parts
    segmenter, metrics = finish("ganseg", pair_stream(method.sample_pairs, schedule.seg_batch_size), test_set,
                                out_dir, net="deeplab", num_classes=K + 1, steps=schedule.final_steps,
                                loss="ce_dice", lr=schedule.seg_lr, batch_size=schedule.seg_batch_size, device=device,
                                extra={"skipped_steps": method.skipped_steps}, progress=progress,
                                real_set=train_set, self_train_steps=schedule.final_self_train,
                                more_scores=lambda seg: keypoint_scores(seg, train_set, test_set,
                                                                        schedule.keypoint_fit_images))
    show_test_parts(segmenter, test_set, out_dir / "test-parts.png", K)
    return metrics
