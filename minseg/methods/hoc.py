"""Independence prior, application 2 (Dai et al., AAAI 2019, "Two Applications" and Tables 2 and 4; shared notes
section 2): instance appearances and soft masks learned from one picture of a homogeneous object cluster (HOC).

`ClusterGAN` / `run_hoc`: N layers from one shared deconv generator with independent z, random translations (the
paper's pad-and-crop; optionally rotations too, the layout prior's U(r_min, r_max)) through `minseg.ops.composite`,
recursive composition over real patches with a black disk in the centre, the mask-area penalty, and an InfoGAN term
that keeps z recoverable from each layer. Scored by the share of generated layers holding exactly one instance
(connected components of the thresholded mask), their area, and how much their shapes look like the true
instances' (`shape_scores`).
The losses, patch pool and patch discriminator are application 1's, in `minseg/methods/independence.py`.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minseg.methods.independence import ForegroundCarver, PatchDiscriminator, PatchPool, area_penalty, optimizer_step
from minseg.nets.blocks import d_logistic_loss, downsampling_trunk, frozen, g_logistic_loss
from minseg.ops import composite, perturbation
from minseg.visual import save_grid


@dataclass
class ClusterConfig:
    size: int = 64                      # patch resolution (the paper: 64; 32 runs ~4x faster on a CPU)
    num_layers: int = 12                # N (Table 4)
    z_dim: int = 2
    area_target: float = 0.25           # a
    area_weight: float = 1000.0         # lambda
    info_weight: float = 50.0           # beta: InfoGAN term on z
    shift_frac: float = 26 / 64         # layout: translation up to this fraction of the size per axis (pad 26 px)
    rotation_deg: float = 0.0           # layout: rotation up to +- this many degrees (the paper's seeds: none)
    disk_frac: float = 20 / 64          # radius of the black disk in the background patches
    window: int | None = None           # patch window in source px; None: window_factor x the largest instance
    window_factor: float = 1.5
    patch_stride: int = 2               # px between the windows cut from the picture
    vflip: bool = True                  # v-flips too (the paper: fruit and seeds, not the crowd)
    gen_width: int = 64                 # Table 2: 256 channels at 8 x 8, halving per deconv
    disc_width: int = 32                # Table 2: 64 (x2 per level, capped at 8 x width)
    lr_D: float = 2e-4
    lr_G: float = 4e-4
    betas: tuple = (0.5, 0.999)
    min_component_frac: float = 0.005   # connected components under this share of the patch are ignored

    def __post_init__(self):
        if self.size not in (32, 64, 128):
            raise ValueError(f"size must be 32, 64 or 128 (8 x 8 start, 2x deconvs), got {self.size}")
        if not 0 <= self.rotation_deg <= 180:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")


HOC_PRESETS = {  # Table 4; padding 30 / 32 / 26 px at 64 as the translation range
    "crowd": dict(num_layers=8, z_dim=6, area_target=0.1, shift_frac=30 / 64, vflip=False),
    "fruit": dict(num_layers=10, z_dim=5, area_target=0.25, shift_frac=32 / 64),
    "seeds": dict(num_layers=12, z_dim=2, area_target=0.25, shift_frac=26 / 64),
}


class InstanceGenerator(nn.Module):
    """Table 2, narrower: z -> 8 x 8 map (BN, LReLU) -> two convs (3x3 for the table's 4x4 at stride 1) -> 4x4
    deconvs x2 (BN, LReLU), the last to RGBA with a sigmoid. Returns rgb (B, 3, S, S) in [-1, 1], alpha (B, 1, S, S)."""

    def __init__(self, cfg):
        super().__init__()
        w, n_up = cfg.gen_width, int(math.log2(cfg.size // 8))
        act = lambda: nn.LeakyReLU(0.2, True)
        layers = [nn.Linear(cfg.z_dim, w * 64, bias=False), nn.BatchNorm1d(w * 64), act(), nn.Unflatten(1, (w, 8, 8))]
        for _ in range(2):
            layers += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), act()]
        chs = [w // 2 ** i for i in range(n_up)] + [4]
        for i in range(n_up):
            last = i == n_up - 1
            layers.append(nn.ConvTranspose2d(chs[i], chs[i + 1], 4, 2, 1, bias=last))
            layers += [nn.Sigmoid()] if last else [nn.BatchNorm2d(chs[i + 1]), act()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        rgba = self.net(z)  # (B, 4, S, S) in [0, 1]
        return rgba[:, :3] * 2 - 1, rgba[:, 3:]


class ClusterGAN:
    """Networks, optimisers and one training step of App 2."""

    def __init__(self, cfg, patches, device="cpu"):
        self.cfg, self.device, self.patches = cfg, torch.device(device), patches
        self.G = InstanceGenerator(cfg).to(self.device)
        self.D = PatchDiscriminator(cfg.size, cfg.disc_width, 8 * cfg.disc_width).to(self.device)
        trunk, ch = downsampling_trunk(4, cfg.disc_width, cfg.size)
        self.Q = nn.Sequential(trunk, nn.Flatten(), nn.Linear(ch * 16, cfg.z_dim)).to(self.device)  # RGBA -> z
        self.opt_G = torch.optim.Adam([*self.G.parameters(), *self.Q.parameters()], cfg.lr_G, betas=cfg.betas)
        self.opt_D = torch.optim.Adam(self.D.parameters(), cfg.lr_D, betas=cfg.betas)
        centre = torch.arange(cfg.size, device=self.device) + 0.5 - cfg.size / 2
        self.disk = centre[:, None] ** 2 + centre[None] ** 2 < (cfg.disk_frac * cfg.size) ** 2  # (S, S) bool
        self.skipped_steps = 0

    def backgrounds(self, batch):
        return self.patches.sample(batch, self.device).masked_fill(self.disk, -1.0)  # black disk in the centre

    def generate(self, batch, z=None):
        """N layers per sample from independent z, translated at random, composited over backgrounds."""
        cfg, N = self.cfg, self.cfg.num_layers
        z = torch.randn(batch, N, cfg.z_dim, device=self.device) if z is None else z
        rgb, alpha = self.G(z.flatten(0, 1))
        rgb, alpha = rgb.unflatten(0, (batch, N)), alpha.unflatten(0, (batch, N))  # (B, N, 3|1, S, S)
        shift = cfg.shift_frac * cfg.size
        turn = (-cfg.rotation_deg, cfg.rotation_deg)
        theta = perturbation(batch * N, cfg.size, (0.0, 0.0), turn, (-shift, shift), device=self.device)
        image, warped = composite(rgb, alpha, self.backgrounds(batch), theta.view(batch, N, 2, 3))
        return dict(z=z, rgb=rgb, alpha=alpha, image=image, warped=warped)

    def train_step(self, real):
        cfg = self.cfg
        x_real = real["image"].to(self.device)
        out = self.generate(len(x_real))
        loss_D = d_logistic_loss(self.D(x_real), self.D(out["image"].detach()))
        ok_D = optimizer_step(self.opt_D, loss_D)
        with frozen(self.D):
            loss_adv = g_logistic_loss(self.D(out["image"]))
        loss_area = area_penalty(out["alpha"], cfg.area_target)
        z_pred = self.Q(torch.cat([out["rgb"], out["alpha"]], 2).flatten(0, 1))  # (B N, z_dim)
        loss_info = F.mse_loss(z_pred, out["z"].flatten(0, 1))  # Gaussian NLL with unit variance, up to scale
        ok_G = optimizer_step(self.opt_G, loss_adv + cfg.area_weight * loss_area + cfg.info_weight * loss_info)
        self.skipped_steps += (not ok_D) + (not ok_G)
        return dict(loss_D=loss_D.item(), loss_G=loss_adv.item(), loss_area=loss_area.item(),
                    loss_info=loss_info.item(), mask_mean=out["alpha"].mean().item(),
                    skipped=float(not (ok_D and ok_G)))

    collapse_message = ForegroundCarver.collapse_message

    @torch.no_grad()
    def snapshot(self, path, n=12):
        gen = torch.Generator(device=self.device).manual_seed(1234)
        z = torch.randn(n, self.cfg.num_layers, self.cfg.z_dim, device=self.device, generator=gen)
        self.G.eval()
        out = self.generate(n, z)
        self.G.train()
        rgb, alpha = out["rgb"][:, 0], out["alpha"][:, 0]  # the first layer of each sample
        save_grid([self.patches.sample(n, self.device), out["image"], rgb, alpha, rgb * alpha - (1 - alpha)], path)

    def state_dict(self):
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "Q": self.Q.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state):
        for name in ("G", "D", "Q", "opt_G", "opt_D"):
            getattr(self, name).load_state_dict(state[name])
        self.skipped_steps = int(state["skipped_steps"])


def connected_components(masks, connectivity=8):
    """Labels (B, H, W) long of the 4- or 8-connected components of bool masks (B, H, W): 0 off the masks, else
    1 + the smallest flat index of the component's pixels. Min-label propagation until nothing changes."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    B, H, W = masks.shape
    off = float(H * W + 1)
    labels = torch.where(masks, torch.arange(1, H * W + 1, dtype=torch.float32).view(1, H, W), off)  # exact < 2^24
    while True:
        if connectivity == 8:
            smallest = -F.max_pool2d(-labels[:, None], 3, 1, 1)[:, 0]  # min over the 3 x 3 neighbourhood
        else:
            padded = F.pad(labels[:, None], (1, 1, 1, 1), value=off)[:, 0]
            smallest = torch.stack([labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2],
                                    padded[:, 1:-1, 2:]]).amin(0)
        updated = torch.where(masks, smallest, off)
        if torch.equal(updated, labels):
            return torch.where(masks, labels, 0.0).long()
        labels = updated


