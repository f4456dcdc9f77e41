"""Any folder of pictures with optional masks, e.g. the Weizmann horses (../shared/data/weizmann-horses).

Layout: ROOT/images/<stem>.<jpg|jpeg|png|bmp|webp> and, optionally, ROOT/masks/<stem>.<png|...>
(8-bit, foreground = value > 127, same size as its image). Without masks/ the set is for unsupervised
training only. Boxes are the tight boxes of the masks.

Splits: "all" (default: the transductive protocol of such sets, learn from every picture without
its mask and score against every mask), or "fold{k}-train" / "fold{k}-test" for k in 0..4: a fixed
5-fold split of the sorted file names, from a fixed permutation seed (independent of `seed`).
Default cropping: the whole picture squashed to S x S ("P5"); "P2", "P4" and "box" work as for CUB
(P4 and box need masks, to derive the boxes).
"""
from pathlib import Path

import numpy as np

from minseg.data.base import PROTOCOLS, FileItem, load_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NUM_FOLDS = 5
FOLD_SEED = 0


def _pictures(directory):
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def fold_indices(n, split):
    """Indices (sorted) of the `split` ("all", "fold{k}-train" / "fold{k}-test") of n sorted files."""
    if split == "all":
        return np.arange(n)
    valid = ["all"] + [f"fold{k}-{part}" for k in range(NUM_FOLDS) for part in ("train", "test")]
    if split not in valid:
        raise ValueError(f"folder split must be one of {valid}, got {split!r}")
    fold, part = int(split[4]), split.split("-")[1]
    order = np.random.RandomState(FOLD_SEED).permutation(n)
    test = np.sort(np.array_split(order, NUM_FOLDS)[fold])
    return test if part == "test" else np.setdiff1d(np.arange(n), test)


def load_folder(root, split="all", size=64, protocol="P5", limit=None, kind="folder"):
    """Load images/ (+ masks/) under root as a dict of SegmentationSet fields."""
    if root is None:
        example = " e.g. ../shared/data/weizmann-horses" if kind == "horses" else ""
        raise ValueError(f"the {kind} data set needs its location: pass --data PATH (root=PATH),{example} "
                         "a directory holding images/ and optionally masks/")
    protocol = protocol or "P5"
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind} root {root} does not exist; expected a directory with images/"
                                "<stem>.jpg|png and optionally masks/<stem>.png")
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"no images/ directory in {root}; expected {image_dir}/<stem>.jpg|png "
                                f"(and optionally {mask_dir}/<stem>.png)")
    pictures = _pictures(image_dir)
    if not pictures:
        raise FileNotFoundError(f"no pictures ({', '.join(IMAGE_EXTENSIONS)}) in {image_dir}")
    has_masks = mask_dir.is_dir()
    if protocol in ("P4", "box") and not has_masks:
        raise ValueError(f"protocol {protocol!r} crops around boxes derived from masks, but {mask_dir} "
                         "does not exist; use P5 or P2, or add the masks")
    masks_by_stem = {}
    if has_masks:
        for p in _pictures(mask_dir):
            masks_by_stem.setdefault(p.stem, p)
    chosen = [pictures[i] for i in fold_indices(len(pictures), split)]
    chosen = chosen[:limit] if limit is not None else chosen
    items = []
    for picture in chosen:
        mask_path = None
        if has_masks:
            if picture.stem not in masks_by_stem:
                raise FileNotFoundError(f"mask file {mask_dir / (picture.stem + '.png')} for image "
                                        f"{picture} is missing (every image needs a mask with the same "
                                        f"stem once {mask_dir} exists)")
            mask_path = str(masks_by_stem[picture.stem])
        items.append(FileItem(name=picture.stem, image_path=str(picture), mask_path=mask_path))
    out = load_files(items, size, protocol, desc=f"{kind} {split}")
    out["protocol"] = (f"{kind} {root.name} {split} ({len(out['names']):,} images"
                       f"{'' if has_masks else ', no masks'}), {PROTOCOLS[protocol]}, {size} px")
    return out
