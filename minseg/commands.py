"""The method commands of the command line (`minseg/cli.py` assembles them with eval and supervised).

    python run.py shapes|horses|folder|cub [--method ilsgan|ganseg|independence] [--schedule quick|paper|...]
    python run.py hoc [--image PATH] [--preset seeds|fruit|crowd]
    python run.py annotate export|train ...                      (GAN annotation; see minseg/annotate_cli.py)

A run writes everything under one folder (default runs/<method>-<data>): sample grids, stats.jsonl, an atomic
checkpoint after every snapshot (`--resume` continues from it), and at the end results.md / results.json
naming the protocol. `--set name=value` overrides any field of the method's config or schedule (the papers'
ablations: `--set g_mi=0`, `--set mask_size_loss=True`, `--set perturb=False`, `--set rounds=5`, ...).
"""

import ast
import dataclasses
import os
import shutil

import torch

from minseg import distributed
from minseg.cli_args import (add_data_arguments, check_root, check_settings, device_name, existing_file, load,
                             non_negative_int, output_dir, positive_int)

METHODS = ("ilsgan", "ganseg", "independence")
CUB_LAYOUT = """CUB-200-2011 is not downloaded by minseg (it never downloads anything). Unpack the official archives
CUB_200_2011.tgz and segmentations.tgz into one folder, so that it holds
    ROOT/CUB_200_2011/images/<class>/<name>.jpg, images.txt, bounding_boxes.txt, image_class_labels.txt,
                     train_test_split.txt, parts/part_locs.txt
    ROOT/segmentations/<class>/<name>.png
(optionally ROOT/train_val_test_split.txt, the 10,000/788/1,000 split of the literature), then run
    python run.py cub --root ROOT
To try minseg without any download: python run.py shapes"""


def method_module(name):
    from minseg.methods import ganseg, ilsgan, independence
    return {"ilsgan": ilsgan, "ganseg": ganseg, "independence": independence}[name]


def parse_overrides(pairs, *dataclasses_):
    """["g_mi=0", "rounds=5"] -> one dict per dataclass; values are Python literals (0, 1e-3, True, (0.7, 1.3))."""
    out = [{} for _ in dataclasses_]
    for pair in pairs or ():
        name, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--set {pair!r}: expected name=value, e.g. --set g_mi=0")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word, e.g. a file name
        for fields, target in zip(dataclasses_, out):
            if name in fields:
                target[name] = value
                break
        else:
            known = sorted(set().union(*dataclasses_))
            raise ValueError(f"--set {name}: no such setting; known: {', '.join(known)}")
    return out


# ------------------------------------------------------------------------------ method runs on a data set

