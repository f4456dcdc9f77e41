"""GAN annotation ("Teaching GAN to generate per-pixel annotation", ICLR 2020 submission, sec. 3.2-3.3 and 4.5;
shared notes sec. 4): freeze a trained generator, annotate a few of its samples, fit a light decoder from its
multi-resolution features to those masks, then label a synthetic set and train a segmenter on it. The generator
is the plain, mask-free GAN of `minseg.methods.plain_gan` (`annotate gan` trains it), a layered ILSGAN one or a
GANSeg one (their run folders' checkpoint.pt).

This file holds
    FrozenGenerator             a plain, layered (ILSGAN) or GANSeg checkpoint behind one interface: latents ->
                                (image, features); `load_generator(path)`
    Decoder, fit_decoder        per level conv3x3 -> 32 ch, BN, LReLU, dropout 0.5; coarse to fine: nearest 2x,
                                concat, residual block; 1x1 conv to classes; CE with an ignore label
    synthesize                  the synthetic (image, mask) SegmentationSet from generator + decoder
    export / read_annotations   the person's side: PNG samples + latents.pt out, painted masks in
    few_label_curve             N annotated generated samples (labelled by an `oracle` segmenter trained on all
                                real labels: the paper's LSUN-bedroom proxy for a person) vs N real labels, and
                                the route's ceiling (the oracle labels every synthetic sample)
The command line (`python run.py annotate gan|export|train|curve|plot`) is minseg/annotate_cli.py.
Deviation from the notes' recipe (Adam 1e-4, batch 1, 24 epochs = 480 steps for 20 samples): Adam 1e-3 on batches
of up to 8 for 100-300 steps, so that a fit takes seconds on a CPU; it still reaches its training masks (tests).
The curve's defaults (U-Net width 8, 100 steps of batch 8, 400 synthetic pairs) are sized for 2 shared CPU cores.
"""

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minseg.methods.plain_gan import PlainConfig, PlainGenerator
from minseg.visual import as_uint8

IGNORE = -100  # label of unpainted pixels (F.cross_entropy's default ignore_index)


# ----------------------------------------------------------------------------- a frozen generator, any kind

class FrozenGenerator:
    """A trained generator in eval mode: sample_latents(n) -> dict of codes; __call__(latents) -> (images, features)."""

    def __init__(self, net, meta=None):
        from minseg.methods.ganseg import GANSegGenerator
        self.net, self.meta = net.eval().requires_grad_(False), dict(meta or {})
        self.kind = "plain" if isinstance(net, PlainGenerator) else "ganseg" if isinstance(net, GANSegGenerator) \
            else "layered"
        self.size = net.cfg.size

    def sample_latents(self, n, generator=None):
        codes = self.net.sample_codes(n, "cpu", generator)
        return dict(z=codes[0], c=codes[1]) if self.kind == "layered" else codes if self.kind == "ganseg" \
            else dict(z=codes)

    @torch.no_grad()
    def __call__(self, latents):
        out = self.net(**latents, return_features=True)  # latents are named as each forward's arguments
        if self.kind == "layered":  # ILSGAN: unperturbed m f + (1 - m) b (its eq. 2), fg trunk + bg branch features
            return out["mask"] * out["foreground"] + (1 - out["mask"]) * out["background"], out["features"]
        return out["image"], out["features"]  # (B, 3, S, S), [(B, C_i, H_i, W_i) coarse to fine]


def load_generator(path):
    """A FrozenGenerator from an `annotate gan` checkpoint, an ILSGAN run's checkpoint.pt (its G_ema) or a GANSeg
    run's (its G_ema if it kept one, else G: the authors sample from G)."""
    from minseg.methods.ganseg import GANSegConfig, GANSegGenerator
    from minseg.methods.ilsgan import ILSGANConfig, LayeredGenerator
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generator checkpoint {path} does not exist (train one with "
                                "`python run.py annotate gan <data>`, or pass --checkpoint)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    weights = payload.get("method", {}) if isinstance(payload, dict) else {}
    weights = weights.get("G_ema", weights.get("G"))
    if weights is None or "config" not in payload:
        raise ValueError(f"{path} is not a generator checkpoint (expected 'method' with G_ema or G, and 'config': "
                         "runs/annotate-gan-<data>/checkpoint.pt or an ILSGAN or GANSeg run's checkpoint.pt)")
    if payload.get("generator") == "plain":
        net = PlainGenerator(PlainConfig(**payload["config"]))
    elif "num_parts" in payload["config"]:
        net = GANSegGenerator(GANSegConfig(**payload["config"]))
    elif "num_codes" in payload["config"]:
        net = LayeredGenerator(ILSGANConfig(**payload["config"]))
    else:  # hoc: its samples are layers over real background patches, not pictures a latent alone makes
        raise ValueError(f"{path} holds a generator that annotation does not take (plain GAN, layered GAN and "
                         "GANSeg checkpoints are taken; the one-picture instance generator is not)")
    net.load_state_dict(weights)
    return FrozenGenerator(net, dict(checkpoint=str(Path(path).resolve()), data=payload.get("data"),
                                     root=payload.get("root")))


# ------------------------------------------------------------------------------------------ the decoder

class Residual(nn.Module):
    """x + BN(conv3x3(x)), then LReLU: the residual block after each concat (one conv: it runs at 64 px)."""

    def __init__(self, ch):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x):
        return F.leaky_relu(x + self.body(x), 0.2)