def count_components(masks, min_area=1, connectivity=8):
    """(B,) number of connected components of at least `min_area` px in each bool mask (B, H, W)."""
    B, H, W = masks.shape
    labels = connected_components(masks, connectivity)
    areas = torch.bincount((labels + torch.arange(B)[:, None, None] * (H * W + 1)).flatten(), minlength=B * (H * W + 1))
    areas = areas.view(B, H * W + 1)[:, 1:]  # label 0 (off the mask) dropped
    return (areas >= max(min_area, 1)).sum(1)


def cut_patches(image, window, size, stride):
    """All window x window crops of a (3, H, W) uint8 picture at `stride`, resized to size: (P, 3, size, size)."""
    _, H, W = image.shape
    if not 0 < window <= min(H, W):
        raise ValueError(f"window must be 1..{min(H, W)} px for a {W}x{H} picture, got {window}")
    crops = image.unfold(1, window, stride).unfold(2, window, stride)  # (3, ny, nx, window, window)
    crops = crops.permute(1, 2, 0, 3, 4).reshape(-1, 3, window, window)
    out = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           for chunk in crops.split(256)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def instance_sizes(instance_masks, top=10):
    """Largest extent (px) over instances, and the median area of the `top` last-painted (topmost, hence nearly
    whole) instances clear of the border, from visible-instance masks (M, H, W) bool in painting order."""
    rows, cols = instance_masks.any(2), instance_masks.any(1)  # (M, H), (M, W)
    span = lambda m: m.shape[1] - m.int().argmax(1) - m.flip(1).int().argmax(1)
    extent = int(torch.maximum(span(rows), span(cols)).max())
    clear = ~(rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1])
    areas = instance_masks.flatten(1).sum(1)[clear][-top:].float()
    return extent, float(areas.quantile(0.5))