def add_method_runs(subparsers):
    for data in ("shapes", "horses", "folder", "cub"):
        p = subparsers.add_parser(data, help=f"train a method on {data}, then a segmenter on its pairs; score it")
        p.add_argument("--method", choices=METHODS, default="ilsgan", help="method (default ilsgan)")
        p.add_argument("--schedule", default="quick",
                       help="quick (CPU, default), paper, paper-alternate (ilsgan): lengths in images seen")
        p.add_argument("--gan-images", type=positive_int, default=None, help="images seen by D (per round)")
        p.add_argument("--final-steps", type=positive_int, default=None, help="steps of the final segmenter")
        p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a config/schedule field")
        p.add_argument("--out", type=output_dir, default=None, help="output folder (default runs/<method>-<data>)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
        p.add_argument("--restarts", type=non_negative_int, default=0,
                       help="on a collapse (mask all fg / all bg), restart this many times from a fresh seed")
        p.add_argument("--quiet", action="store_true", help="one status line per tick instead of a progress bar")
        add_data_arguments(p, "GAN batch size (default: the schedule's)")
        p.set_defaults(run=run_method, parser=p, data=data)


def method_settings(args):
    """(config, schedule) of args.method on args.data: preset, then --schedule, --gan-images, --set."""
    module = method_module(args.method)
    data_key = "horses" if args.data == "folder" else args.data  # an image folder takes the horses settings
    preset = dict(module.PRESETS.get(data_key, {}))
    config_cls = {"ilsgan": "ILSGANConfig", "ganseg": "GANSegConfig", "independence": "IndependenceConfig"}
    config_cls = getattr(module, config_cls[args.method])
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    schedule_fields = {f.name for f in dataclasses.fields(module.Schedule)}
    config_over, schedule_over = parse_overrides(args.set, config_fields, schedule_fields)
    config_over, schedule_over = check_settings(config_cls, config_over), check_settings(module.Schedule, schedule_over)
    if args.size is not None:
        old = preset.get("size", config_cls.size)
        if args.method == "ganseg" and args.size != old:  # the same pyramid, scaled to the new size
            preset.update(resolutions=tuple(r * args.size // old for r in preset.get("resolutions",
                                                                                    config_cls.resolutions)))
        preset["size"] = args.size
    cfg = config_cls(**{**preset, **config_over})
    steps_key = "distill_steps" if args.method == "independence" else "final_steps"
    flags = {"gan_images": ("--gan-images", args.gan_images), "batch_size": ("--batch-size", args.batch_size),
             steps_key: ("--final-steps", args.final_steps)}
    for name, (flag, value) in flags.items():  # a flag and --set of the same field: one value, given once
        if name in schedule_over and value is not None:
            args.parser.error(f"{flag} and --set {name}=... both set {name}; give it once")
        schedule_over.setdefault(name, value)
    schedule = module.make_schedule(args.schedule, data_key, **schedule_over)
    return cfg, schedule


def run_method(args):
    from minseg.train import CollapseError
    if args.data == "cub" and args.root is None:
        print(CUB_LAYOUT)
        return 2
    check_root(args.parser, args)
    args.device = distributed.init(args.device)  # under torchrun: join the process group, this rank's device
    if args.method not in ("ilsgan",) and args.schedule == "paper-alternate":
        args.parser.error("argument --schedule: paper-alternate is ilsgan's alternate training only")
    cfg, schedule = method_settings(args)
    args.size = cfg.size
    out = args.out or os.path.join("runs", f"{args.method}-{args.data}")
    module = method_module(args.method)
    protocol = "box" if args.method == "independence" else args.protocol
    train_set = load_with_protocol(args, "train", protocol)
    test_set = load_with_protocol(args, "test", protocol)
    report_loaded(train_set, test_set)
    if test_set.masks is None:
        raise ValueError(f"the test split has no masks to score against ({test_set.protocol}); "
                         "give a folder with masks/ next to images/")
    kwargs = dict(device=args.device, progress=not args.quiet)
    if args.method == "independence":
        kwargs["background_set"] = module.load_background_set(args.data, cfg.size, args.root, args.limit, args.seed)
    seed, resume = args.seed, args.resume
    for attempt in range(args.restarts + 1):
        try:
            metrics = module.run(cfg, schedule, train_set, test_set, out, seed=seed, resume=resume, **kwargs)
            break
        except CollapseError as collapse:
            if attempt == args.restarts:
                print(f"run.py {args.data}: the generator collapsed: {collapse}.\n"
                      f"Rerun with --restarts N to restart from a fresh seed automatically (ReDO restarts ~35 % of "
                      f"its runs), or another --seed. The collapsed run's samples are in {out}/samples.")
                return 3
            seed += 1000
            print(f"collapse: {collapse}; restarting from a fresh seed {seed} ({attempt + 1}/{args.restarts})")
            if distributed.is_main():
                shutil.move(out, f"{out}-collapsed-{attempt}")
            distributed.barrier()
            resume = False
    print(f"results: {out}/results.md  (seed {seed})")
    return 0 if metrics is not None else 1


def load_with_protocol(args, split, protocol):
    saved, args.protocol = args.protocol, protocol
    try:
        return load(args, split)
    finally:
        args.protocol = saved


