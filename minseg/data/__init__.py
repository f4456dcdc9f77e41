"""Data sets: built-in synthetic shapes, CUB-200-2011, and image folders (e.g. Weizmann horses).

`load_dataset(name, ...)` returns a `SegmentationSet`: uint8 tensors in memory plus boxes, keypoints,
labels and a human-readable `protocol` string to print beside every number scored on it.
"""
import numbers
import os

from minseg.data.base import PROTOCOLS, SegmentationSet
from minseg.data.cub import load_cub
from minseg.data.folder import load_folder
from minseg.data.shapes import make_shapes

DATASETS = ("shapes", "horses", "folder", "cub")


def load_dataset(name, split="train", size=64, root=None, protocol=None, seed=0, limit=None):
    """Load a data set.

    name: "shapes" (built-in, root ignored; splits "train" 10,000 / "test" 1,000), "cub" (root holds
    CUB_200_2011/ and segmentations/; splits "train", "val", "test", "all"), "horses" or "folder"
    (root holds images/ and optionally masks/; splits "all", "fold{k}-train", "fold{k}-test").
    split: for horses/folder, "train" and "test" both mean "all" (the transductive protocol).
    protocol: None = the set's default ("P2" for CUB, "P5" whole image squashed for folders, the
    whole image for shapes), or one of "P2", "P4", "P5", "box".
    seed: only the shapes generator uses it. limit: keep the first `limit` items of the split.
    """
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be an int >= 8 (px), got {size!r}")
    if not isinstance(split, str):
        raise ValueError(f"split must be a split name such as 'train', 'test' or 'all', got {split!r}")
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or pathlib.Path), got {type(root).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Real) or int(limit) != limit
                              or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    size, limit = int(size), None if limit is None else int(limit)
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected None or one of {sorted(PROTOCOLS)}")
    if name == "shapes":
        fields = make_shapes(split, size, seed, limit, protocol)
    elif name == "cub":
        fields = load_cub(root, split, size, protocol, limit)
    elif name in ("horses", "folder"):
        split = "all" if split in ("train", "test") else split
        fields = load_folder(root, split, size, protocol, limit, kind=name)
    else:
        raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")
    return SegmentationSet(**fields)


__all__ = ["SegmentationSet", "load_dataset", "DATASETS", "PROTOCOLS"]