def _centred(masks, centres, scale, out_size, rotations=None):
    """Resample masks (B, H, W) around centres (B, 2) (x, y in px) into out_size x out_size canvases at `scale`
    source px per output px, optionally rotated by angles (B,) in radians: bool (B, out_size, out_size)."""
    B, H, W = masks.shape
    cos, sin = (torch.ones(B), torch.zeros(B)) if rotations is None else (rotations.cos(), rotations.sin())
    sx, sy = scale * out_size / W, scale * out_size / H  # output's normalised units -> the source's
    theta = torch.stack([torch.stack([sx * cos, -sx * sin, 2 * centres[:, 0] / W - 1], 1),
                         torch.stack([sy * sin, sy * cos, 2 * centres[:, 1] / H - 1], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, 1, out_size, out_size), align_corners=False)
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0] > 0.5


def centroids(masks):
    """(B, 2) centroid (x, y) in px of masks (B, H, W); the middle for an empty mask."""
    B, H, W = masks.shape
    m = masks.float()
    area = m.sum((1, 2)).clamp(min=1e-6)
    x = (m.sum(1) * (torch.arange(W) + 0.5)).sum(1) / area
    y = (m.sum(2) * (torch.arange(H) + 0.5)).sum(1) / area
    empty = m.sum((1, 2)) == 0
    return torch.stack([x.masked_fill(empty, W / 2), y.masked_fill(empty, H / 2)], 1)