def report_loaded(*sets):
    for ds in sets:
        print(ds)
        for line in ds.notes:
            print(f"  note: {line}")
        if ds.skipped:
            print(f"  skipped {len(ds.skipped)} unreadable file(s), e.g. {ds.skipped[0]}")


# -------------------------------------------------------------------------------------------------- hoc

def add_hoc(subparsers):
    p = subparsers.add_parser("hoc", help="independence prior app. 2: instances from one cluster picture")
    p.add_argument("--image", type=existing_file, default=None,
                   help="the picture (default: the built-in synthetic cluster of seeds)")
    p.add_argument("--preset", choices=("seeds", "fruit", "crowd"), default="seeds", help="Table 4 settings")
    p.add_argument("--window", type=positive_int, default=None,
                   help="patch window in px of the picture (~1.5x the largest instance; needed with --image)")
    p.add_argument("--patch-size", type=int, choices=(32, 64, 128), default=None, help="patch px (default 64)")
    p.add_argument("--gan-images", type=positive_int, default=None, help="patches seen by D (default 100,000)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a ClusterConfig/HOCSchedule field")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (default runs/hoc-<preset or picture>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="one status line per tick instead of a progress bar")
    p.set_defaults(run=run_hoc_command, parser=p)


def run_hoc_command(args):
    from minseg.data.base import _open_rgb
    from minseg.data.cluster import make_cluster_image
    from minseg.methods.hoc import HOC_PRESETS, ClusterConfig, HOCSchedule, run_hoc
    cfg_over, schedule_over = parse_overrides(args.set, {f.name for f in dataclasses.fields(ClusterConfig)},
                                              {f.name for f in dataclasses.fields(HOCSchedule)})
    cfg_over, schedule_over = check_settings(ClusterConfig, cfg_over), check_settings(HOCSchedule, schedule_over)
    settings = dict(HOC_PRESETS[args.preset], window=args.window, **cfg_over)
    if args.patch_size:
        settings["size"] = args.patch_size
    cfg = ClusterConfig(**settings)
    schedule = HOCSchedule(**{**({"gan_images": args.gan_images} if args.gan_images else {}), **schedule_over})
    if args.image is None:
        kind = "fruit" if args.preset == "fruit" else "seeds"
        image, masks = make_cluster_image(256, seed=args.seed, kind=kind)
        name = f"builtin-{kind}"
    else:
        if args.window is None:
            args.parser.error("argument --window: required with --image (px, ~1.5x the largest instance)")
        import numpy as np
        try:
            picture = np.asarray(_open_rgb(args.image)[0])
        except (OSError, SyntaxError, ValueError) as err:  # not a picture, truncated, corrupt
            raise ValueError(f"--image {args.image}: not a readable picture ({err})") from None
        image, masks = torch.from_numpy(picture).permute(2, 0, 1).contiguous(), None
        name = os.path.splitext(os.path.basename(args.image))[0]
    out = args.out or os.path.join("runs", f"hoc-{name}")
    args.device = distributed.init(args.device)  # under torchrun: join the process group, this rank's device
    scores = run_hoc(cfg, image, out, instance_masks=masks, schedule=schedule, device=args.device, seed=args.seed,
                     resume=args.resume, progress=not args.quiet)
    if not distributed.is_main():
        return 0
    print(f"one instance per layer: {100 * scores['one_instance']:.1f} %; mean mask area "
          f"{scores['mask_area_px']:.0f} px" + (f" (true instance {scores['true_area_px']:.0f} px)"
                                               if "true_area_px" in scores else ""))
    if "shape_iou" in scores:
        print(f"shape IoU with the true instances {scores['shape_iou']:.2f} (true instances with each other "
              f"{scores['shape_iou_true']:.2f}, a disk {scores['shape_iou_disk']:.2f}); elongation "
              f"{scores['elongation']:.2f} (true {scores['elongation_true']:.2f})")
    print(f"results: {out}/results.md, pictures: {out}/instances.png")
    return 0


# --------------------------------------------------------------------------------------------- annotate

def add_annotate(subparsers):
    from minseg import annotate_cli
    annotate_cli.add_commands(subparsers)
