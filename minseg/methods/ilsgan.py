"""Improved layered GAN (ILSGAN; Yang et al., WACV 2022): fg/bg layers from public + private codes,
affine-perturbed composition, mutual-information heads, alternate training with a background-regularising
U-Net. Paper sections 3.1-3.4 and appendix A/C (Table 1 presets); equations restored in shared notes.

    G_b(z) -> b;   G_f(z, c_sup) -> mask logits;   G_f(z, c_sup, c) -> f          (only z, c_sup drive the mask)
    (background_code="own", not the paper's: G_b(z_bg) -> b from a code of its own, independent of the fg)
    x = T(m) T(f) + (1 - T(m)) b,  T = perturbation A^-1 (scale 2^s, rotation, shift)            (eq. 3)
    L_G = hinge + g_mi [CE(E_x(x), c) + CE(E_pi(m), c_sup)] + g_bin mean(min(m, 1-m)) (+ g_bg BCE(S(b), 0))
    (mask_ceiling = a, not the paper's: + g_ceiling mean_i relu(mean m_i - a), a cap on each sample's mask area)
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseg.nets.blocks import (EMA, ResBlock, UpBlock, d_hinge_loss, downsampling_trunk, frozen, g_hinge_loss,
                                orthogonal_init, sn_conv, sn_linear, standing_statistics)
from minseg.ops import composite, contrast_jitter, perturbation
from minseg.segmenter import LR_DECAYS
from minseg.train import guarded_step
from minseg.visual import save_grid


@dataclass
class ILSGANConfig:
    size: int = 64                      # generator / discriminator resolution
    z_dim: int = 64                     # public code z ~ N(0, 1)^z_dim
    background_code: str = "public"     # the background's code: "public" (the paper: the fg's z) or "own" (its own z)
    num_codes: int = 20                 # private code c ~ Cat(num_codes)
    group_size: int = 2                 # super-category c_sup = c // group_size drives the mask
    gen_width: int = 16                 # generator channels at full resolution (x2 per halving, capped)
    fg_width: int | None = None         # the fg trunk's and colour branch's own width (None: gen_width; not the paper's)
    disc_width: int = 32
    log2_scale: tuple = (-0.2, 0.0)     # perturbation ranges (Table 1)
    rotation_deg: tuple = (-15.0, 15.0)
    shift_frac: float = 0.125           # +-16 px at 128 = 12.5 % of the width
    bg_contrast: tuple = ()             # e.g. (0.7, 1.3): PerturbGAN background contrast jitter
    perturb: bool = True                # ablation: plain composition (eq. 2) when False
    g_mi: float = 1.0
    g_bin: float = 2.0                  # PerturbGAN's binarisation weight (not given in the paper)
    g_bg: float = 2.0                   # background regulariser weight from round 2 (eq. 8)
    mask_size_loss: bool = False        # ablation: relu(0.25 - mean m) * 2 replaces the MI terms
    mask_ceiling: float | None = None   # cap on each sample's mean mask (None: off; not the paper's), weight g_ceiling
    g_ceiling: float = 2.0
    lr: float = 2e-4                    # Adam, G and (unless lr_D is set) D and E_pi
    lr_D: float | None = None           # D and E_pi's own rate (two time-scale updates; not the paper's)
    betas: tuple = (0.5, 0.999)
    ema_beta: float = 0.999

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8 (4 x 4 start, 2x upsampling), got {self.size!r}")
        if self.background_code not in ("public", "own"):
            raise ValueError(f"background_code must be 'public' or 'own', got {self.background_code!r}")
        if self.fg_width is not None and (not isinstance(self.fg_width, int) or self.fg_width < 1):
            raise ValueError(f"fg_width must be None (gen_width) or an integer >= 1, got {self.fg_width!r}")
        if self.mask_ceiling is not None and not 0 < self.mask_ceiling < 1:
            raise ValueError(f"mask_ceiling must be None (off) or in (0, 1), got {self.mask_ceiling!r}")

    @property
    def num_super(self):
        return math.ceil(self.num_codes / self.group_size)


PRESETS = {  # appendix Table 1 (128 px) plus minseg's own data sets
    "cub": dict(size=128, num_codes=200, group_size=10, g_mi=1.0, g_bg=2.0),
    "dogs": dict(size=128, num_codes=120, group_size=10, g_mi=2.0, g_bg=1.0),
    "cars": dict(size=128, num_codes=196, group_size=14, rotation_deg=(0.0, 0.0), bg_contrast=(0.7, 1.3), g_mi=1.0, g_bg=2.0),
    "apc": dict(size=128, num_codes=200, group_size=10, g_mi=2.0, g_bg=0.0),
    # shapes: 32 px and a slim generator so that the quick schedule fits 15 minutes on 2 CPU cores; the discriminator
    # is the weak side of the game there: width 64 beats 16 within the same 15 minutes (README, layered GAN results)
    "shapes": dict(size=32, num_codes=20, group_size=2, gen_width=8, disc_width=64),
    "horses": dict(size=64, num_codes=10, group_size=5),
}


def upsampling_branch(in_dim, width, size, max_width=256):
    """Linear -> 4x4 map -> UpBlocks to `size`, halving channels to `width` at full resolution."""
    n_up = int(math.log2(size // 4))
    chs = [min(width * 2 ** (n_up - i), max_width) for i in range(n_up + 1)]
    head = nn.Sequential(nn.Linear(in_dim, chs[0] * 16, bias=False), nn.BatchNorm1d(chs[0] * 16), nn.ReLU(True),
                         nn.Unflatten(1, (chs[0], 4, 4)))
    return nn.Sequential(head, *[UpBlock(chs[i], chs[i + 1]) for i in range(n_up)])


class LayeredGenerator(nn.Module):
    """FineGAN-like layout with ReLU: a background branch on z; a foreground trunk on (z, c_sup) whose
    features give the mask and, joined with the private code c, the foreground colour."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, w_bg, w = cfg, cfg.gen_width, cfg.gen_width if cfg.fg_width is None else cfg.fg_width
        self.background = nn.Sequential(upsampling_branch(cfg.z_dim, w_bg, cfg.size), nn.Conv2d(w_bg, 3, 3, 1, 1), nn.Tanh())
        self.trunk = upsampling_branch(cfg.z_dim + cfg.num_super, w, cfg.size)
        self.mask_head = nn.Conv2d(w, 1, 3, 1, 1)
        self.colour = nn.Sequential(nn.Conv2d(w + cfg.num_codes, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                    nn.ReLU(True), ResBlock(w), nn.Conv2d(w, 3, 3, 1, 1), nn.Tanh())
        orthogonal_init(self)

    def sample_codes(self, batch, device, generator=None):
        """z: the public code, then (background_code "own") the background's own code; c: the private code."""
        z_dim = self.cfg.z_dim * (2 if self.cfg.background_code == "own" else 1)
        z = torch.randn(batch, z_dim, device=device, generator=generator)
        c = torch.randint(0, self.cfg.num_codes, (batch,), device=device, generator=generator)
        return z, c

    def forward(self, z, c, return_features=False):
        c_sup = c // self.cfg.group_size
        z, z_bg = z[:, :self.cfg.z_dim], z[:, -self.cfg.z_dim:]  # the same code unless the background has its own
        branch, to_rgb = self.background[0], self.background[1:]
        features, bg_features = [], []
        h = branch[0](z_bg)
        for block in branch[1:]:
            h = block(h)
            bg_features.append(h)
        background = to_rgb(h)  # (B, 3, S, S)
        trunk_in = torch.cat([z, F.one_hot(c_sup, self.cfg.num_super).to(z)], 1)
        h = self.trunk[0](trunk_in)
        for block in self.trunk[1:]:
            h = block(h)
            features.append(h)
        mask_logits = self.mask_head(h)  # (B, 1, S, S)
        code_map = F.one_hot(c, self.cfg.num_codes).to(z)[:, :, None, None].expand(-1, -1, *h.shape[2:])
        foreground = self.colour(torch.cat([h, code_map], 1))  # (B, 3, S, S)
        out = dict(background=background, foreground=foreground, mask_logits=mask_logits, mask=torch.sigmoid(mask_logits))
        if return_features:  # GAN annotation: both branches' features at each resolution, coarse to fine
            out["features"] = [torch.cat(pair, 1) for pair in zip(features, bg_features)]  # (B, 2 C_i, H_i, W_i)
        return out


class Discriminator(nn.Module):
    """Spectrally normalised D with the E_x head bifurcating at the top (predicts c from an image)."""

    def __init__(self, cfg):
        super().__init__()
        self.trunk, ch = downsampling_trunk(3, cfg.disc_width, cfg.size)
        self.adv_head = sn_conv(ch, 1, 4, 1, 0)  # (B, 1, 1, 1)
        self.code_head = nn.Sequential(sn_conv(ch, ch, 3), nn.LeakyReLU(0.2, True), nn.Flatten(),
                                       sn_linear(ch * 16, cfg.num_codes))
        orthogonal_init(self)

    def forward(self, x):
        h = self.trunk(x)  # (B, ch, 4, 4)
        return self.adv_head(h).flatten(), self.code_head(h)


class MaskEncoder(nn.Module):
    """E_pi: predicts the super-category c_sup from a mask."""

    def __init__(self, cfg):
        super().__init__()
        trunk, ch = downsampling_trunk(1, cfg.disc_width // 2, cfg.size)
        self.net = nn.Sequential(trunk, nn.Flatten(), nn.Linear(ch * 16, cfg.num_super))
        orthogonal_init(self)

    def forward(self, m):
        return self.net(m * 2 - 1)


class ILSGAN:
    """Networks, optimisers and one training step of the improved layered GAN."""

    def __init__(self, cfg, device="cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.G = LayeredGenerator(cfg).to(self.device)
        self.D = Discriminator(cfg).to(self.device)
        self.E_pi = MaskEncoder(cfg).to(self.device)
        self.G_ema = EMA(self.G, cfg.ema_beta)
        self.opt_G = torch.optim.Adam(self.G.parameters(), cfg.lr, betas=cfg.betas)
        lr_D = cfg.lr if cfg.lr_D is None else cfg.lr_D
        self.opt_D = torch.optim.Adam([*self.D.parameters(), *self.E_pi.parameters()], lr_D, betas=cfg.betas)
        self.background_judge = None  # frozen segmenter S for L_bg (alternate training, round >= 2)
        self.skipped_steps = 0

    # -- generation ---------------------------------------------------------------------------------------
    def compose(self, out, perturb=None):
        """Perturbed composition (eq. 3) of a generator output; returns (image, perturbed mask)."""
        cfg, B = self.cfg, out["mask"].shape[0]
        background = out["background"]
        if cfg.bg_contrast:
            background = contrast_jitter(background, cfg.bg_contrast)
        theta = None
        if cfg.perturb if perturb is None else perturb:
            shift = cfg.shift_frac * cfg.size
            theta = perturbation(B, cfg.size, cfg.log2_scale, cfg.rotation_deg, (-shift, shift),
                                 device=self.device, dtype=background.dtype)
        image, warped = composite(out["foreground"][:, None], out["mask"][:, None], background, theta)
        return image, warped[:, 0]

    def settle_sampler(self, batches, batch_size=32, raw=False):
        """Before G_ema makes a data set: with `raw`, it takes the trained G's weights and statistics in place of their
        average; then its BatchNorm statistics are measured on `batches` batches of its own samples (0: kept)."""
        if raw:
            self.G_ema.net.load_state_dict(self.G.state_dict())
        standing_statistics(self.G_ema.net, lambda: self.G.sample_codes(batch_size, self.device), batches)

    @torch.no_grad()
    def sample_pairs(self, batch, perturb=True):
        """Synthetic (image, mask) pairs from the EMA generator: the data set the segmenter learns from (eq. 7)."""
        z, c = self.G.sample_codes(batch, self.device)
        image, mask = self.compose(self.G_ema.net(z, c), perturb)
        return {"image": image, "mask": mask}

    # -- one training step --------------------------------------------------------------------------------
    def mutual_information_loss(self, code_logits, mask, c):
        if self.cfg.mask_size_loss:  # ablation: mask-size hinge instead of MI
            return 2.0 * F.relu(0.25 - mask.mean((1, 2, 3))).mean()
        return F.cross_entropy(code_logits, c) + F.cross_entropy(self.E_pi(mask), c // self.cfg.group_size)

    def train_step(self, real):
        cfg, B = self.cfg, real["image"].shape[0]
        x_real = real["image"].to(self.device)
        z, c = self.G.sample_codes(B, self.device)

        # discriminator, E_x and E_pi: hinge on real vs fake, MI heads on fake codes
        with torch.no_grad():
            out = self.G(z, c)
            x_fake, _ = self.compose(out)
        real_logits, _ = self.D(x_real)
        fake_logits, code_logits = self.D(x_fake)
        loss_D = d_hinge_loss(real_logits, fake_logits)
        loss_D_mi = self.mutual_information_loss(code_logits, out["mask"], c) if cfg.g_mi > 0 else torch.zeros(())
        ok_D = self._apply(self.opt_D, loss_D + cfg.g_mi * loss_D_mi)

        # generator: fool D, keep the codes recoverable, binarise masks, keep backgrounds background
        out = self.G(z, c)
        x_fake, mask = self.compose(out)
        with frozen(self.D, self.E_pi):
            fake_logits, code_logits = self.D(x_fake)
            loss_adv = g_hinge_loss(fake_logits)
            loss_mi = self.mutual_information_loss(code_logits, out["mask"], c) if cfg.g_mi > 0 else torch.zeros(())
        loss_bin = torch.minimum(mask, 1 - mask).mean()
        loss_area = torch.zeros(())
        if cfg.mask_ceiling is not None:  # hinge on each sample's mask area above the cap
            loss_area = F.relu(out["mask"].mean((1, 2, 3)) - cfg.mask_ceiling).mean()
        loss_bg = torch.zeros(())
        if self.background_judge is not None and cfg.g_bg > 0:
            loss_bg = F.softplus(self.background_judge(out["background"])).mean()  # BCE(S(b), 0)
        ok_G = self._apply(self.opt_G, loss_adv + cfg.g_mi * loss_mi + cfg.g_bin * loss_bin + cfg.g_bg * loss_bg
                           + cfg.g_ceiling * loss_area)
        if ok_G:
            self.G_ema.update(self.G)
        return dict(loss_D=loss_D.item(), loss_G=loss_adv.item(), loss_mi=loss_mi.item(), loss_bin=loss_bin.item(),
                    loss_bg=loss_bg.item(), loss_area=loss_area.item(), mask_mean=out["mask"].mean().item(),
                    skipped=float(not (ok_D and ok_G)))

    def _apply(self, optimizer, loss):
        """Backward and step, unless the loss or a gradient is non-finite: then skip and count (divergence guard)."""
        ok = guarded_step(optimizer, loss)
        self.skipped_steps += not ok
        return ok

    def collapse_message(self, tick):
        """A trivial decomposition: the mask covers (almost) none or all of every sample (README: one seed of
        fg_width=16 sat at a mean mask of 0.95-0.97 for the last 75k images and scored as "all foreground")."""
        if tick["mask_mean"] < 0.02:
            return f"mask collapsed to all background (mean mask {tick['mask_mean']:.3f})"
        if tick["mask_mean"] > 0.95:
            return f"mask collapsed to all foreground (mean mask {tick['mask_mean']:.3f})"
        return None

    # -- pictures and state -------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, path, n=12):
        gen = torch.Generator(device=self.device).manual_seed(1234)
        z, c = self.G.sample_codes(n, self.device, gen)
        out = self.G_ema.net(z, c)
        plain, _ = self.compose(out, perturb=False)
        perturbed, warped = self.compose(out, perturb=True)
        save_grid([out["background"], out["foreground"], out["mask"], plain, perturbed, warped], path)

    PARTS = ("G", "D", "E_pi", "opt_G", "opt_D")  # saved with their state_dict()

    def state_dict(self):
        return {**{k: getattr(self, k).state_dict() for k in self.PARTS}, "G_ema": self.G_ema.net.state_dict(),
                "ema_updates": self.G_ema.updates, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        for k in self.PARTS:
            getattr(self, k).load_state_dict(state[k])
        self.G_ema.net.load_state_dict(state["G_ema"])
        self.G_ema.updates, self.skipped_steps = int(state["ema_updates"]), int(state["skipped_steps"])


# -- the whole pipeline: GAN rounds alternating with the background judge, then the final segmenter -------------
@dataclass
class Schedule:
    rounds: int = 1              # alternate training rounds (appendix C.2); S regularises G from round 2
    gan_images: int = 40_000     # images seen by D per round
    judge_steps: int = 300       # steps of the background judge S before each round but the first
    final_steps: int = 1500      # steps of the final segmenter on synthetic pairs (appendix C.3)
    final_lr_decay: str = "constant"  # its Adam rate: "constant" or "cosine" (to 0; C.3 gives only the initial 1e-3)
    final_standing_stats: int = 0  # > 0: first re-measure G_ema's BatchNorm statistics on this many sample batches
    final_sampler: str = "ema"   # the final data set's generator: "ema" (G averaged, common in this family) or "raw"
    final_self_train: int = 0    # > 0: then this many steps on the real train images labelled by the segmenter
    final_self_train_fresh: bool = False  # self-train a fresh U-Net instead of the one that made the labels
    seg_width: int = 32          # U-Net channels at full resolution (judge and final segmenter)
    batch_size: int = 32
    tick_images: int = 2_000
    snapshot_images: int = 10_000

    def __post_init__(self):  # checked now, not after the GAN phase
        for name in ("final_standing_stats", "final_self_train"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.final_sampler not in ("ema", "raw"):
            raise ValueError(f"final_sampler must be 'ema' or 'raw', got {self.final_sampler!r}")
        if self.final_lr_decay not in LR_DECAYS:
            raise ValueError(f"final_lr_decay must be one of {LR_DECAYS}, got {self.final_lr_decay!r}")


SCHEDULES = {
    "quick": {},  # per data set below; sized for 2 CPU cores
    "paper": dict(rounds=1, gan_images=1_000_000, final_steps=12_000, tick_images=20_000, snapshot_images=100_000),
    "paper-alternate": dict(rounds=5, gan_images=2_000_000, judge_steps=2_000, final_steps=12_000,
                            tick_images=20_000, snapshot_images=100_000),
}
QUICK = {"shapes": dict(gan_images=180_000, final_steps=800, seg_width=16),
         "horses": dict(gan_images=40_000, final_steps=1500),
         "cub": dict(gan_images=40_000, final_steps=1500)}


def make_schedule(name, data, **overrides):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    values = dict(QUICK.get(data, {})) if name == "quick" else dict(SCHEDULES[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Schedule(**values)


def run(cfg, schedule, train_set, test_set, out_dir, device="cpu", seed=0, resume=False, progress=True):
    """Train the layered GAN per `schedule`, then the final segmenter; returns the metrics dict."""
    from pathlib import Path
    from minseg import distributed
    from minseg.nets import build_net
    from minseg.pipeline import finish, pair_stream
    from minseg.segmenter import load_segmenter, save_segmenter, train_segmenter
    from minseg.train import seed_everything, start_run, training_loop

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    method = ILSGAN(cfg, device)
    state = {"round": 0, "images_seen": 0, "seed": seed}
    where = lambda s: f"round {s['round'] + 1}, {s['images_seen']:,} images seen"
    save_state = start_run(out_dir, method, state, cfg, schedule, seed, resume, describe=where)

    def segmenter():
        return build_net("unet", num_classes=1, width=schedule.seg_width)

    judge_path = out_dir / "judge.pt"

    def train_judge(serves):
        """The background judge S for round index `serves` (0-based): a U-Net on the generator's pairs as they are."""
        if distributed.is_main():  # under torchrun rank 0 trains the judge, every rank loads it
            judge = train_segmenter(pair_stream(method.sample_pairs, schedule.batch_size), net=segmenter(),
                                    steps=schedule.judge_steps, device=device, progress=progress)
            save_segmenter(judge_path, judge, {"method": "ilsgan-judge", "round": serves})
        distributed.barrier()

    # A finished run resumed with a longer GAN phase (--gan-images up): its last round goes on where it stopped
    # (older checkpoints lack "last_round_images": the length their schedule gave).
    last_round_images = state.get("last_round_images", save_state.saved_schedule.get("gan_images", 0))
    if state["round"] == schedule.rounds and last_round_images < schedule.gan_images:
        print(f"--resume: the run had finished; round {schedule.rounds} goes on from {last_round_images:,} images")
        state.update(round=schedule.rounds - 1, images_seen=last_round_images)

    batches = train_set.sampler(schedule.batch_size, augment=True, device=device)
    while state["round"] < schedule.rounds:
        r = state["round"]
        if r > 0 and cfg.g_bg > 0:  # the judge from the generator as round r starts (kept in judge.pt for resumes)
            judge = load_segmenter(judge_path) if judge_path.exists() else None
            if distributed.rank0_says(judge is None or judge.meta.get("round") != r):  # every rank takes one path
                train_judge(r)
                judge = load_segmenter(judge_path)
            method.background_judge = judge.to(device).eval().requires_grad_(False)
        training_loop(method, batches, state, schedule.gan_images, out_dir, save_state, schedule.tick_images,
                      schedule.snapshot_images, progress=progress, desc=f"gan-round{r + 1}")  # returns at once if done
        state.update(round=r + 1, last_round_images=state["images_seen"], images_seen=0)
        save_state()

    if not distributed.is_main():
        return {}  # under torchrun, rank 0 alone trains the final segmenter and scores it
    extra = {"skipped_steps": method.skipped_steps}
    method.settle_sampler(schedule.final_standing_stats, schedule.batch_size, raw=schedule.final_sampler == "raw")
    if test_set.labels is not None and cfg.g_mi > 0 and not cfg.mask_size_loss:
        extra["nmi"] = code_nmi(method, test_set)
    _, metrics = finish("ilsgan", pair_stream(method.sample_pairs, schedule.batch_size), test_set, out_dir,
                        net=segmenter(), steps=schedule.final_steps, batch_size=schedule.batch_size, device=device,
                        extra=extra, progress=progress, lr_decay=schedule.final_lr_decay, real_set=train_set,
                        self_train_steps=schedule.final_self_train, self_train_fresh=schedule.final_self_train_fresh)
    return metrics


@torch.no_grad()
def code_nmi(method, test_set, batch_size=128):
    """NMI between E_x's predicted private code on real test images and their category labels."""
    from minseg.metrics import nmi
    method.D.eval()
    preds = []
    for start in range(0, len(test_set), batch_size):
        batch = test_set.batch(list(range(start, min(start + batch_size, len(test_set)))))
        preds.append(method.D(batch["image"].to(method.device))[1].argmax(1).cpu())
    method.D.train()
    return float(nmi(torch.cat(preds).numpy(), test_set.labels.numpy()))