def elongation(masks):
    """(B,) sqrt of the ratio of the principal second moments of masks (B, H, W): 1 for a disk, ~a/b for an
    ellipse with half-axes a >= b; nan for an empty mask."""
    B, H, W = masks.shape
    m = masks.float()
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    c = centroids(masks)
    dx, dy = xs - c[:, 0, None, None], ys - c[:, 1, None, None]  # (B, H, W)
    area = m.sum((1, 2))
    cxx, cyy, cxy = [(m * v).sum((1, 2)) / area for v in (dx * dx, dy * dy, dx * dy)]
    spread = torch.sqrt(((cxx - cyy) / 2) ** 2 + cxy ** 2)
    big, small = (cxx + cyy) / 2 + spread, (cxx + cyy) / 2 - spread
    return torch.sqrt(big / small.clamp(min=1e-6)).masked_fill(area == 0, float("nan"))


def shape_templates(instance_masks, window, size, top=20, angles=24):
    """The true instance shapes at patch scale: the `top` last-painted instances clear of the border (nearly whole),
    each centred on its centroid, at `angles` rotations and mirrored: bool (top * angles * 2, size, size)."""
    rows, cols = instance_masks.any(2), instance_masks.any(1)
    clear = ~(rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1])
    whole = instance_masks[clear][-top:]  # (T, H, W)
    T = len(whole)
    turn = (torch.arange(angles) * 2 * math.pi / angles).repeat(T)  # (T * angles,)
    upright = _centred(whole.repeat_interleave(angles, 0), centroids(whole).repeat_interleave(angles, 0),
                       window / size, size, turn)
    return torch.cat([upright, upright.flip(-1)])


def best_shape_iou(masks, templates):
    """(B,) best IoU of each mask (B, S, S), centred on its centroid, with any template (K, S, S): shape agreement
    up to position, rotation and mirroring. 0 for an empty mask."""
    S = masks.shape[-1]
    centred = _centred(masks, centroids(masks), 1.0, S).flatten(1).float()  # (B, S S)
    flat = templates.flatten(1).float()  # (K, S S)
    inter = centred @ flat.T  # (B, K)
    union = centred.sum(1, keepdim=True) + flat.sum(1) - inter
    return (inter / union.clamp(min=1)).amax(1)


def shape_scores(alphas, instance_masks, window, size, angles=24):
    """Does a generated mask look like one true instance? Mean best-template IoU of the thresholded layers alphas
    (B, S, S), next to two references: each true instance against the *other* instances' templates (what learned
    instances could reach) and a centred disk of the true median area (what a round blob gets for free); and the
    mean elongation of the generated and the true shapes (seeds ~1.9, a blob ~1)."""
    templates = shape_templates(instance_masks, window, size, angles=angles)  # (2 T angles, S, S)
    T = len(templates) // (2 * angles)
    if T < 2:
        return {}  # fewer than two whole instances: nothing to compare shapes with
    upright = templates[:T * angles:angles]  # each instance at angle 0, not mirrored: (T, S, S)
    a, b = upright.flatten(1).float(), templates.flatten(1).float()
    inter = a @ b.T  # (T, K)
    iou = inter / (a.sum(1, keepdim=True) + b.sum(1) - inter).clamp(min=1)
    source = torch.arange(T).repeat_interleave(angles).repeat(2)  # (K,) the instance each template came from
    iou[source[None] == torch.arange(T)[:, None]] = 0
    centre = torch.arange(size) + 0.5 - size / 2
    radius = math.sqrt(float(a.sum(1).median()) / math.pi)
    disk = (centre[:, None] ** 2 + centre[None] ** 2 < radius ** 2)[None]  # (1, S, S)
    return dict(shape_iou=float(best_shape_iou(alphas > 0.5, templates).mean()),
                shape_iou_true=float(iou.amax(1).mean()), shape_iou_disk=float(best_shape_iou(disk, templates)[0]),
                elongation=float(elongation(alphas > 0.5).nanmean()), elongation_true=float(elongation(upright).mean()))


@dataclass
class HOCSchedule:
    gan_images: int = 100_000    # real patches seen by D
    batch_size: int = 32
    tick_images: int = 2_000
    snapshot_images: int = 10_000
    eval_layers: int = 512       # generated layers scored for "exactly one instance"


