"""The in-memory data set every method trains on and is scored on, and the image-file loader behind it.

`SegmentationSet` holds a whole data set as uint8 tensors (images, masks, part maps) plus boxes,
keypoints and labels in pixels of the stored S x S images. It serves items and batches as floats in
[-1, 1], and an infinite augmented batch stream (h-flip + random resized crop, as the papers train).

`load_files` turns a list of (image, mask) files into those tensors under one of the cropping
protocols of the segmentation literature (notes/methods.md, "Evaluation on CUB"):
  P2  centre square crop, then resize;           P5  whole image squashed to S x S;
  P4  square window of side 1.5 * max(box w, h) centred on the box, clipped to the image, resized;
  box the ground-truth box, squashed to S x S (the independence prior's box-level input).
Coordinates are continuous: pixel i covers [i, i + 1), so a window (x0, y0, x1, y1) maps a point
x to (x - x0) * S / (x1 - x0). Images resize bicubically; soft masks bilinearly, then fg = value > 127.
"""
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from minseg.data.transforms import hflip, random_resized_crop

PROTOCOLS = {
    "P2": "P2 centre square crop",
    "P4": "P4 1.5x box window",
    "P5": "P5 whole image squashed",
    "box": "GT box crop squashed",
}


@dataclass(eq=False, repr=False)
class SegmentationSet(torch.utils.data.Dataset):
    images: torch.Tensor                      # (N, 3, S, S) uint8
    masks: torch.Tensor | None = None         # (N, 1, S, S) uint8 in {0, 1}
    parts: torch.Tensor | None = None         # (N, S, S) uint8, 0 = bg, 1..num_parts
    num_parts: int = 0
    boxes: torch.Tensor | None = None         # (N, 4) float32 x0, y0, x1, y1 in stored pixels
    keypoints: torch.Tensor | None = None     # (N, P, 3) float32 x, y, visible in stored pixels
    labels: torch.Tensor | None = None        # (N,) int64 category
    names: list = field(default_factory=list)
    protocol: str = ""                        # human-readable description of split and cropping
    skipped: list = field(default_factory=list)         # "file: reason" for unreadable inputs
    notes: list = field(default_factory=list)           # e.g. how many images were converted to RGB
    keypoint_names: list = field(default_factory=list)  # one per keypoint, if any
    part_names: list = field(default_factory=list)      # one per part label 1..num_parts, if any

    def __post_init__(self):
        n = len(self.images)
        if self.images.dim() != 4 or self.images.shape[1] != 3 or self.images.dtype != torch.uint8:
            raise ValueError(f"images must be (N, 3, S, S) uint8, got {tuple(self.images.shape)} "
                             f"{self.images.dtype}")
        size = self.images.shape[-1]
        expected = {"masks": (n, 1, size, size), "parts": (n, size, size)}
        for key, shape in expected.items():
            value = getattr(self, key)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{key} must have shape {shape}, got {tuple(value.shape)}")
        for key in ("boxes", "keypoints", "labels"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"{key} has {len(value)} rows for {n} images")
        if self.part_names and len(self.part_names) != self.num_parts:
            raise ValueError(f"part_names has {len(self.part_names)} entries for {self.num_parts} parts")
        if not self.names:
            self.names = [str(i) for i in range(n)]
        if len(self.names) != n:
            raise ValueError(f"names has {len(self.names)} entries for {n} images")

    def __repr__(self):
        extras = [k for k in ("masks", "parts", "boxes", "keypoints", "labels")
                  if getattr(self, k) is not None]
        return (f"SegmentationSet({len(self):,} images of {self.size} px, with "
                f"{', '.join(extras) or 'no labels'}; {self.protocol or 'no protocol'})")

    @property
    def size(self):
        return self.images.shape[-1]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = {"image": self.images[i].float() / 127.5 - 1, "index": int(i)}  # (3, S, S)
        if self.masks is not None:
            item["mask"] = self.masks[i].float()  # (1, S, S)
        if self.parts is not None:
            item["parts"] = self.parts[i].long()  # (S, S)
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        return item

    def batch(self, indices, device="cpu"):
        """The items at `indices` stacked: image (B, 3, S, S), mask (B, 1, S, S), parts (B, S, S)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        out = {"image": self.images[idx].to(device).float() / 127.5 - 1, "index": idx.to(device)}
        if self.masks is not None:
            out["mask"] = self.masks[idx].to(device).float()
        if self.parts is not None:
            out["parts"] = self.parts[idx].to(device).long()
        if self.labels is not None:
            out["label"] = self.labels[idx].to(device)
        return out

    def sampler(self, batch_size, augment=True, generator=None, device="cpu", scale=(0.8, 1.0)):
        """Endless batches; every epoch is a fresh permutation, batches may straddle two epochs.

        With augment, each sample gets an h-flip (p 0.5) and a random resized crop (area fraction
        U(scale), aspect ~1) applied alike to image, mask and parts (nearest for the labels).
        """
        if len(self) == 0:
            raise ValueError("cannot sample batches from an empty data set")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        queue = torch.empty(0, dtype=torch.long)
        while True:
            while len(queue) < batch_size:
                queue = torch.cat([queue, torch.randperm(len(self), generator=generator)])
            idx, queue = queue[:batch_size], queue[batch_size:]
            out = self.batch(idx, device)
            if augment:
                keys = [k for k in ("image", "mask", "parts") if k in out]
                flipped = hflip(*[out[k] for k in keys], generator=generator)
                flipped = flipped if isinstance(flipped, tuple) else (flipped,)
                cropped = random_resized_crop(*flipped, generator=generator, scale=scale)
                cropped = cropped if isinstance(cropped, tuple) else (cropped,)
                out.update(zip(keys, cropped))
            yield out

    def subset(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        pick = lambda t: None if t is None else t[idx]
        return SegmentationSet(
            images=self.images[idx], masks=pick(self.masks), parts=pick(self.parts),
            num_parts=self.num_parts, boxes=pick(self.boxes), keypoints=pick(self.keypoints),
            labels=pick(self.labels), names=[self.names[i] for i in idx.tolist()],
            protocol=f"{self.protocol}; subset of {len(idx):,}", skipped=list(self.skipped),
            notes=list(self.notes), keypoint_names=list(self.keypoint_names),
            part_names=list(self.part_names))


# ---------------------------------------------------------------------------------------------
# loading image files


@dataclass
class FileItem:
    """One picture to load. box: (x0, y0, x1, y1) in its pixels, None = derive it from the mask."""
    name: str
    image_path: str
    mask_path: str | None = None
    box: tuple | None = None
    keypoints: np.ndarray | None = None  # (P, 3) x, y, visible in the picture's pixels
    label: int | None = None


def crop_window(protocol, width, height, box):
    """The window (x0, y0, x1, y1) of a width x height picture that `protocol` resizes to S x S."""
    if protocol == "P5":
        return (0.0, 0.0, float(width), float(height))
    if protocol == "P2":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (float(left), float(top), float(left + side), float(top + side))
    if box is None:
        raise ValueError(f"protocol {protocol!r} needs a box (a GT box or a mask to derive it from)")
    x0, y0, x1, y1 = (float(v) for v in box)
    if protocol == "P4":
        half = 0.75 * max(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    elif protocol != "box":
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    # clipped to the picture, at least one pixel wide and high
    x0, y0 = min(max(0.0, x0), width - 1.0), min(max(0.0, y0), height - 1.0)
    return (x0, y0, min(max(x1, x0 + 1), float(width)), min(max(y1, y0 + 1), float(height)))


def map_points(points, window, size):
    """Map (..., 2) points in picture pixels through a crop window resized to size x size."""
    x0, y0, x1, y1 = window
    out = np.array(points, dtype=np.float32)
    out[..., 0] = (out[..., 0] - x0) * size / (x1 - x0)
    out[..., 1] = (out[..., 1] - y0) * size / (y1 - y0)
    return out


def mask_box(mask):
    """Tight box (x0, y0, x1, y1) of the True pixels of a (H, W) bool array; the whole array if none."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if len(cols) == 0:
        return (0, 0, mask.shape[1], mask.shape[0])
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _open_rgb(path):
    """Decode a picture fully and return (RGB image, original mode)."""
    with Image.open(path) as img:
        img.load()  # raises on truncated / corrupt data
        mode = img.mode
        return (img if mode == "RGB" else img.convert("RGB")), mode


