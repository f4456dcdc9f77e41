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
    add_commands                `python run.py annotate gan|export|train|curve ...`
Deviation from the notes' recipe (Adam 1e-4, batch 1, 24 epochs = 480 steps for 20 samples): Adam 1e-3 on batches
of up to 8 for 100-300 steps, so that a fit takes seconds on a CPU; it still reaches its training masks (tests).
The curve's defaults (U-Net width 8, 100 steps of batch 8, 400 synthetic pairs) are sized for 2 shared CPU cores.
"""

import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from minseg.cli_args import (DATA_SETS, add_data_arguments, check_root, existing_dir, existing_file, positive_int,
                             splits_for)
from minseg.methods.plain_gan import PlainConfig, PlainGAN, PlainGenerator
from minseg.visual import as_uint8, overlay, plot_curve, save_grid

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
        if self.kind == "layered":  # ILSGAN: unperturbed m f + (1 - m) b (its eq. 2), fg trunk + bg branch features
            out = self.net(latents["z"], latents["c"], return_features=True)
            image = out["mask"] * out["foreground"] + (1 - out["mask"]) * out["background"]
        elif self.kind == "ganseg":  # its codes as keyword arguments; mask, fg and bg branch features
            out = self.net(**latents, return_features=True)
            image = out["image"]
        else:
            out = self.net(latents["z"], return_features=True)
            image = out["image"]
        return image, out["features"]  # (B, 3, S, S), [(B, C_i, H_i, W_i) coarse to fine]


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


# ---------------------------------------------------------------------------------------- command line

def add_commands(subparsers):
    """`annotate gan | export | train | curve` (see the module docstring); each sets args.run."""
    p = subparsers.add_parser("annotate", help="GAN annotation: export samples to paint, fit the decoder, ...")
    sub = p.add_subparsers(dest="action", metavar="action", required=True)
    gan = sub.add_parser("gan", help="train the plain (mask-free) GAN whose samples get annotated")
    gan.add_argument("data", choices=DATA_SETS, help="data set (horses / folder: fold 0's train split)")
    gan.add_argument("--gan-images", type=positive_int, default=60_000, help="images seen by D (default 60,000)")
    gan.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a PlainConfig field")
    gan.add_argument("--quiet", action="store_true", help="one status line per tick instead of a progress bar")
    ex = sub.add_parser("export", help="write generated samples to paint (PNG) and keep their latents")
    ex.add_argument("--checkpoint", type=existing_file, required=True, help="annotate gan, ILSGAN or GANSeg checkpoint")
    ex.add_argument("--n", type=positive_int, default=20, help="samples to export (default 20)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    tr = sub.add_parser("train", help="fit the decoder on painted masks, label a synthetic set, train + score")
    tr.add_argument("--dir", type=existing_dir, required=True, help="an export folder with masks/ painted")
    tr.add_argument("--checkpoint", type=existing_file, default=None, help="generator (default: the exporting one)")
    tr.add_argument("--data", choices=DATA_SETS, default=None, help="score on this set (default: the GAN's)")
    cu = sub.add_parser("curve", help="few-label curve: N oracle-annotated samples vs N real labels")
    cu.add_argument("data", choices=DATA_SETS, help="data set (horses / folder: fold 0)")
    cu.add_argument("--checkpoint", type=existing_file, default=None, help="default runs/annotate-gan-<data>/...")
    cu.add_argument("--ns", default="1,2,5,10,20", help="numbers of annotated images (default 1,2,5,10,20)")
    cu.add_argument("--seeds", type=positive_int, default=2, help="seeds per N (default 2)")
    cu.add_argument("--oracle", type=existing_file, default=None, help="saved oracle segmenter (default: train)")
    cu.add_argument("--oracle-steps", type=positive_int, default=300, help="oracle training steps (default 300)")
    cu.add_argument("--test-limit", type=positive_int, default=None, help="score on the first N test images")
    pl = sub.add_parser("plot", help="(re)draw curve.png from a curve's curve.json (needs matplotlib)")
    pl.add_argument("curve", type=existing_file, help="a curve.json written by `annotate curve`")
    pl.set_defaults(run=run_plot, parser=pl)
    for q, default_out in ((gan, "runs/annotate-gan-<data>"), (ex, None), (tr, "DIR/result"),
                           (cu, "runs/annotate-curve-<data>")):
        q.add_argument("--out", required=default_out is None, help=f"output folder (default {default_out})")
    for q, steps, decoder_steps, synthetic in ((tr, 1000, 300, 2000), (cu, 100, 100, 400)):
        q.add_argument("--steps", type=positive_int, default=steps, help=f"segmenter steps (default {steps})")
        q.add_argument("--width", type=positive_int, default=8, help="U-Net base width (default 8)")
        q.add_argument("--decoder-steps", type=positive_int, default=decoder_steps,
                       help=f"decoder steps (default {decoder_steps})")
        q.add_argument("--synthetic", type=positive_int, default=synthetic, help=f"pairs (default {synthetic})")
    for q in (gan, tr, cu):
        add_data_arguments(q, "batch size (default 16 for the GAN, 8 for segmenters)")
    for q, run in ((gan, run_gan), (ex, run_export), (tr, run_train), (cu, run_curve)):
        q.set_defaults(run=run, parser=q)


def run_gan(args):
    from minseg.cli_args import load
    from minseg.commands import parse_overrides
    from minseg.train import rng_state, save_checkpoint, seed_everything, training_loop
    check_root(args.parser, args)
    (over,) = parse_overrides(args.set, {f.name for f in fields(PlainConfig)})
    cfg = PlainConfig(**{**({"size": args.size} if args.size else {}), **over})
    args.size, out = cfg.size, Path(args.out or f"runs/annotate-gan-{args.data}")
    train_set = load(args, splits_for(args.data, 0)[0])
    print(train_set)
    seed_everything(args.seed)
    method, state = PlainGAN(cfg, args.device), {"images_seen": 0}
    save_state = lambda: save_checkpoint(out / "checkpoint.pt", dict(
        method=method.state_dict(), state=dict(state), rng=rng_state(), config=asdict(cfg), generator="plain",
        data=args.data, root=args.root and os.path.abspath(args.root)))
    batches = train_set.sampler(args.batch_size or 16, augment=True, device=args.device)
    training_loop(method, batches, state, args.gan_images, out, save_state, progress=not args.quiet, desc="gan")
    print(f"generator: {out}/checkpoint.pt (next: python run.py annotate export --checkpoint {out}/checkpoint.pt "
          "--out DIR)")
    return 0


def run_export(args):
    gen = load_generator(args.checkpoint)
    stems = export(gen, args.n, args.out, args.seed)
    print(f"wrote {len(stems)} samples to {args.out}/images/. Paint each as {args.out}/masks/<same name>.png "
          f"({gen.size}x{gen.size}, 255 = object, 0 = background, other values = ignore), then run\n"
          f"    python run.py annotate train --dir {args.out}")
    return 0


def run_train(args):
    from minseg.cli_args import load
    from minseg.nets import build_net
    from minseg.pipeline import finish
    meta, labels = read_annotations(args.dir)
    gen = load_generator(args.checkpoint or meta["checkpoint"])
    args.data, args.root, args.size = args.data or meta.get("data"), args.root or meta.get("root"), gen.size
    if args.data is None:
        raise ValueError("no data set to score on: pass --data (the generator's checkpoint does not name one)")
    check_root(args.parser, args)
    images, features = gen(meta["latents"])
    exported = np.stack([np.asarray(Image.open(Path(args.dir) / "images" / f"{s}.png")) for s in meta["stems"]])
    if np.abs(exported.astype(np.float32) - as_uint8(images)).mean() > 1:
        raise ValueError(f"the generator {gen.meta['checkpoint']} does not reproduce the images in {args.dir}/images "
                         "(was it retrained?); pass the exporting checkpoint with --checkpoint")
    decoder = fit_decoder(features, labels, args.decoder_steps, seed=args.seed)
    fit = (decode(decoder, features, gen.size) == labels)[labels != IGNORE].float().mean().item()
    print(f"decoder: {len(labels)} annotated samples, {100 * fit:.1f} % of their painted pixels reproduced")
    out = Path(args.out or Path(args.dir) / "result")
    synthetic = synthesize(gen, decoder, args.synthetic, seed=args.seed, name=f" ({len(labels)} annotated)")
    shown = synthetic.batch(list(range(min(12, len(synthetic)))))
    save_grid([shown["image"], overlay(shown["image"], shown["mask"])], out / "synthetic.png")
    test_set = load(args, "all" if args.data in ("horses", "folder") else "test")
    finish("annotation", synthetic, test_set, out, net=build_net("unet", width=args.width), steps=args.steps,
           batch_size=args.batch_size or 8, device=args.device, extra={"annotated": len(labels), "decoder_fit": fit})
    return 0


def run_curve(args):
    from minseg.cli_args import load
    from minseg.metrics import format_table
    from minseg.segmenter import load_segmenter, save_segmenter, supervised_baseline
    check_root(args.parser, args)
    ns = sorted({int(v) for v in args.ns.split(",") if v.isdigit() and int(v) > 0})
    if len(ns) != len(args.ns.split(",")):
        args.parser.error(f"argument --ns: expected distinct positive integers separated by commas, got {args.ns!r}")
    checkpoint = args.checkpoint or f"runs/annotate-gan-{args.data}/checkpoint.pt"
    gen, start = load_generator(checkpoint), time.time()
    args.size, out, bs = gen.size, Path(args.out or f"runs/annotate-curve-{args.data}"), args.batch_size or 8
    out.mkdir(parents=True, exist_ok=True)
    train_split, test_split = splits_for(args.data, 0)
    train_set, test_set = load(args, train_split), load(args, test_split)
    test_set = test_set.subset(range(min(args.test_limit, len(test_set)))) if args.test_limit else test_set
    if args.oracle:
        oracle = load_segmenter(args.oracle)
        oracle_scores = oracle.meta.get("scores", {})
    else:
        oracle, oracle_scores = supervised_baseline(train_set, test_set, steps=args.oracle_steps, batch_size=bs,
                                                    seed=args.seed, progress=False, width=args.width)
        oracle_scores = {k: oracle_scores[k] for k in ("acc", "iou", "miou")}
        save_segmenter(out / "oracle.pt", oracle, {"scores": oracle_scores, "steps": args.oracle_steps})
    print(f"oracle (all {len(train_set):,} real labels, {time.time() - start:.0f} s): test IoU "
          f"{oracle_scores.get('iou', float('nan')):.3f}", flush=True)
    runs = few_label_curve(gen, oracle, train_set, test_set, ns, [args.seed + s for s in range(args.seeds)],
                           steps=args.steps, width=args.width, batch_size=bs, decoder_steps=args.decoder_steps,
                           synthetic=args.synthetic)
    stat = lambda f, route, n, key: float(f([r[key] for r in runs if (r["route"], r["n"]) == (route, n)]))
    cell = lambda route, n, key: f"{100 * stat(np.mean, route, n, key):.1f} +- {100 * stat(np.std, route, n, key):.1f}"
    rows = [dict(N=n, decoder_iou=cell("decoder", n, "iou"), real_iou=cell("real", n, "iou"),
                 decoder_acc=cell("decoder", n, "acc"), real_acc=cell("real", n, "acc"),
                 decoder_vs_oracle_iou=cell("decoder", n, "decoder_vs_oracle_iou")) for n in ns]
    rows.append(dict(N="ceiling: oracle labels the synthetic set", decoder_iou=cell("oracle-labelled", None, "iou"),
                     decoder_acc=cell("oracle-labelled", None, "acc")))
    rows.append(dict(N=f"oracle: all {len(train_set):,} real", real_iou=f"{100 * oracle_scores.get('iou', 0):.1f}",
                     real_acc=f"{100 * oracle_scores.get('acc', 0):.1f}"))
    settings = dict(steps=args.steps, width=args.width, batch_size=bs, decoder_steps=args.decoder_steps,
                    synthetic=args.synthetic, seeds=args.seeds)
    table = format_table(rows, f"{test_set.protocol}; {', '.join(f'{k} {v}' for k, v in settings.items())}; "
                               "mean +- std over seeds")
    command, wall = "python run.py " + " ".join(args.argv), time.time() - start
    (out / "curve.json").write_text(json.dumps(dict(command=command, data=args.data, checkpoint=checkpoint,
                                                    protocol=test_set.protocol,
                                                    oracle=oracle_scores, ns=ns, settings=settings, runs=runs,
                                                    wall_s=round(wall, 1)), indent=2))
    (out / "curve.md").write_text(f"`{command}` ({wall:.0f} s)\n\n{table}\n")
    plot_curve(out / "curve.json")
    print(f"{table}\nwrote {out}/curve.md, curve.json" + (", curve.png" if (out / "curve.png").exists() else ""))
    return 0


def run_plot(args):
    path = plot_curve(args.curve)
    print(f"wrote {path}" if path else "no plot written")
    return 0 if path else 1
