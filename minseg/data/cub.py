"""CUB-200-2011 (Caltech-UCSD Birds) read from its official layout.

Expected on disk (what the two official archives unpack to):
  ROOT/CUB_200_2011/            from CUB_200_2011.tgz: images/<class dir>/<name>.jpg, images.txt,
                                bounding_boxes.txt, image_class_labels.txt, train_test_split.txt,
                                parts/part_locs.txt (and parts/parts.txt for the keypoint names)
  ROOT/segmentations/           from segmentations.tgz: <class dir>/<name>.png, soft masks, fg > 127
ROOT may also be the CUB_200_2011 directory itself (segmentations/ then sits beside it or inside it).

Splits: with train_val_test_split.txt (the 10,000 / 788 / 1,000 list of the unsupervised-segmentation
literature, `<id> <0|1|2>`, in CUB_200_2011/ or ROOT) "train", "val", "test"; without it the official
train_test_split.txt (5,994 / 5,794) gives "train" and "test"; "all" is every image. Cropping
protocols P2 (default), P4, P5, box: see minseg.data.base. Labels are the 200 classes, 0-based;
keypoints are the 15 part locations mapped through the crop.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minseg.data.base import PROTOCOLS, FileItem, load_files

SPLIT_FILE = "train_val_test_split.txt"
MAX_ID = 10_000_000  # image ids index arrays: bounded, so a corrupt file cannot ask for terabytes
NUM_KEYPOINTS = 15
_LAYOUT_HELP = ("expected ROOT/CUB_200_2011/ (CUB_200_2011.tgz unpacks to it: images/, images.txt, "
                "bounding_boxes.txt, image_class_labels.txt, train_test_split.txt, parts/part_locs.txt) "
                "and ROOT/segmentations/ (segmentations.tgz unpacks to it: <class dir>/<name>.png)")


@dataclass
class CubRecord:
    image_id: int
    path: str               # relative to images/, e.g. "001.Black_footed_Albatross/Black_..._18.jpg"
    box: tuple              # (x0, y0, x1, y1) in the picture's pixels
    label: int              # 0-based class
    split: str              # "train" / "val" / "test" (ReDO split) or "train" / "test" (official)
    keypoints: np.ndarray   # (15, 3) x, y, visible in the picture's pixels


@dataclass
class CubLayout:
    cub_dir: Path
    segmentations: Path | None
    split_file: Path        # the file that defines the splits


def locate(root):
    """Find CUB_200_2011/, segmentations/ and the split file under `root` (see the module docstring)."""
    if root is None:
        raise ValueError("CUB needs its location: pass root (--data PATH), the directory holding "
                         "CUB_200_2011/ and segmentations/")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CUB root {root} does not exist; {_LAYOUT_HELP}")
    if (root / "CUB_200_2011").is_dir():
        cub_dir, base = root / "CUB_200_2011", root
    elif (root / "images.txt").is_file():
        cub_dir, base = root, root.parent
    else:
        raise FileNotFoundError(f"no CUB_200_2011/ in {root} (and {root} holds no images.txt); "
                                f"{_LAYOUT_HELP}")
    segmentations = next((d for d in (base / "segmentations", cub_dir / "segmentations") if d.is_dir()),
                         None)
    for place in (cub_dir / SPLIT_FILE, base / SPLIT_FILE, cub_dir / "train_test_split.txt"):
        if place.is_file():
            return CubLayout(cub_dir, segmentations, place)
    raise FileNotFoundError(f"no split file: expected {cub_dir / 'train_test_split.txt'} (official, in "
                            f"CUB_200_2011.tgz) or {SPLIT_FILE} (the 10,000/788/1,000 split) in {cub_dir} "
                            f"or {base}")


def _require(path, description):
    if not path.is_file():
        raise FileNotFoundError(f"CUB metadata file {path} ({description}) is missing; {_LAYOUT_HELP}")


def _read_numbers(path, columns, description):
    """A table of `<id> <numbers...>` lines -> (rows, 1 + columns) float64 array; ids are integers 1..MAX_ID and
    every number is finite, else a ValueError names the line."""
    _require(path, description)
    text = path.read_text()
    try:
        table = np.array(text.split(), dtype=np.float64).reshape(-1, columns + 1)
        ids = table[:, 0]
        good = (len(table) == sum(1 for line in text.splitlines() if line.split()) and np.isfinite(table).all()
                and (ids == np.round(ids)).all() and ((ids >= 1) & (ids <= MAX_ID)).all())
    except ValueError:
        good = False
    if good:
        return table
    for number, line in enumerate(text.splitlines(), 1):  # find the offending line for the message
        fields = line.split()
        if fields and not (len(fields) == columns + 1 and all(_is_number(f) for f in fields)
                           and _is_id(fields[0])):
            raise ValueError(f"{path} line {number}: expected '<id>' (an integer 1..{MAX_ID}) and {columns} "
                             f"finite number(s), got {line.strip()!r}")
    raise ValueError(f"{path}: expected {columns + 1} numbers a line")


def _is_id(text):
    return text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_ID


def _is_number(text):
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _by_id(table, path, ids):
    """Index the rows of a one-row-per-id table by the image ids of images.txt."""
    lookup = dict(zip(table[:, 0].astype(np.int64).tolist(), range(len(table))))
    missing = [i for i in ids if i not in lookup]
    if missing:
        raise ValueError(f"{path} has no entry for image id {missing[0]} of images.txt "
                         f"({len(missing)} ids missing); the metadata files do not match")
    return table[[lookup[i] for i in ids], 1:]


def read_records(root):
    """Parse the metadata of every image (no pictures are opened). Returns a list of CubRecord."""
    layout = locate(root)
    d = layout.cub_dir
    _require(d / "images.txt", "image id -> relative path")
    paths = {}
    for number, line in enumerate(open(d / "images.txt"), 1):
        fields = line.split()
        if fields and (len(fields) != 2 or not _is_id(fields[0])):
            raise ValueError(f"{d / 'images.txt'} line {number}: expected '<id> <path>', got {line.strip()!r}")
        if fields:
            paths[int(fields[0])] = fields[1]
    ids = sorted(paths)
    boxes = _by_id(_read_numbers(d / "bounding_boxes.txt", 4, "image id -> x y width height"),
                   "bounding_boxes.txt", ids)
    labels = _by_id(_read_numbers(d / "image_class_labels.txt", 1, "image id -> class id"),
                    "image_class_labels.txt", ids)[:, 0]
    splits = _by_id(_read_numbers(layout.split_file, 1, "image id -> split"), layout.split_file.name,
                    ids)[:, 0]
    parts = _read_numbers(d / "parts" / "part_locs.txt", 4, "image id, part id, x, y, visible")
    image_row = np.full(max(ids + [int(parts[:, 0].max(initial=0))]) + 1, -1)
    image_row[ids] = np.arange(len(ids))
    rows = image_row[parts[:, 0].astype(np.int64)]
    part = np.clip(parts[:, 1], 0, NUM_KEYPOINTS + 1).astype(np.int64) - 1  # out-of-range part ids: dropped below
    keep = (rows >= 0) & (part >= 0) & (part < NUM_KEYPOINTS)
    keypoints = np.zeros((len(ids), NUM_KEYPOINTS, 3), dtype=np.float32)
    keypoints[rows[keep], part[keep]] = parts[keep, 2:]
    redo = layout.split_file.name == SPLIT_FILE
    split_names = {0: "train", 1: "val", 2: "test"} if redo else {1: "train", 0: "test"}
    bad = [i for i, v in zip(ids, splits.tolist()) if v not in split_names]
    if bad:
        raise ValueError(f"{layout.split_file}: image id {bad[0]} has split value "
                         f"{splits[ids.index(bad[0])]:g}, expected one of {sorted(split_names)}")
    return [CubRecord(image_id, paths[image_id], (x, y, x + w, y + h), int(label) - 1,
                      split_names[int(split)], keypoints[k])
            for k, (image_id, (x, y, w, h), label, split)
            in enumerate(zip(ids, boxes.tolist(), labels.tolist(), splits.tolist()))]


def keypoint_names(root):
    """The 15 part names from parts/parts.txt, or generic names where that file is absent."""
    path = locate(root).cub_dir / "parts" / "parts.txt"
    if not path.is_file():
        return [f"part{i + 1}" for i in range(NUM_KEYPOINTS)]
    return [" ".join(line.split()[1:]) for line in open(path) if line.strip()]


def load_cub(root, split="train", size=128, protocol="P2", limit=None):
    """Load a CUB split as a dict of SegmentationSet fields (images, masks, boxes, keypoints, ...)."""
    protocol = protocol or "P2"
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown CUB protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    layout = locate(root)
    records = read_records(root)
    available = sorted({r.split for r in records}) + ["all"]
    if split not in available:
        hint = (f" ('val' needs {SPLIT_FILE}, the 10,000/788/1,000 split, in {layout.cub_dir})"
                if split == "val" else "")
        raise ValueError(f"CUB split {split!r} is not available; choose one of {available}{hint}")
    if layout.segmentations is None:
        raise FileNotFoundError(f"no segmentations/ beside or inside {layout.cub_dir}: the masks come "
                                "from the separate segmentations.tgz, which unpacks to segmentations/"
                                "<class dir>/<name>.png; put it next to CUB_200_2011/")
    chosen = [r for r in records if split in ("all", r.split)]
    chosen = chosen[:limit] if limit is not None else chosen
    items = [FileItem(name=os.path.splitext(r.path)[0],
                      image_path=str(layout.cub_dir / "images" / r.path),
                      mask_path=str(layout.segmentations / (os.path.splitext(r.path)[0] + ".png")),
                      box=r.box, keypoints=r.keypoints, label=r.label) for r in chosen]
    out = load_files(items, size, protocol, desc=f"CUB {split}")
    out["keypoint_names"] = keypoint_names(root)
    out["protocol"] = (f"CUB {split} split ({len(out['names']):,} images, {layout.split_file.name}), "
                       f"{PROTOCOLS[protocol]}, {size} px")
    return out