def _load_one(item, size, protocol):
    """Load, crop and resize one item. Returns a dict, or a str (the reason) to skip it."""
    if not os.path.isfile(item.image_path):
        raise FileNotFoundError(f"image file {item.image_path} is missing")
    if item.mask_path is not None and not os.path.isfile(item.mask_path):
        raise FileNotFoundError(f"mask file {item.mask_path} (for image {item.image_path}) is missing")
    try:
        image, mode = _open_rgb(item.image_path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{item.image_path}: unreadable image ({err})"
    mask = None
    if item.mask_path is not None:
        try:
            with Image.open(item.mask_path) as m:
                m.load()
                mask = m if m.mode == "L" else m.convert("L")
        except (OSError, SyntaxError, ValueError) as err:
            return f"{item.mask_path}: unreadable mask ({err})"
        if mask.size != image.size:
            raise ValueError(f"mask {item.mask_path} is {mask.size[0]}x{mask.size[1]} but its image "
                             f"{item.image_path} is {image.size[0]}x{image.size[1]} (width x height); "
                             "a mask must match its image pixel for pixel")
    box = item.box
    if box is None and mask is not None:
        box = mask_box(np.asarray(mask) > 127)
    window = crop_window(protocol, image.size[0], image.size[1], box)
    out = {"mode": mode, "label": item.label,
           "image": np.asarray(image.resize((size, size), Image.BICUBIC, box=window))}
    if mask is not None:
        out["mask"] = np.asarray(mask.resize((size, size), Image.BILINEAR, box=window)) > 127
    if box is not None:
        corners = map_points(np.array(box, dtype=np.float32).reshape(2, 2), window, size)
        out["box"] = np.clip(corners.reshape(4), 0, size)
    if item.keypoints is not None:
        kp = np.array(item.keypoints, dtype=np.float32)
        kp[:, :2] = map_points(kp[:, :2], window, size)
        inside = (kp[:, 0] >= 0) & (kp[:, 0] < size) & (kp[:, 1] >= 0) & (kp[:, 1] < size)
        kp[:, 2] = kp[:, 2] * inside
        out["keypoints"] = kp
    return out


def load_files(items, size, protocol, desc="loading", workers=None):
    """Load `items` with a thread pool. Returns a dict of SegmentationSet fields (no protocol text).

    Unreadable (corrupt, truncated) pictures are skipped and listed in `skipped`, with one warning at
    the end; missing files and masks of the wrong size stop the load with an error naming the files.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    results = [None] * len(items)
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_load_one, item, size, protocol) for item in items]
        try:
            for i, fut in enumerate(tqdm(futures, desc=desc, unit="img", disable=len(items) < 500)):
                results[i] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    kept = [(item, r) for item, r in zip(items, results) if isinstance(r, dict)]
    skipped = [r for r in results if isinstance(r, str)]
    if items and not kept:
        raise ValueError(f"none of the {len(items)} picture(s) could be read: " + "; ".join(skipped[:3])
                         + (" ..." if len(skipped) > 3 else "") + "; check the files (corrupt or not pictures)")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) of {len(items)}: "
                      + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    converted = {}
    for _, r in kept:
        if r["mode"] != "RGB":
            converted[r["mode"]] = converted.get(r["mode"], 0) + 1
    notes = []
    if converted:
        detail = ", ".join(f"{n} {mode}" for mode, n in sorted(converted.items()))
        notes.append(f"converted {sum(converted.values())} image(s) to RGB ({detail}; alpha dropped)")
    stack = lambda key: np.stack([r[key] for _, r in kept]) if kept and key in kept[0][1] else None
    images = stack("image")
    out = {"images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() if images is not None
           else torch.zeros(0, 3, size, size, dtype=torch.uint8),
           "names": [item.name for item, _ in kept], "skipped": skipped, "notes": notes}
    masks, boxes, keypoints = stack("mask"), stack("box"), stack("keypoints")
    out["masks"] = None if masks is None else torch.from_numpy(masks).unsqueeze(1).to(torch.uint8)
    out["boxes"] = None if boxes is None else torch.from_numpy(boxes).float()
    out["keypoints"] = None if keypoints is None else torch.from_numpy(keypoints).float()
    has_labels = kept and kept[0][1]["label"] is not None
    out["labels"] = torch.tensor([r["label"] for _, r in kept], dtype=torch.long) if has_labels else None
    return out
