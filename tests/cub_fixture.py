"""CUB-200-2011 layout fixtures for the tests: real metadata, synthetic pictures.

`make_cub_fixture(dest)` copies the real metadata files (../shared/data/cub-metadata: real ids, names,
boxes, part locations, splits) into dest/CUB_200_2011/ and draws, for each id, a picture just large
enough to hold its box and part locations: a noisy background with an ellipse "bird" filling the real
box, plus its soft mask in dest/segmentations/. `write_cub_layout` writes a small hand-made layout.
"""
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

METADATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub-metadata"
METADATA_FILES = ("images.txt", "bounding_boxes.txt", "classes.txt", "image_class_labels.txt",
                  "train_test_split.txt", "train_val_test_split.txt", "parts/parts.txt",
                  "parts/part_locs.txt")


def _table(path):
    """`<id> <values...>` lines -> {id: [str values]} (several rows per id are kept in order)."""
    rows = {}
    for line in open(path):
        fields = line.split()
        if fields:
            rows.setdefault(int(fields[0]), []).append(fields[1:])
    return rows


def save_pair(root, rel_path, image, mask):
    """Write an image as CUB_200_2011/images/<rel_path> and its mask as segmentations/<stem>.png."""
    root = Path(root)
    image_path = root / "CUB_200_2011" / "images" / rel_path
    mask_path = root / "segmentations" / Path(rel_path).with_suffix(".png")
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    if image is not None:
        image.save(image_path, quality=30)  # low JPEG quality: fast to write (PNG ignores it)
    if mask is not None:
        mask.save(mask_path, compress_level=1)
    return image_path, mask_path


_NOISE = np.random.default_rng(0).integers(0, 128, (704, 704, 3), dtype=np.uint8)  # shared grain


def draw_bird(width, height, box, seed):
    """A noisy background with an ellipse filling box (x0, y0, x1, y1); returns (RGB image, L mask)."""
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 64, 2)
    tiles = _NOISE if max(width, height) <= 640 else np.tile(_NOISE, (height // 640 + 1, width // 640 + 1, 1))
    grain = tiles[top:top + height, left:left + width]  # (H, W, 3)
    image = Image.fromarray(grain + rng.integers(0, 128, 3).astype(np.uint8))
    bird = tuple(int(c) for c in rng.integers(0, 256, 3))
    ImageDraw.Draw(image).ellipse(box, fill=bird)
    mask = Image.new("L", (width, height), 0)
    pen = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    pen.ellipse((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=100)  # a soft rim below 127, like real masks
    pen.ellipse(box, fill=255)
    return image, mask


def make_cub_fixture(dest, n_images=None, metadata=METADATA, workers=8):
    """Build dest/CUB_200_2011/ + dest/segmentations/; pictures for all ids, or the first
    n_images of each split of train_val_test_split.txt (0: metadata only). Returns dest."""
    dest = Path(dest)
    cub_dir = dest / "CUB_200_2011"
    for name in METADATA_FILES:
        (cub_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(metadata) / name, cub_dir / name)
    paths = _table(cub_dir / "images.txt")
    boxes = _table(cub_dir / "bounding_boxes.txt")
    parts = _table(cub_dir / "parts" / "part_locs.txt")
    splits = _table(cub_dir / "train_val_test_split.txt")
    ids = sorted(paths)
    if n_images is not None:
        ids = [i for value in ("0", "1", "2") for i in
               [i for i in sorted(paths) if splits[i][0][0] == value][:n_images]]

    def write(image_id):
        x, y, w, h = (float(v) for v in boxes[image_id][0])
        visible = [(float(px), float(py)) for _, px, py, v in parts[image_id] if v == "1"]
        width = int(np.ceil(max([x + w] + [px for px, _ in visible]))) + 1
        height = int(np.ceil(max([y + h] + [py for _, py in visible]))) + 1
        image, mask = draw_bird(width, height, (x, y, x + w, y + h), image_id)
        save_pair(dest, paths[image_id][0][0], image, mask)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, ids))
    return dest


def write_cub_layout(root, entries, redo_split=True):
    """Write a small CUB layout under root from entries: dicts with path (relative to images/),
    box (x, y, w, h), label (1-based), split (0/1/2 with redo_split, else 1 = train / 0 = test),
    parts (optional list of 15 (x, y, visible)), image and mask (PIL images, None = not written)."""
    cub_dir = Path(root) / "CUB_200_2011"
    (cub_dir / "parts").mkdir(parents=True, exist_ok=True)
    lines = {name: [] for name in ("images.txt", "bounding_boxes.txt", "image_class_labels.txt",
                                   "parts/part_locs.txt")}
    split_lines = []
    for i, e in enumerate(entries, 1):
        lines["images.txt"].append(f"{i} {e['path']}")
        lines["bounding_boxes.txt"].append(f"{i} " + " ".join(f"{v:.1f}" for v in e["box"]))
        lines["image_class_labels.txt"].append(f"{i} {e['label']}")
        for p, (px, py, v) in enumerate(e.get("parts") or [(0, 0, 0)] * 15, 1):
            lines["parts/part_locs.txt"].append(f"{i} {p} {px:.1f} {py:.1f} {v}")
        split_lines.append(f"{i} {e['split']}")
        save_pair(root, e["path"], e.get("image"), e.get("mask"))
    split_name = "train_val_test_split.txt" if redo_split else "train_test_split.txt"
    lines[split_name] = split_lines
    for name, content in lines.items():
        (cub_dir / name).write_text("\n".join(content) + "\n")
    return Path(root)
