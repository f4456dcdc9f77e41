"""The `python run.py annotate gan | export | train | curve | plot` commands of GAN annotation: argument parsing
and the steps each command runs; the method itself (frozen generator, decoder, synthetic set, curve) is
`minseg/methods/annotation.py`."""

import json
import os
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from PIL import Image

from minseg.cli_args import (DATA_SETS, add_data_arguments, check_root, existing_dir, existing_file, positive_int,
                             splits_for)
from minseg.methods.annotation import (IGNORE, decode, export, few_label_curve, fit_decoder, load_generator,
                                       read_annotations, synthesize)
from minseg.methods.plain_gan import PlainConfig, PlainGAN
from minseg.visual import as_uint8, overlay, plot_curve, save_grid


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