class Decoder(nn.Module):
    """Generator features (coarse to fine) -> (B, num_classes, S, S) logits."""

    def __init__(self, channels, num_classes=2, width=32, dropout=0.5):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Sequential(nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                                   nn.LeakyReLU(0.2), nn.Dropout(dropout)) for c in channels)
        self.fuse = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width),
                                                nn.LeakyReLU(0.2), Residual(width)) for _ in channels[1:])
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, features, size):
        h = self.lateral[0](features[0])  # (B, width, 4, 4)
        for lateral, fuse, f in zip(self.lateral[1:], self.fuse, features[1:]):
            h = F.interpolate(h, size=f.shape[-2:], mode="nearest")  # 2x up to the next level
            h = fuse(torch.cat([h, lateral(f)], 1))  # (B, width, H_i, W_i)
        logits = self.head(h)
        return logits if logits.shape[-1] == size else F.interpolate(logits, size=(size, size), mode="bilinear")


def fit_decoder(features, labels, steps=300, lr=1e-3, batch_size=8, seed=0):
    """Train a Decoder on features [(N, C_i, H_i, W_i)] of the annotated samples and labels (N, S, S) long in
    {0, 1, IGNORE}; returns it in eval mode."""
    if not (labels != IGNORE).any():
        raise ValueError("the annotations have no painted pixel (all ignore): nothing to learn from")
    torch.manual_seed(seed)
    decoder = Decoder([f.shape[1] for f in features])
    optimizer = torch.optim.Adam(decoder.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(labels), generator=g)[:batch_size]
        loss = F.cross_entropy(decoder([f[idx] for f in features], labels.shape[-1]), labels[idx], ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return decoder.eval()


@torch.no_grad()
def decode(decoder, features, size, batch_size=64):
    """Label maps (N, S, S) long from features."""
    return torch.cat([decoder([f[i:i + batch_size] for f in features], size).argmax(1)
                      for i in range(0, len(features[0]), batch_size)])


@torch.no_grad()
def synthesize(gen, decoder, count, seed=0, batch_size=64, name=""):
    """`count` generated images with the decoder's masks, as a SegmentationSet (uint8, in memory).
    decoder: a Decoder, or any callable (images, features) -> (B, S, S) labels (the curve's oracle ceiling)."""
    from minseg.data.base import SegmentationSet
    label = decoder if not isinstance(decoder, Decoder) else lambda _, features: decode(decoder, features, gen.size)
    g, images, masks = torch.Generator().manual_seed(seed), [], []
    for start in range(0, count, batch_size):
        image, features = gen(gen.sample_latents(min(batch_size, count - start), g))
        images.append(((image.clamp(-1, 1) + 1) * 127.5).round().byte())  # (B, 3, S, S)
        masks.append(label(image, features).byte()[:, None])  # (B, 1, S, S)
    return SegmentationSet(images=torch.cat(images), masks=torch.cat(masks),
                           protocol=f"synthetic: generator + decoder{name}, {count:,} pairs")


# ------------------------------------------------------------------------------ a person's annotations

def export(gen, n, out_dir, seed=0):
    """Write n samples as out_dir/images/sample-XXX.png and their latents (+ meta) as out_dir/latents.pt."""
    out_dir = Path(out_dir)
    if (out_dir / "latents.pt").exists():
        raise ValueError(f"{out_dir} already holds an export (latents.pt); choose another --out or remove it")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    latents = gen.sample_latents(n, torch.Generator().manual_seed(seed))
    stems = [f"sample-{i:03d}" for i in range(n)]
    for stem, pixels in zip(stems, as_uint8(gen(latents)[0])):
        Image.fromarray(pixels).save(out_dir / "images" / f"{stem}.png")
    torch.save(dict(latents=latents, stems=stems, size=gen.size, **gen.meta), out_dir / "latents.pt")
    return stems


def read_annotations(directory):
    """(export meta, labels (N, S, S) long: 255 -> 1 object, 0 -> 0 background, anything else -> IGNORE)."""
    directory = Path(directory)
    if not (directory / "latents.pt").is_file():
        raise ValueError(f"{directory} has no latents.pt: make it with `python run.py annotate export`")
    meta = torch.load(directory / "latents.pt", weights_only=True)
    size, labels = meta["size"], []
    for stem in meta["stems"]:
        path = directory / "masks" / f"{stem}.png"
        if not path.is_file():
            raise ValueError(f"mask {path} is missing: paint every exported sample (255 object, 0 background, "
                             "other values ignored) and save it under masks/ with the image's name")
        mask = np.asarray(Image.open(path).convert("L"))
        if mask.shape != (size, size):
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} px, expected {size}x{size} "
                             "(the size of its image)")
        label = torch.full(mask.shape, IGNORE, dtype=torch.long)
        label[torch.from_numpy(mask == 255)], label[torch.from_numpy(mask == 0)] = 1, 0
        if (label == IGNORE).all():
            raise ValueError(f"mask {path} has no painted pixel (all ignore): use 255 for object, 0 for background")
        labels.append(label)
    return meta, torch.stack(labels)


