"""Command line: `python run.py <command> ...` (same as `python -m minseg ...`).

    eval        score a saved segmenter on a data set split and print a table naming the protocol
    supervised  train and score the supervised baseline (the upper bound of every method)

Each command is a pair of functions: `add_<command>(subparsers)` declares its arguments and sets `run`, and
`run_<command>(args) -> int` does the work. To add a command, write such a pair and list `add_<command>` in
COMMANDS. Bad arguments are argparse errors naming the argument (exit code 2, no traceback).
"""

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from minseg.metrics import format_table
from minseg.nets import NETS

DATA_SETS = ("shapes", "horses", "folder", "cub")
NEEDS_ROOT = ("horses", "folder", "cub")
FOLDS = 5
SCORES = ("acc", "iou", "miou", "per_image_iou", "per_image_acc")


# ------------------------------------------------------------------------------------- argument types

def positive_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def image_size(text):
    value = _int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be an image size >= 8 px, got {text}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"file {text} does not exist")
    return text


def existing_dir(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"folder {text} does not exist")
    return text


def fold_choice(text):
    if text == "all":
        return text
    value = _int(text)
    if not 0 <= value < FOLDS:
        raise argparse.ArgumentTypeError(f"must be 0..{FOLDS - 1} or 'all', got {text}")
    return value


def add_data_arguments(parser, split_help):
    parser.add_argument("--root", type=existing_dir, help="data folder (required for horses, folder, cub)")
    parser.add_argument("--size", type=image_size, default=None, help="image size in px (default 64)")
    parser.add_argument("--protocol", choices=("P2", "P4", "P5", "box"), default=None,
                        help="cropping protocol (cub: default P2; shapes: box or none)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N images of a split")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed (default 0)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help=split_help)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def check_root(parser, args):
    if args.data in NEEDS_ROOT and args.root is None:
        parser.error(f"argument --root: required for --data {args.data} (a folder with the data set)")


def load(args, split):
    from minseg.data import load_dataset  # imported here: `--help` stays fast
    return load_dataset(args.data, split=split, size=args.size or 64, root=args.root, protocol=args.protocol,
                        seed=args.seed, limit=args.limit)


def splits_for(data, fold):
    """(train split, test split) names of a data set; fold picks the k-fold split of horses / folder."""
    if data in ("horses", "folder"):
        return f"fold{fold}-train", f"fold{fold}-test"
    return "train", "test"


def score_row(name, scores):
    return dict(run=name, **{k: scores[k] for k in SCORES}, images=scores["n_images"])


# ------------------------------------------------------------------------------------------------- eval

def add_eval(subparsers):
    p = subparsers.add_parser("eval", help="score a saved segmenter on a data set split")
    p.add_argument("--checkpoint", type=existing_file, required=True, help="segmenter file (save_segmenter)")
    p.add_argument("--data", choices=DATA_SETS, required=True, help="data set to score on")
    p.add_argument("--split", default=None, help="split (default: test; 'all' for horses / folder)")
    add_data_arguments(p, "images per forward pass (default 64)")
    p.set_defaults(run=run_eval, parser=p)


def run_eval(args):
    from minseg.segmenter import evaluate_segmenter, load_segmenter
    check_root(args.parser, args)
    net = load_segmenter(args.checkpoint, device=args.device)
    args.size = args.size or net.meta.get("size", 64)
    split = args.split or ("all" if args.data in ("horses", "folder") else "test")
    ds = load(args, split)
    scores = evaluate_segmenter(net, ds, batch_size=args.batch_size or 64)
    print(format_table([score_row(os.path.basename(args.checkpoint), scores)], ds.protocol))
    return 0


# ------------------------------------------------------------------------------------------- supervised

def add_supervised(subparsers):
    p = subparsers.add_parser("supervised", help="train and score the supervised baseline (upper bound)")
    p.add_argument("data", choices=DATA_SETS, help="data set")
    p.add_argument("--steps", type=positive_int, default=2000, help="training steps (default 2000)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--net", choices=sorted(NETS), default="unet", help="segmenter (default unet)")
    p.add_argument("--width", type=positive_int, default=None, help="segmenter base width (default: the net's)")
    p.add_argument("--fold", type=fold_choice, default="all",
                   help=f"horses / folder: fold 0..{FOLDS - 1} or 'all' (default: all, mean +- std)")
    p.add_argument("--out", default=None, help="output folder (default runs/supervised-<data>)")
    add_data_arguments(p, "training batch size (default 32)")
    p.set_defaults(run=run_supervised, parser=p)


