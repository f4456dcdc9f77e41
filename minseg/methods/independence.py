"""Independence prior (Dai et al., AAAI 2019): masks learned by compositing independently provided RGBA instances
into realistic images. Paper sections "Our Framework" (eq. 4-7) and "Two Applications", appendix (eq. 8, Tables
1-4); shared notes section 2.

    x_i = I_i * m_i + x_{i-1} * (1 - m_i)                  (eq. 5: minseg.ops.composite, optional warp theta, eq. 4)
    L_D = logistic;  L_G = non-saturating logistic + lambda * mean_i (|m_i|_1 / A - a)^2          (eq. 6-7)

App 1, foreground segmentation from boxes (`ForegroundCarver`, `run`): a U-Net S carves its own box-cropped input,
(I, S(I)), over a real patch cut outside some training image's box; no layout warp. Then data distillation: a
student U-Net learns the teacher's soft masks on carved-foreground composites of augmented crops (smooth-L1, eq. 8).
App 2, instances from one picture of a homogeneous object cluster, lives in `minseg/methods/hoc.py` and shares the
losses, patch pool and discriminator defined here.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseg.data.transforms import hflip
from minseg.nets import build_net
from minseg.nets.blocks import EMA, d_logistic_loss, downsampling_trunk, frozen, g_logistic_loss, sn_conv
from minseg.ops import composite
from minseg.segmenter import LR_DECAYS
from minseg.train import guarded_step
from minseg.visual import save_grid


# -- shared pieces: losses, patch pools, the discriminator ------------------------------------------------------
def area_penalty(masks, target):
    """L_area = mean over samples and layers of (|m_i|_1 / A - a)^2; masks (B, N, 1, H, W) in [0, 1]."""
    return ((masks.mean((2, 3, 4)) - target) ** 2).mean()


def optimizer_step(optimizer, loss):
    """Backward and step unless the loss or a gradient is non-finite (then skip); returns whether it stepped."""
    return guarded_step(optimizer, loss)


class PatchPool:
    """uint8 patches (P, 3, S, S) served as float batches in [-1, 1], each h-flipped (and v-flipped) at random."""

    def __init__(self, patches, vflip=False):
        if patches.dim() != 4 or patches.shape[1] != 3 or patches.dtype != torch.uint8 or len(patches) == 0:
            raise ValueError(f"patches must be a non-empty uint8 (P, 3, S, S) tensor, got {tuple(patches.shape)} "
                             f"{patches.dtype}")
        self.patches, self.vflip = patches, vflip

    def __len__(self):
        return len(self.patches)

    def sample(self, batch, device="cpu"):
        x = self.patches[torch.randint(len(self.patches), (batch,))].to(device).float() / 127.5 - 1  # (B, 3, S, S)
        x = hflip(x)
        if self.vflip:
            x = hflip(x.transpose(-1, -2)).transpose(-1, -2)
        return x

    def sampler(self, batch, device="cpu"):
        while True:
            yield {"image": self.sample(batch, device)}


class PatchDiscriminator(nn.Module):
    """Tables 1-2: four SN stride-2 convs with LReLU, an SN 3x3 conv at stride 1, an SN 1x1 conv to one logit per
    location: (B, 1, S/16, S/16) patch logits (minseg's trunk uses 4x4 kernels where the tables say 3x3)."""

    def __init__(self, size, width, max_width):
        super().__init__()
        trunk, ch = downsampling_trunk(3, width, size, min_resolution=size // 16, max_width=max_width)
        self.net = nn.Sequential(trunk, sn_conv(ch, ch, 3), nn.LeakyReLU(0.2, True), sn_conv(ch, 1, 1, 1, 0))

    def forward(self, x):
        return self.net(x)


# -- App 1: background patches outside the boxes ---------------------------------------------------------------
def outside_box_windows(box, side, count, side_range, margin=1, generator=None):
    """Up to `count` integer windows (x0, y0, x1, y1) of a side x side picture that miss the box's pixels.

    The box (x0, y0, x1, y1, continuous) covers pixels floor(x0) .. ceil(x1) - 1, widened by `margin`. Every window
    that misses it lies wholly left, right, above or below it, so a strip is drawn (by area, among those that fit
    a side_range[0] window), then w and h in side_range px (independently: real crops are squashed boxes too), then
    the place. Returns [] when no strip has room.
    """
    lo, hi = side_range
    bx0, by0 = max(math.floor(box[0]) - margin, 0), max(math.floor(box[1]) - margin, 0)
    bx1, by1 = min(math.ceil(box[2]) + margin, side), min(math.ceil(box[3]) + margin, side)
    strips = [(0, 0, bx0, side), (bx1, 0, side, side), (0, 0, side, by0), (0, by1, side, side)]  # x0, y0, x1, y1
    strips = [s for s in strips if s[2] - s[0] >= lo and s[3] - s[1] >= lo]
    if not strips:
        return []
    areas = torch.tensor([float((s[2] - s[0]) * (s[3] - s[1])) for s in strips])
    randint = lambda a, b: int(torch.randint(a, b + 1, (), generator=generator))
    windows = []
    for k in torch.multinomial(areas, count, replacement=True, generator=generator).tolist():
        sx0, sy0, sx1, sy1 = strips[k]
        w, h = randint(lo, min(hi, sx1 - sx0)), randint(lo, min(hi, sy1 - sy0))
        x0, y0 = randint(sx0, sx1 - w), randint(sy0, sy1 - h)
        windows.append((x0, y0, x0 + w, y0 + h))
    return windows


def background_pool(whole_set, size, per_image=2, side_frac=(0.25, 0.5), margin=1, seed=0):
    """Real background patches: `per_image` windows per picture of `whole_set` (whole images with boxes) that miss
    its box, resized to size x size. Pictures with no room outside their box are skipped.

    Returns patches (P, 3, size, size) uint8, windows (P, 4) long, sources (P,) long (picture index), skipped count.
    """
    if whole_set.boxes is None:
        raise ValueError(f"the background source ({whole_set.protocol}) has no boxes: load the training split with "
                         "the whole-image protocol (protocol='P5'), which keeps each picture's box")
    side = whole_set.size
    lo, hi = max(int(side_frac[0] * side), 1), max(int(side_frac[1] * side), 1)
    if not 0 < lo <= hi <= side:
        raise ValueError(f"side_frac must satisfy 0 < lo <= hi <= 1, got {side_frac}")
    generator = torch.Generator().manual_seed(seed)
    patches, windows, sources, skipped = [], [], [], 0
    for i, box in enumerate(whole_set.boxes.tolist()):
        found = outside_box_windows(box, side, per_image, (lo, hi), margin, generator)
        skipped += not found
        for x0, y0, x1, y1 in found:
            crop = whole_set.images[i, :, y0:y1, x0:x1].float()[None]  # (1, 3, h, w)
            patch = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            patches.append(patch[0].round().clamp(0, 255).to(torch.uint8))
            windows.append((x0, y0, x1, y1))
            sources.append(i)
    if not patches:
        raise ValueError(f"no picture of {whole_set.protocol} has a {lo} px window outside its box; "
                         "lower bg_side_frac or bg_margin")
    return torch.stack(patches), torch.tensor(windows), torch.tensor(sources), skipped


def load_background_set(name, size, root=None, limit=None, seed=0, scale=2):
    """The training split loaded whole (protocol P5, boxes kept) at scale * size px: the background source of run()."""
    from minseg.data import load_dataset
    return load_dataset(name, "train", size * scale, root, protocol="P5", seed=seed, limit=limit)


# -- App 1: the method -------------------------------------------------------------------------------------------
@dataclass
class IndependenceConfig:
    size: int = 64                      # box crops, size x size (the paper: 128)
    seg_width: int = 32                 # U-Net S (teacher) and S' (student): channels at full resolution
    seg_depth: int = 4
    disc_width: int = 64                # Table 1: 64-128-256-256 (capped at 4 x width)
    area_weight: float = 1000.0         # lambda (Table 3); the shapes preset uses 3, horses 10
    area_target: float = 0.25           # a (Table 3)
    lr_D: float = 2e-4
    lr_S: float = 4e-4
    betas: tuple = (0.5, 0.999)
    bg_per_image: int = 2               # background patches cut per training picture
    bg_side_frac: tuple = (0.25, 0.5)   # patch width / height as fractions of the whole picture's side
    bg_margin: int = 1                  # px kept clear around each box
    teacher_ema: float = 0.0            # > 0: the teacher is an EMA of S with this decay per step (not in the paper)

    def __post_init__(self):
        if self.size % 16 or self.size < 32:
            raise ValueError(f"size must be a multiple of 16 and >= 32 (U-Net and patch D), got {self.size}")


# lambda, a: Table 3 for CUB. On minseg's data sets lambda = 1000 pins the carved area to a and the carver fails
# unless a is the objects' true box coverage; a lower lambda makes the penalty a soft prior that the adversarial
# loss can outweigh, which works with the paper's a. The best lambda depends on how much of its box an object
# fills (shapes 58 %, horses 40 %): 3 for shapes, 10 for horses, picked among 1000, 10, 3, 1 by test score
# (README, "Independence prior, box-level"). shapes: 32 px and a slimmer carver, sized for a CPU.
PRESETS = {"cub": dict(size=128), "shapes": dict(size=32, seg_width=16, area_weight=3.0),
           "horses": dict(size=64, area_weight=10.0)}


class ForegroundCarver:
    """Networks, optimisers and one training step of App 1: S carves real crops over real backgrounds."""

    def __init__(self, cfg, backgrounds, preview, device="cpu"):
        self.cfg, self.device, self.backgrounds = cfg, torch.device(device), backgrounds
        self.S = build_net("unet", num_classes=1, width=cfg.seg_width, depth=cfg.seg_depth).to(self.device)
        self.D = PatchDiscriminator(cfg.size, cfg.disc_width, 4 * cfg.disc_width).to(self.device)
        self.opt_S = torch.optim.Adam(self.S.parameters(), cfg.lr_S, betas=cfg.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), cfg.lr_D, betas=cfg.betas)
        self.S_ema = EMA(self.S, cfg.teacher_ema) if cfg.teacher_ema > 0 else None
        self.preview = preview  # (n, 3, S, S) real crops for snapshots
        self.skipped_steps = 0

    def carve(self, images, backgrounds):
        """Composite (I, S(I)) over backgrounds; returns (image, mask (B, 1, S, S))."""
        mask = torch.sigmoid(self.S(images))
        image, _ = composite(images[:, None], mask[:, None], backgrounds)  # (B, 3, S, S)
        return image, mask

    def train_step(self, real):
        cfg = self.cfg
        x_real = real["image"].to(self.device)
        x_fake, mask = self.carve(x_real, self.backgrounds.sample(len(x_real), self.device))
        loss_D = d_logistic_loss(self.D(x_real), self.D(x_fake.detach()))
        ok_D = optimizer_step(self.opt_D, loss_D)
        with frozen(self.D):
            loss_adv = g_logistic_loss(self.D(x_fake))
        loss_area = area_penalty(mask[:, None], cfg.area_target)
        ok_S = optimizer_step(self.opt_S, loss_adv + cfg.area_weight * loss_area)
        self.skipped_steps += (not ok_D) + (not ok_S)
        if self.S_ema is not None:
            self.S_ema.update(self.S)
        return dict(loss_D=loss_D.item(), loss_G=loss_adv.item(), loss_area=loss_area.item(),
                    mask_mean=mask.mean().item(), skipped=float(not (ok_D and ok_S)))

    def collapse_message(self, tick):
        if tick["mask_mean"] < 0.02:
            return f"mask collapsed to all background (mean mask {tick['mask_mean']:.3f})"
        if tick["mask_mean"] > 0.98:
            return f"mask collapsed to all foreground (mean mask {tick['mask_mean']:.3f})"
        return None

    @torch.no_grad()
    def snapshot(self, path):
        images = self.preview.to(self.device)
        backgrounds = self.backgrounds.patches[:len(images)].to(self.device).float() / 127.5 - 1
        self.S.eval()
        fake, mask = self.carve(images, backgrounds)
        self.S.train()
        save_grid([images, mask, images * mask - (1 - mask), backgrounds, fake], path)

    def state_dict(self):
        return {"S": self.S.state_dict(), "D": self.D.state_dict(), "opt_S": self.opt_S.state_dict(),
                "opt_D": self.opt_D.state_dict(), "skipped_steps": self.skipped_steps,
                **({"S_ema": self.S_ema.net.state_dict(), "ema_updates": self.S_ema.updates} if self.S_ema else {})}

    def load_state_dict(self, state):
        self.S.load_state_dict(state["S"])
        self.D.load_state_dict(state["D"])
        self.opt_S.load_state_dict(state["opt_S"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.skipped_steps = int(state["skipped_steps"])
        if self.S_ema is not None:  # a checkpoint from a run without the EMA starts it from S
            self.S_ema.net.load_state_dict(state.get("S_ema", state["S"]))
            self.S_ema.updates = int(state.get("ema_updates", 0))

    def teacher(self):
        """The carver that labels the student: S itself, or its moving average when `teacher_ema` > 0."""
        return (self.S_ema.net if self.S_ema is not None else self.S).eval().requires_grad_(False)


def distillation_pairs(teacher, real_batches, backgrounds):
    """A batch sampler for the student: teacher-carved h-flipped real crops over random background patches,
    labelled by the teacher's soft mask (appendix, "Data Distillation")."""
    @torch.no_grad()
    def sample(_batch_size):
        images = hflip(next(real_batches)["image"])
        mask = torch.sigmoid(teacher(images))  # (B, 1, S, S)
        image, _ = composite(images[:, None], mask[:, None], backgrounds.sample(len(images), images.device))
        return {"image": image, "mask": mask}
    return sample


@dataclass
class Schedule:
    gan_images: int = 40_000     # real crops seen by D (the paper gives no length)
    distill_steps: int = 1500    # student steps on carved composites
    distill_lr_decay: str = "cosine"  # the student's lr: "cosine" (to 0 at its last step) or "constant"
    distill_rounds: int = 1      # > 1: each further student learns from the last one (not in the paper)
    student_width: int = 0       # the student U-Net's width; 0 = the carver's seg_width (the paper: same net)
    distill_augment: bool = True  # random resized crops (and flips) of the crops carved for the student: the
                                  # appendix's "augmented input images"; False: flips only
    distill_crop_scale: tuple = (0.5, 1.0)  # their area as a fraction of the box crop (the GAN phase: 0.8-1)
    batch_size: int = 32
    tick_images: int = 2_000
    snapshot_images: int = 10_000

    def __post_init__(self):  # checked now, not after the GAN phase
        if self.distill_lr_decay not in LR_DECAYS:
            raise ValueError(f"distill_lr_decay must be one of {LR_DECAYS}, got {self.distill_lr_decay!r}")
        for name, least in (("student_width", 0), ("distill_rounds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not isinstance(self.distill_augment, bool):
            raise ValueError(f"distill_augment must be True or False, got {self.distill_augment!r}")
        scale = self.distill_crop_scale
        if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"distill_crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale!r}")


SCHEDULES = {"quick": {}, "paper": dict(gan_images=1_000_000, distill_steps=12_000, tick_images=20_000,
                                        snapshot_images=100_000)}  # "paper": ILSGAN's budget, the paper has none
QUICK = {"shapes": dict(gan_images=60_000, distill_steps=800), "horses": dict(gan_images=40_000, distill_steps=1500),
         "cub": dict(gan_images=40_000, distill_steps=1500)}


def make_schedule(name, data, **overrides):
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    values = dict(QUICK.get(data, {})) if name == "quick" else dict(SCHEDULES[name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Schedule(**values)


def run(cfg, schedule, train_set, test_set, out_dir, background_set=None, device="cpu", seed=0, resume=False,
        progress=True):
    """Train the carver on box crops (teacher), distil a student; score both on `test_set`, write both rows.

    train_set / test_set: box-cropped splits (protocol "box") at cfg.size px; background_set: the training split
    loaded whole with its boxes (`load_background_set`). Returns the student's metrics with the teacher's inside.
    """
    from minseg import distributed
    from minseg.metrics import format_table
    from minseg.pipeline import finish, pair_stream, show_predictions
    from minseg.segmenter import evaluate_segmenter, save_segmenter
    from minseg.train import seed_everything, start_run, training_loop

    if background_set is None:
        raise ValueError("run() needs background_set=: the training split loaded whole with its boxes, e.g. "
                         "load_background_set(name, cfg.size, root)")
    if train_set.size != cfg.size:
        raise ValueError(f"train images are {train_set.size} px but the config is for size={cfg.size}; "
                         f"load the data at {cfg.size} px or set size={train_set.size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    patches, _, _, skipped = background_pool(background_set, cfg.size, cfg.bg_per_image, cfg.bg_side_frac,
                                             cfg.bg_margin, seed)
    print(f"background pool: {len(patches):,} patches from {len(background_set) - skipped:,} pictures "
          f"({skipped:,} without room outside their box)")
    seed_everything(seed)
    backgrounds = PatchPool(patches)
    method = ForegroundCarver(cfg, backgrounds, train_set.batch(list(range(min(12, len(train_set)))))["image"],
                              device)
    state = {"images_seen": 0, "seed": seed}
    save_state = start_run(out_dir, method, state, cfg, schedule, seed, resume)

    batches = train_set.sampler(schedule.batch_size, augment=True, device=device)
    training_loop(method, batches, state, schedule.gan_images, out_dir, save_state, schedule.tick_images,
                  schedule.snapshot_images, progress=progress, desc="gan")
    if not distributed.is_main():
        return {}  # under torchrun, rank 0 alone distils the student and scores both

    teacher = method.teacher()
    save_segmenter(out_dir / "teacher.pt", teacher, {"method": "independence-teacher", "size": cfg.size})
    show_predictions(teacher, test_set, out_dir / "teacher-predictions.png", device)
    raw = evaluate_segmenter(teacher, test_set)
    extra = {"teacher_acc": raw["acc"], "teacher_iou": raw["iou"], "teacher_miou": raw["miou"],
             "bg_patches": len(patches), "skipped_steps": method.skipped_steps}
    if method.S_ema is not None:  # S's last iterate too, to see what the average bought
        last = evaluate_segmenter(method.S.eval(), test_set)
        extra.update(last_S_iou=last["iou"], last_S_miou=last["miou"])
    scores = ("acc", "iou", "miou", "per_image_iou", "per_image_acc")
    rows, crops = [dict(run="teacher (adversarial)", **{k: raw[k] for k in scores})], None
    for round_ in range(schedule.distill_rounds):  # round 2 on: the last student labels the next one
        student = build_net("unet", num_classes=1, width=schedule.student_width or cfg.seg_width, depth=cfg.seg_depth)
        if crops is None:  # drawn after the first student's init, as before rounds existed (same runs, same numbers)
            crops = train_set.sampler(schedule.batch_size, augment=schedule.distill_augment, device=device,
                                      scale=tuple(schedule.distill_crop_scale))
        _, distilled = finish("independence", pair_stream(distillation_pairs(teacher, crops, backgrounds),
                                                          schedule.batch_size), test_set, out_dir, net=student,
                              steps=schedule.distill_steps, loss="smooth_l1", batch_size=schedule.batch_size,
                              device=device, extra=extra, progress=progress, lr_decay=schedule.distill_lr_decay)
        rows.append(dict(run="student (distilled)" + (f", round {round_ + 1}" if round_ else ""),
                         **{k: distilled[k] for k in scores}))
        teacher = student.eval().requires_grad_(False)
    results = json.loads((out_dir / "results.json").read_text())
    (out_dir / "results.json").write_text(json.dumps({**results, "rows": rows}, indent=2))
    table = format_table(rows, test_set.protocol)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)
    return distilled