# ------------------------------------------------------------------------------------------- the curve

def few_label_curve(gen, oracle, train_set, test_set, ns=(1, 2, 5, 10, 20), seeds=(0, 1), steps=100, width=8,
                    batch_size=8, lr=1e-3, decoder_steps=100, synthetic=400, progress=False):
    """For every seed and N: segmenter on the decoder's synthetic set from N oracle-annotated samples vs the same
    segmenter on N real labelled images (nested draws: the N = 5 samples contain the N = 2 ones). One dict a run.
    The oracle's predictions (argmax / sigmoid > 0.5, every pixel labelled) stand in for a person's masks."""
    from minseg.metrics import segmentation_scores
    from minseg.nets import build_net
    from minseg.segmenter import evaluate_segmenter, predict, train_segmenter

    def score(source, seed, **row):
        torch.manual_seed(seed)
        net = train_segmenter(source, build_net("unet", width=width), steps=steps, lr=lr, batch_size=batch_size,
                              generator=torch.Generator().manual_seed(seed), progress=progress)
        scores = evaluate_segmenter(net, test_set)
        return dict(seed=seed, **row, **{k: scores[k] for k in ("acc", "iou", "miou", "per_image_iou")})

    runs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        images, features = gen(gen.sample_latents(max(ns), g))
        labels = predict(oracle, images)  # (N_max, S, S) in {0, 1}
        held_images, held_features = gen(gen.sample_latents(64, g))  # fresh samples: decoder vs oracle
        real_order = torch.randperm(len(train_set), generator=g)
        for n in ns:
            start = time.time()
            decoder = fit_decoder([f[:n] for f in features], labels[:n], decoder_steps, seed=seed)
            agreement = segmentation_scores(decode(decoder, held_features, gen.size), predict(oracle, held_images))
            runs.append(score(synthesize(gen, decoder, synthetic, seed=seed), seed, n=n, route="decoder",
                              decoder_vs_oracle_iou=agreement["iou"]))
            runs.append(score(train_set.subset(real_order[:n]), seed, n=n, route="real", decoder_vs_oracle_iou=None))
            print(f"seed {seed} N {n}: decoder IoU {runs[-2]['iou']:.3f} (decoder vs oracle {agreement['iou']:.3f}), "
                  f"real IoU {runs[-1]['iou']:.3f}  [{time.time() - start:.0f} s]", flush=True)
        # the route's ceiling: the same synthetic set labelled by the oracle itself, a decoder that never errs
        ceiling = synthesize(gen, lambda image, _: predict(oracle, image), synthetic, seed=seed)
        runs.append(score(ceiling, seed, n=None, route="oracle-labelled", decoder_vs_oracle_iou=None))
        print(f"seed {seed}: every synthetic sample labelled by the oracle: IoU {runs[-1]['iou']:.3f}", flush=True)
    return runs