@torch.no_grad()
def instance_scores(method, n, batch=64, instance_masks=None, window=None):
    """Share of generated layers holding exactly one instance (components of alpha > 0.5 of at least
    min_component_frac of the patch), none, or several; mean thresholded and soft mask area in px; with the true
    instance masks of the picture (and the patch window in its px), how much the masks look like them
    (`shape_scores`): a count alone cannot tell a seed from a blob."""
    cfg = method.cfg
    method.G.eval()
    alphas = torch.cat([method.G(torch.randn(min(batch, n - i), cfg.z_dim, device=method.device))[1].cpu()
                        for i in range(0, n, batch)])[:, 0]  # (n, S, S)
    method.G.train()
    counts = count_components(alphas > 0.5, math.ceil(cfg.min_component_frac * cfg.size ** 2))
    scores = dict(one_instance=float((counts == 1).float().mean()), no_instance=float((counts == 0).float().mean()),
                  several_instances=float((counts > 1).float().mean()),
                  mask_area_px=float((alphas > 0.5).flatten(1).sum(1).float().mean()),
                  soft_mask_area_px=float(alphas.flatten(1).sum(1).mean()), layers_scored=n)
    if instance_masks is not None:
        scores.update(shape_scores(alphas, instance_masks, window, cfg.size))
    return scores


def run_hoc(cfg, image, out_dir, instance_masks=None, schedule=None, device="cpu", seed=0, resume=False,
            progress=True):
    """Learn instance appearances and masks from one cluster picture (uint8 (3, H, W)); returns the scores.

    instance_masks (M, H, W) bool, if known: the window (when cfg.window is None) and the true instance area.
    Writes results.json / results.md, instances.png (composites, layers, masks, carved layers), samples/.
    """
    from minseg import distributed
    from minseg.metrics import format_table
    from minseg.train import seed_everything, start_run, training_loop

    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got {getattr(image, 'shape', type(image))}")
    schedule = schedule or HOCSchedule()
    window, true = cfg.window, {}
    if instance_masks is not None:
        extent, top_area = instance_sizes(instance_masks)
        window = window or round(cfg.window_factor * extent)
        scale = (cfg.size / window) ** 2  # source px -> patch px
        true = dict(true_area_px=top_area * scale,
                    true_visible_area_px=float(instance_masks.flatten(1).sum(1).float().mean()) * scale)
    if window is None:
        raise ValueError("set cfg.window (patch window in px of the picture) or pass instance_masks to derive it")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    pool = PatchPool(cut_patches(image, window, cfg.size, cfg.patch_stride), vflip=cfg.vflip)
    method = ClusterGAN(cfg, pool, device)
    state = {"images_seen": 0, "seed": seed}
    save_state = start_run(out_dir, method, state, cfg, schedule, seed, resume)
    print(f"{len(pool):,} training patches, window {window} px -> {cfg.size} px")

    training_loop(method, pool.sampler(schedule.batch_size, device), state, schedule.gan_images, out_dir,
                  save_state, schedule.tick_images, schedule.snapshot_images, progress=progress, desc="hoc")
    if not distributed.is_main():
        return {}  # under torchrun, rank 0 alone scores the layers and writes the results
    scores = {**instance_scores(method, schedule.eval_layers, instance_masks=instance_masks, window=window), **true,
              "window_px": window, "patch_px": cfg.size, "patches": len(pool), "skipped_steps": method.skipped_steps}
    gen = torch.Generator(device=method.device).manual_seed(seed)
    z = torch.randn(12, cfg.num_layers, cfg.z_dim, device=method.device, generator=gen)
    with torch.no_grad():
        method.G.eval()
        out = method.generate(12, z)
    layers = [x[:, k] for k in range(min(4, cfg.num_layers)) for x in (out["rgb"], out["alpha"])]
    save_grid([out["image"], *layers], out_dir / "instances.png")  # composites, then layer k's RGB and mask
    (out_dir / "results.json").write_text(json.dumps({"method": "independence-hoc", "config": asdict(cfg), **scores},
                                                     indent=2))
    protocol = f"one cluster picture {tuple(image.shape[1:])}, window {window} px -> {cfg.size} px"
    (out_dir / "results.md").write_text(format_table([scores], protocol, percent=False) + "\n")
    return scores
