"""Argument types and the data-set options every command shares (`minseg/cli.py`, `minseg/commands.py`).

Each type turns a bad value into an argparse error that names the argument and says what to fix.
"""

import argparse
import os

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


def non_negative_int(text):
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def device_name(text):
    """A torch device this machine has: cpu, cuda, cuda:N (checked before any data is loaded)."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) sees no CUDA GPU; "
                                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} GPU(s) visible "
                                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu" and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: not usable here; use cpu or cuda[:N]")
    return text


def output_dir(text):
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; name a folder for the run's outputs (created if missing)")
    return text


def check_settings(cls, values):
    """Check `--set` values against the dataclass `cls`'s field defaults: the same kind of value (bool, int, float,
    tuple of numbers, text; None where the field's type allows it), finite numbers, ints >= 1 (>= 0 for margins and
    fields off at 0), schedule numbers positive. Returns the values (lists as tuples); a ValueError names the setting
    and what it expects."""
    import dataclasses
    import math
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    optional = {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}  # e.g. `int | None = 128`
    out = {}
    for name, value in values.items():
        default = defaults[name]
        if value is None and name in optional:
            out[name] = None
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)

        def bad(expected):
            return ValueError(f"--set {name}={value!r}: expected {expected} (default {default!r})")
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise bad("True or False")
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad("an integer")
            lowest = 0 if "margin" in name or default == 0 else 1  # a field off at 0 may be set to 0
            if value < lowest:
                raise bad(f"an integer >= {lowest}")
        elif isinstance(default, float):
            if not number or not math.isfinite(value):
                raise bad("a finite number")
            if cls.__name__.endswith("Schedule") and value <= 0:
                raise bad("a positive number")
        elif isinstance(default, tuple):
            if not isinstance(value, (tuple, list)) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise bad("a tuple of numbers, e.g. (0.5, 0.999)")
            value = tuple(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise bad("text")
        out[name] = value
    return out


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
    parser.add_argument("--device", type=device_name, default="cpu", help="torch device (default cpu)")


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
    recalls = {k: v for k, v in scores.items() if k.startswith("recall_")}  # per GT part, where the set has parts
    return dict(run=name, **{k: scores[k] for k in SCORES}, images=scores["n_images"], **recalls)
