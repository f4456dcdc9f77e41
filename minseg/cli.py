"""Command line: `python run.py <command> ...` (same as `python -m minseg ...`).

    shapes | horses | folder | cub   train a method on a data set, then a segmenter on its pairs, and score it
    hoc         independence prior, application 2: instances learned from one cluster picture
    annotate    GAN annotation: export samples to paint, fit the decoder, label a synthetic set
    eval        score a saved segmenter on a data set split and print a table naming the protocol
    supervised  train and score the supervised baseline (the upper bound of every method)
    summarize   one table of many runs (seeds, ablations): how each ended and its scores

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

from minseg.cli_args import (DATA_SETS, FOLDS, SCORES, add_data_arguments, check_root, existing_file, fold_choice,
                             load, output_dir, positive_float, positive_int, score_row, splits_for)
from minseg.commands import add_annotate, add_hoc, add_method_runs
from minseg.metrics import format_table
from minseg.nets import NETS


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


# -------------------------------------------------------------------------------------------- baselines

def add_baselines(subparsers):
    p = subparsers.add_parser("baselines", help="trivial baselines on a split: all foreground, centre prior, "
                                                "best colour threshold")
    p.add_argument("data", choices=DATA_SETS, help="data set")
    p.add_argument("--split", default=None, help="split (default: test; 'all' for horses / folder)")
    add_data_arguments(p, "unused")
    p.set_defaults(run=run_baselines, parser=p)


def run_baselines(args):
    """How far a segmenter must get to beat no learning at all (dataset-level fg IoU)."""
    from minseg.data.shapes import difficulty
    check_root(args.parser, args)
    ds = load(args, args.split or ("all" if args.data in ("horses", "folder") else "test"))
    if ds.masks is None:
        raise ValueError(f"{ds.protocol}: no masks to score baselines against")
    d = difficulty(ds.masks, ds.images)
    rows = [dict(run="all foreground", iou=d["all_foreground_iou"]),
            dict(run="centre prior (disk of the mean fg area)", iou=d["centre_prior_iou"]),
            dict(run=f"best global colour threshold ({d['best_threshold_rule']})", iou=d["best_threshold_iou"])]
    print(format_table(rows, f"{ds.protocol}; foreground covers {100 * d['coverage']:.1f} %; dataset-level IoU"))
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
    p.add_argument("--out", type=output_dir, default=None, help="output folder (default runs/supervised-<data>)")
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


# -------------------------------------------------------------------------------------------- summarize

def add_summarize(subparsers):
    p = subparsers.add_parser("summarize", help="one table of many runs: how each ended (finished, collapsed, "
                                                "stopped) and its scores")
    p.add_argument("folders", nargs="+", help="run folders, or folders holding run folders (e.g. runs/mi-ablation)")
    p.set_defaults(run=run_summarize, parser=p)


def run_summary(folder):
    """One row for a run folder: its end (from results.json, or the last stats.jsonl record) and its scores."""
    from pathlib import Path
    from minseg.train import read_stats
    folder = Path(folder)
    records = [record for _, record in read_stats(folder / "stats.jsonl")]
    ticks = [r for r in records if "event" not in r and "mask_mean" in r]
    collapse = [r for r in records if r.get("event") == "collapse"]
    row = {"run": folder.name}
    if (folder / "results.json").is_file():
        results = json.loads((folder / "results.json").read_text())
        row["end"] = "finished"
        row.update({k: results[k] for k in SCORES if k in results})
    elif collapse:
        row["end"] = f"collapsed at {collapse[-1]['images']:,} images ({collapse[-1]['message']})"
    else:
        row["end"] = f"stopped at {records[-1]['images']:,} images" if records else "no records"
    if ticks:
        row["last_mask_mean"] = ticks[-1]["mask_mean"]
    return row


def run_summarize(args):
    from pathlib import Path
    runs = []
    for given in map(Path, args.folders):
        if not given.is_dir():
            args.parser.error(f"argument folders: {given} is not a folder")
        runs += [given] if (given / "stats.jsonl").is_file() else sorted(p.parent for p in given.glob("*/stats.jsonl"))
    if not runs:
        args.parser.error(f"argument folders: no run folder (one holding stats.jsonl) in {' '.join(args.folders)}")
    rows = [run_summary(folder) for folder in runs]
    protocols = {json.loads((f / "results.json").read_text())["protocol"] for f in runs if (f / "results.json").is_file()}
    print(format_table(rows, "; ".join(sorted(protocols)) or "no finished run"))
    return 0


# ------------------------------------------------------------------------------------------------- main

COMMANDS = (add_method_runs, add_hoc, add_annotate, add_eval, add_baselines, add_supervised, add_summarize)


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
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.run(args)
    except SystemExit as exit:  # argparse errors (2) and --help (0)
        return exit.code if isinstance(exit.code, int) else 1
    except KeyboardInterrupt:
        print("\nrun.py: interrupted; a training run continues from its last checkpoint with --resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:  # bad data folders, splits, checkpoints: say what, no traceback
        print(f"run.py {argv[0]}: error: {err}", file=sys.stderr)
        return 2