def run_supervised(args):
    from minseg.segmenter import save_segmenter, supervised_baseline
    check_root(args.parser, args)
    if args.data not in ("horses", "folder") and args.fold != "all":
        args.parser.error(f"argument --fold: only horses / folder have folds, not {args.data}")
    folds = ([None] if args.data not in ("horses", "folder")
             else list(range(FOLDS)) if args.fold == "all" else [args.fold])
    out = args.out or os.path.join("runs", f"supervised-{args.data}")
    os.makedirs(out, exist_ok=True)
    net_kwargs = {} if args.width is None else dict(width=args.width)
    runs, rows, protocol = [], [], ""
    for fold in folds:
        train_split, test_split = splits_for(args.data, fold)
        ds_train, ds_test = load(args, train_split), load(args, test_split)
        protocol = ds_test.protocol
        suffix = "" if fold is None else f"-fold{fold}"
        start = time.time()
        net, scores = supervised_baseline(ds_train, ds_test, net=args.net, steps=args.steps,
                                          batch_size=args.batch_size or 32, lr=args.lr, seed=args.seed,
                                          log_path=os.path.join(out, f"train{suffix}.jsonl"), device=args.device,
                                          **net_kwargs)
        wall = time.time() - start
        checkpoint = os.path.join(out, f"segmenter{suffix}.pt")
        save_segmenter(checkpoint, net, dict(data=args.data, train_split=train_split, test_split=test_split,
                                             size=ds_test.size, protocol=protocol, steps=args.steps,
                                             scores={k: scores[k] for k in SCORES}))
        runs.append(dict(fold=fold, train_split=train_split, test_split=test_split, n_train=len(ds_train),
                         wall_s=round(wall, 1), checkpoint=checkpoint, **scores))
        rows.append(score_row(test_split if fold is None else f"fold {fold}", scores) | dict(train_s=f"{wall:.0f}"))
    summary = {k: dict(mean=float(np.mean([r[k] for r in runs])), std=float(np.std([r[k] for r in runs])))
               for k in SCORES}
    if len(runs) > 1:
        rows.append(dict(run=f"mean +- std ({len(runs)} folds)",
                         **{k: f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f}" for k, v in summary.items()}))
    command = "python run.py " + shlex.join(args.argv)
    shape = ", ".join(f"{k} {v}" for k, v in net.config.items() if k not in ("num_classes", "in_channels"))
    heading = f"{protocol}; supervised {args.net} ({shape}), {args.steps} steps, batch {args.batch_size or 32}"
    table = format_table(rows, heading)
    results = dict(command=command, data=args.data, protocol=protocol, net=args.net, config=net.config,
                   steps=args.steps, batch_size=args.batch_size or 32, lr=args.lr, seed=args.seed, runs=runs,
                   summary=summary)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"`{command}`\n\n{table}\n" + ("\nstd over folds: population std (ddof 0).\n" if len(runs) > 1 else ""))
    print(table)
    print(f"wrote {out}/results.json, results.md, segmenter*.pt")
    return 0


# ------------------------------------------------------------------------------------------------- main

COMMANDS = (add_eval, add_supervised)


def build_parser():
    parser = argparse.ArgumentParser(prog="run.py", description="minseg: segmentation learned by generating images")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None):
    """Parse `argv` (default sys.argv[1:]), run the command, return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.argv = argv
        if args.threads:
            torch.set_num_threads(args.threads)
        return args.run(args)
    except SystemExit as exit:  # argparse errors (2) and --help (0)
        return exit.code if isinstance(exit.code, int) else 1
    except (ValueError, FileNotFoundError) as err:  # bad data folders, splits, checkpoints: say what, no traceback
        print(f"run.py {argv[0]}: error: {err}", file=sys.stderr)
        return 2
