"""Tests of minseg.data: synthetic shapes, CUB layout, image folders, crops, augmentation, bad inputs."""
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from cub_fixture import METADATA, draw_bird, make_cub_fixture, write_cub_layout
from minseg.data import SegmentationSet, load_dataset
from minseg.data.base import PROTOCOLS, crop_window
from minseg.data.cluster import KINDS, make_cluster_image
from minseg.data.cub import read_records
from minseg.data.folder import fold_indices
from minseg.data.shapes import best_threshold_iou, difficulty
from minseg.data.transforms import colour_jitter, hflip, random_resized_crop

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HORSES = DATA / "weizmann-horses"
needs_cub_metadata = pytest.mark.skipif(not METADATA.is_dir(), reason=f"{METADATA} not present")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_test(one_thread):
    return load_dataset("shapes", "test", size=64)


def tight_box(mask):
    """Independent tight box of a (S, S) array: x0, y0, x1, y1."""
    ys, xs = np.nonzero(np.asarray(mask))
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ------------------------------------------------------------------------------------------- shapes

def test_shapes_ground_truth_is_consistent(shapes_test):
    d = shapes_test
    assert len(d) == 1000 and d.images.shape == (1000, 3, 64, 64) and d.images.dtype == torch.uint8
    assert d.num_parts == 4 and d.keypoint_names == d.part_names == ["body", "head", "tail", "wing"]
    assert d.subset([3, 1]).part_names == d.part_names
    assert torch.equal(d.masks[:, 0], (d.parts > 0).to(torch.uint8))
    assert set(d.parts.unique().tolist()) == {0, 1, 2, 3, 4}
    assert set(d.labels.unique().tolist()) == set(range(10))
    for i in range(0, 1000, 97):
        assert d.boxes[i].tolist() == tight_box(d.masks[i, 0])
    # each visible keypoint lies on its own part
    kp = d.keypoints
    for p in range(4):
        vis = kp[:, p, 2] > 0
        assert vis.float().mean() > 0.9
        x, y = kp[vis, p, 0].long(), kp[vis, p, 1].long()
        assert (d.parts[vis.nonzero()[:, 0], y, x] == p + 1).float().mean() > 0.99
    coverage = d.masks.float().mean((1, 2, 3))
    assert 0.15 < coverage.mean() < 0.4
    assert coverage.quantile(0.05) > 0.1 and coverage.quantile(0.95) < 0.45


def test_shapes_deterministic_and_prefix_stable(shapes_test):
    short = load_dataset("shapes", "test", size=64, limit=3)
    assert torch.equal(short.images, shapes_test.images[:3])
    assert torch.equal(short.parts, shapes_test.parts[:3])
    a = load_dataset("shapes", "test", size=16, limit=503)  # across the 500-scene chunk boundary
    b = load_dataset("shapes", "test", size=16, limit=501)
    assert torch.equal(a.images[:501], b.images) and torch.equal(a.keypoints[:501], b.keypoints)
    other_seed = load_dataset("shapes", "test", size=64, limit=3, seed=1)
    train = load_dataset("shapes", "train", size=64, limit=3)
    assert not torch.equal(other_seed.images, short.images)
    assert not torch.equal(train.images, short.images)


def test_shapes_same_scene_at_any_size():
    small = load_dataset("shapes", "train", size=32, limit=16)
    large = load_dataset("shapes", "train", size=64, limit=16)
    down = torch.nn.functional.avg_pool2d(large.masks.float(), 2) > 0.5
    assert (down == small.masks.bool()).float().mean() > 0.97
    assert torch.allclose(large.keypoints[..., :2], 2 * small.keypoints[..., :2], atol=1e-3)


@pytest.mark.parametrize("protocol", ["box", "P4"])
def test_shapes_box_windows(protocol, shapes_test):
    full = shapes_test
    crop = load_dataset("shapes", "test", size=64, limit=50, protocol=protocol)
    assert PROTOCOLS[protocol] in crop.protocol
    for i in range(50):
        window = crop_window(protocol, 64, 64, full.boxes[i].tolist())
        x0, y0, x1, y1 = window
        scale = torch.tensor([64 / (x1 - x0), 64 / (y1 - y0)])
        expected = (full.keypoints[i, :, :2] - torch.tensor([x0, y0])) * scale
        assert torch.allclose(crop.keypoints[i, :, :2], expected, atol=1e-3)
        expected_box = ((full.boxes[i].view(2, 2) - torch.tensor([x0, y0])) * scale).clamp(0, 64)
        assert torch.allclose(crop.boxes[i], expected_box.view(4), atol=1e-3)
    if protocol == "box":  # the object's tight box fills the crop, up to half a pixel zoomed
        for i in range(50):
            zoom = 64 / (full.boxes[i, 2:] - full.boxes[i, :2])  # (2,) x, y
            margin = torch.tensor(tight_box(crop.masks[i, 0]), dtype=torch.float32)
            margin[2:] = 64 - margin[2:]
            assert (margin <= zoom.repeat(2) / 2 + 1).all()
        assert crop.masks.float().mean() > 0.4


def test_shapes_are_not_trivially_segmented(shapes_test, capsys):
    d = shapes_test
    report = difficulty(d.masks, d.images)
    with capsys.disabled():
        print("\nshapes test split (1,000 images, 64 px), dataset-level fg IoU: "
              f"coverage {report['coverage']:.3f}, all-foreground {report['all_foreground_iou']:.3f}, "
              f"centre prior {report['centre_prior_iou']:.3f}, best global threshold "
              f"{report['best_threshold_iou']:.3f} ({report['best_threshold_rule']})")
    assert report["all_foreground_iou"] == pytest.approx(report["coverage"], abs=1e-6)
    assert report["all_foreground_iou"] < 0.5
    assert report["centre_prior_iou"] < 0.5
    assert report["best_threshold_iou"] < 0.3


def test_best_threshold_iou_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    masks = (torch.rand(4, 1, 8, 8, generator=g) < 0.3).to(torch.uint8)
    images[:, 1][masks[:, 0].bool()] //= 3  # green is darker on the foreground
    fg = masks[:, 0].bool()
    lum = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).round()
    best = 0.0
    for values in (images[:, 0], images[:, 1], images[:, 2], lum):
        for t in range(256):
            for pred in (values >= t, values < t):
                best = max(best, float((pred & fg).sum()) / float((pred | fg).sum()))
    assert best_threshold_iou(images, masks)[0] == pytest.approx(best, abs=1e-9)
    separable = torch.where(masks.bool().expand(-1, 3, -1, -1), 200, 100).to(torch.uint8)
    assert best_threshold_iou(separable, masks)[0] == 1.0


@pytest.mark.slow
def test_shapes_full_train_split_is_fast():
    start = time.perf_counter()
    d = load_dataset("shapes", "train", size=64)
    elapsed = time.perf_counter() - start
    print(f"\n10,000 shapes at 64 px: {elapsed:.1f} s")
    assert len(d) == 10_000 and elapsed < 60


# ---------------------------------------------------------------------------------------- transforms

def test_hflip_applies_one_choice_to_all_tensors():
    image = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    parts = torch.arange(2 * 4 * 5).view(2, 4, 5)
    assert torch.equal(hflip(image, p=1.0), image.flip(-1))
    assert torch.equal(hflip(image, p=0.0), image)
    g = torch.Generator().manual_seed(0)
    big = torch.arange(64 * 6, dtype=torch.float32).view(64, 1, 1, 6)
    flipped, flipped_parts = hflip(big, big[:, 0].long(), generator=g)
    was_flipped = (flipped != big).flatten(1).any(1)
    assert 10 < was_flipped.sum() < 54
    assert torch.equal(flipped[:, 0].long(), flipped_parts)
    assert torch.equal(flipped[was_flipped], big[was_flipped].flip(-1))
    assert parts.shape == hflip(parts, p=1.0).shape


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), low=st.floats(0.3, 1.0))
def test_random_resized_crop_geometry(seed, low):
    size = 32
    cols = torch.arange(size, dtype=torch.float32).view(1, size).expand(size, size)
    image = torch.stack([cols, cols.t(), torch.zeros(size, size)]).expand(8, 3, size, size)  # x, y
    labels = cols.long().expand(8, size, size)  # label = column index
    out, out_labels = random_resized_crop(image, labels, generator=torch.Generator().manual_seed(seed),
                                          scale=(low, 1.0), ratio=(0.9, 1.1))
    # the bilinear image of a linear ramp stays linear; nearest labels lie within a pixel of it
    assert (out[:, 0].round().long() - out_labels).abs().max() <= 1
    # crop size in input pixels from the ramps' slopes (inner pixels: the outer ones may clamp)
    width = (out[:, 0, 0, -2] - out[:, 0, 0, 1]) * size / (size - 3)
    height = (out[:, 1, -2, 0] - out[:, 1, 1, 0]) * size / (size - 3)
    area = width * height / size**2
    # a side clamped to the full image costs at most a factor sqrt(max ratio) of the drawn area
    assert (area > low / 1.1 ** 0.5 - 0.02).all() and (area < 1.0 + 1e-4).all()
    assert ((width / height) > 0.9 - 0.02).all() and ((width / height) < 1.1 + 0.02).all()
    assert (out[:, :2] >= -1e-4).all() and (out[:, :2] <= size - 1 + 1e-4).all()


def test_random_resized_crop_full_scale_is_identity():
    image = torch.rand(3, 3, 16, 16)
    mask = (torch.rand(3, 1, 16, 16) > 0.5).float()
    out, out_mask = random_resized_crop(image, mask, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, image, atol=1e-5) and torch.equal(out_mask, mask)


def test_colour_jitter():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 8, 8, generator=g) * 1.2 - 0.6
    assert torch.allclose(colour_jitter(image, brightness=0, contrast=0, saturation=0, hue=0), image,
                          atol=1e-5)
    bright = colour_jitter(image, generator=g, brightness=0.2, contrast=0, saturation=0, hue=0)
    ratio = (bright + 1) / (image + 1)  # one brightness factor per image
    assert torch.allclose(ratio, ratio.mean((1, 2, 3), keepdim=True), atol=1e-4)
    assert ((ratio.mean((1, 2, 3)) > 0.8 - 1e-4) & (ratio.mean((1, 2, 3)) < 1.2 + 1e-4)).all()
    grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    mid = torch.rand(6, 3, 8, 8, generator=g) * 0.4 - 0.2  # hue turns keep luma where nothing clips
    turned = colour_jitter(mid, generator=g, brightness=0, contrast=0, saturation=0, hue=0.5)
    assert torch.allclose((turned * grey_weights).sum(1), (mid * grey_weights).sum(1), atol=1e-4)
    assert not torch.allclose(turned, mid, atol=1e-2)
    strong = colour_jitter(image * 2, generator=g, brightness=0.9, contrast=0.9, saturation=0.9)
    assert strong.min() >= -1 and strong.max() <= 1


# -------------------------------------------------------------------------------- SegmentationSet

def test_items_batches_subsets_and_validation():
    d = load_dataset("shapes", "test", size=16, limit=10)
    item = d[3]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], d.images[3].float() / 127.5 - 1)
    assert item["mask"].shape == (1, 16, 16) and item["parts"].dtype == torch.long
    assert item["index"] == 3 and item["label"] == int(d.labels[3])
    b = d.batch([1, 4])
    assert b["image"].shape == (2, 3, 16, 16) and b["index"].tolist() == [1, 4]
    assert torch.equal(b["parts"][1], d[4]["parts"])
    sub = d.subset([4, 1])
    assert len(sub) == 2 and sub.names == [d.names[4], d.names[1]]
    assert torch.equal(sub.keypoints[0], d.keypoints[4])
    with pytest.raises(ValueError, match="masks"):
        SegmentationSet(images=d.images, masks=d.masks[:5])
    with pytest.raises(ValueError, match="uint8"):
        SegmentationSet(images=d.images.float())


def test_sampler_epochs_and_augmentation_consistency():
    d = load_dataset("shapes", "test", size=32, limit=12)
    plain = d.sampler(4, augment=False, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # each epoch of 3 batches visits every item once
        seen = torch.cat([next(plain)["index"] for _ in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
    # an image that is its own mask: augmentation must move both the same way
    images = d.masks.expand(-1, 3, -1, -1) * 255
    same = SegmentationSet(images=images.contiguous(), masks=d.masks, parts=d.parts, num_parts=4)
    batch = next(same.sampler(12, generator=torch.Generator().manual_seed(1), scale=(0.5, 0.9)))
    assert ((batch["image"][:, 0:1] > 0) == batch["mask"].bool()).float().mean() > 0.98
    assert torch.equal(batch["mask"][:, 0].bool(), batch["parts"] > 0)
    assert not torch.equal(batch["mask"], d.batch(batch["index"])["mask"])


# --------------------------------------------------------------------------------------------- CUB

@needs_cub_metadata
def test_cub_records_split_counts(tmp_path):
    root = make_cub_fixture(tmp_path, n_images=0)  # metadata only: the index path opens no picture
    records = read_records(root)
    counts = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    assert len(records) == 11_788 and counts == {"train": 10_000, "val": 788, "test": 1_000}
    first = records[0]
    assert first.path == "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    assert first.box == (60.0, 27.0, 385.0, 331.0) and first.label == 0
    assert first.keypoints[1].tolist() == [312.0, 182.0, 1.0] and records[-1].label == 199
    (root / "CUB_200_2011" / "train_val_test_split.txt").unlink()  # official split as the fallback
    official = read_records(root / "CUB_200_2011")
    assert sum(r.split == "train" for r in official) == 5_994
    assert sum(r.split == "test" for r in official) == 5_794
    with pytest.raises(ValueError, match="train_val_test_split.txt"):
        load_dataset("cub", "val", root=root, limit=1)


@needs_cub_metadata
def test_cub_fixture_loads_every_split(tmp_path):
    root = make_cub_fixture(tmp_path, n_images=3)
    records = read_records(root)
    for split in ("train", "val", "test"):
        d = load_dataset("cub", split, size=48, root=root, limit=3)
        chosen = [r for r in records if r.split == split][:3]
        assert d.names == [r.path[:-4] for r in chosen] and d.skipped == [] and d.notes == []
        assert d.labels.tolist() == [r.label for r in chosen]
        assert f"CUB {split} split (3 images" in d.protocol and "P2" in d.protocol
        for i, r in enumerate(chosen):  # P2: centre square of the drawn picture
            w, h = Image.open(root / "CUB_200_2011" / "images" / r.path).size
            side = min(w, h)
            x0, y0 = (w - side) // 2, (h - side) // 2
            box = (np.array(r.box) - [x0, y0, x0, y0]) * 48 / side
            assert np.allclose(d.boxes[i].numpy(), np.clip(box, 0, 48), atol=1e-4)
            kx = (r.keypoints[:, 0] - x0) * 48 / side
            assert np.allclose(d.keypoints[i, :, 0].numpy(), kx, atol=1e-4)
            # the ellipse bird is the mask: nearly all of the mask lies inside the mapped box
            ys, xs = np.nonzero(d.masks[i, 0].numpy())
            inside = ((xs + 0.5 >= box[0] - 1) & (xs + 0.5 <= box[2] + 1)
                      & (ys + 0.5 >= box[1] - 1) & (ys + 0.5 <= box[3] + 1))
            assert inside.mean() > 0.99


def _grid_picture(width, height):
    """RGB picture whose red channel is the column index and green twice the row index (mod 256)."""
    x = np.arange(width)[None, :].repeat(height, 0)
    y = np.arange(height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x % 256, (2 * y) % 256, np.zeros_like(x)], -1).astype(np.uint8))


def _box_mask(width, height, box):
    mask = np.zeros((height, width), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    return Image.fromarray(mask)


@pytest.fixture
def known_cub(tmp_path):
    """One 200 x 100 PNG picture (exact pixels), GT box x 50..90, y 20..80, mask = the box."""
    parts = [(60, 30, 1), (150, 50, 1), (10, 10, 1), (70, 40, 0)] + [(0, 0, 0)] * 11
    entry = {"path": "001.Test/known.png", "box": (50, 20, 40, 60), "label": 7, "split": 2,
             "parts": parts, "image": _grid_picture(200, 100), "mask": _box_mask(200, 100, (50, 20, 90, 80))}
    return write_cub_layout(tmp_path, [entry])


def test_p2_crop_geometry(known_cub):
    d = load_dataset("cub", "test", size=100, root=known_cub, protocol="P2")  # window x 50..150
    picture = np.asarray(_grid_picture(200, 100))
    assert np.array_equal(d.images[0].permute(1, 2, 0).numpy(), picture[:, 50:150])
    expected = np.zeros((100, 100), np.uint8)
    expected[20:80, 0:40] = 1
    assert np.array_equal(d.masks[0, 0].numpy(), expected)
    assert d.boxes[0].tolist() == [0, 20, 40, 80] and d.labels.tolist() == [6]
    kp = d.keypoints[0, :4].tolist()
    assert kp == [[10, 30, 1], [100, 50, 0], [-40, 10, 0], [20, 40, 0]]  # x = 100 is off the crop
    half = load_dataset("cub", "test", size=50, root=known_cub, protocol="P2")
    expected = np.zeros((50, 50), np.uint8)
    expected[10:40, 0:20] = 1
    assert np.array_equal(half.masks[0, 0].numpy(), expected)
    assert half.boxes[0].tolist() == [0, 10, 20, 40] and half.keypoints[0, 0].tolist() == [5, 15, 1]


def test_p4_crop_geometry(known_cub):
    # side 1.5 * max(40, 60) = 90 centred on (70, 50): window x 25..115, y 5..95, inside the picture
    d = load_dataset("cub", "test", size=90, root=known_cub, protocol="P4")
    picture = np.asarray(_grid_picture(200, 100))
    assert np.array_equal(d.images[0].permute(1, 2, 0).numpy(), picture[5:95, 25:115])
    expected = np.zeros((90, 90), np.uint8)
    expected[15:75, 25:65] = 1
    assert np.array_equal(d.masks[0, 0].numpy(), expected)
    assert d.boxes[0].tolist() == [25, 15, 65, 75]
    assert d.keypoints[0, 0].tolist() == [35, 25, 1]
    # near a corner the window is clipped to the picture (and later squashed): side 90 centred on
    # (20, 40) is (-25, -5, 65, 85), clipped to the 120 x 80 picture
    assert crop_window("P4", 120, 80, (0, 10, 40, 70)) == (0.0, 0.0, 65.0, 80.0)
    # a box reaching past the picture (or degenerate) is clipped to it, keeping at least a pixel
    assert crop_window("box", 120, 80, (-5, 10, 130, 10)) == (0.0, 10.0, 120.0, 11.0)


def test_p5_and_box_crop_geometry(known_cub):
    p5 = load_dataset("cub", "test", size=100, root=known_cub, protocol="P5")  # x halved, y kept
    expected = np.zeros((100, 100), np.uint8)
    expected[20:80, 25:45] = 1
    assert np.array_equal(p5.masks[0, 0].numpy(), expected)
    assert p5.boxes[0].tolist() == [25, 20, 45, 80] and p5.keypoints[0, 0].tolist() == [30, 30, 1]
    box = load_dataset("cub", "test", size=40, root=known_cub, protocol="box")  # x kept, y * 2/3
    assert box.masks.all() and box.boxes[0].tolist() == [0, 0, 40, 40]
    assert np.array_equal(box.images[0, 0].numpy(), np.tile(np.arange(50, 90), (40, 1)))
    assert box.keypoints[0, 0].tolist() == pytest.approx([10, 10 * 40 / 60, 1])


# ------------------------------------------------------------------------------------ bad inputs

def _small_cub(root, n=4, size=(60, 40), redo_split=True, image_kind=None):
    entries = []
    for i in range(n):
        image, mask = draw_bird(size[0], size[1], (10, 5, 50, 35), i)
        entries.append({"path": f"001.A/a{i}.jpg", "box": (10, 5, 40, 30), "label": 1,
                        "split": 2 if redo_split else 0, "image": image, "mask": mask})
    return write_cub_layout(root, entries, redo_split=redo_split)


def test_cub_missing_root_and_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB_200_2011.tgz.*segmentations.tgz"):
        load_dataset("cub", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no CUB_200_2011/"):
        load_dataset("cub", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        load_dataset("cub")
    root = _small_cub(tmp_path / "a")
    (root / "CUB_200_2011" / "bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        load_dataset("cub", "test", root=root)
    root = _small_cub(tmp_path / "b")
    (root / "CUB_200_2011" / "train_val_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        load_dataset("cub", "test", root=root)
    root = _small_cub(tmp_path / "c")
    (root / "CUB_200_2011" / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(ValueError, match="image_class_labels.txt has no entry for image id 2"):
        load_dataset("cub", "test", root=root)


def test_cub_missing_masks(tmp_path):
    root = _small_cub(tmp_path / "a")
    (root / "segmentations" / "001.A" / "a2.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"segmentations/001.A/a2.png"):
        load_dataset("cub", "test", root=root)
    root = _small_cub(tmp_path / "b")
    for p in (root / "segmentations" / "001.A").iterdir():
        p.unlink()
    (root / "segmentations" / "001.A").rmdir()
    (root / "segmentations").rmdir()
    with pytest.raises(FileNotFoundError, match="segmentations.tgz"):
        load_dataset("cub", "test", root=root)


def test_corrupt_and_truncated_images_are_skipped(tmp_path):
    root = _small_cub(tmp_path, n=5)
    images = root / "CUB_200_2011" / "images" / "001.A"
    (images / "a1.jpg").write_bytes(b"this is not a jpeg")
    data = (images / "a3.jpg").read_bytes()
    (images / "a3.jpg").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_dataset("cub", "test", size=16, root=root)
    assert len(d) == 3 and d.names == ["001.A/a0", "001.A/a2", "001.A/a4"]
    assert len(d.skipped) == 2 and "a1.jpg" in d.skipped[0] and "a3.jpg" in d.skipped[1]
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and "skipped 2 unreadable" in messages[0]


def test_mask_of_the_wrong_size_names_both_files(tmp_path):
    root = _small_cub(tmp_path)
    Image.new("L", (30, 20)).save(root / "segmentations" / "001.A" / "a2.png")
    with pytest.raises(ValueError, match=r"a2.png is 30x20 but its image .*a2.jpg is 60x40"):
        load_dataset("cub", "test", root=root)


def test_image_modes_are_converted_to_rgb(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    pictures = {"grey.png": Image.new("L", (60, 40), 90),
                "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
                "rgba.png": Image.fromarray(np.dstack([rgb, np.full((40, 60), 7, np.uint8)]), "RGBA"),
                "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
                "rgb.png": Image.fromarray(rgb)}
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name, picture in pictures.items():
        picture.save(tmp_path / "images" / name)
        Image.new("L", (60, 40), 255).save(tmp_path / "masks" / (Path(name).stem + ".png"))
    d = load_dataset("folder", size=8, root=tmp_path)
    assert d.notes == ["converted 4 image(s) to RGB (1 CMYK, 1 L, 1 P, 1 RGBA; alpha dropped)"]
    by_name = {n: d.images[i, :, 4, 4].tolist() for i, n in enumerate(d.names)}
    assert by_name["grey"] == [90, 90, 90]
    assert by_name["rgba"] == [200, 100, 50] and by_name["palette"] == [200, 100, 50]
    assert all(abs(a - b) <= 3 for a, b in zip(by_name["cmyk"], [200, 100, 50]))


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="--data PATH.*weizmann-horses"):
        load_dataset("horses")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no images/ directory"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="no pictures"):
        load_dataset("folder", root=tmp_path)
    for i in range(3):
        _grid_picture(30, 20).save(tmp_path / "images" / f"p{i}.png")
    unsupervised = load_dataset("folder", size=8, root=tmp_path)
    assert len(unsupervised) == 3 and unsupervised.masks is None and "no masks" in unsupervised.protocol
    with pytest.raises(ValueError, match="masks"):
        load_dataset("folder", root=tmp_path, protocol="box")
    (tmp_path / "masks").mkdir()
    _box_mask(30, 20, (5, 5, 20, 15)).save(tmp_path / "masks" / "p0.png")
    with pytest.raises(FileNotFoundError, match=r"masks/p1.png for image .*p1.png"):
        load_dataset("folder", root=tmp_path)
    for bad in ({"split": "fold5-test"}, {"protocol": "P3"}, {"name": "imagenet"}):
        with pytest.raises(ValueError):
            load_dataset(**{"name": "folder", "root": tmp_path, **bad})


def test_folder_boxes_from_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    _grid_picture(40, 20).save(tmp_path / "images" / "x.png")
    _box_mask(40, 20, (8, 4, 20, 16)).save(tmp_path / "masks" / "x.png")
    d = load_dataset("folder", size=20, root=tmp_path)  # P5: x halved
    assert d.boxes[0].tolist() == [4, 4, 10, 16] and d.masks[0, 0].numpy().sum() == 6 * 12
    crop = load_dataset("folder", size=12, root=tmp_path, protocol="box")
    assert crop.masks.all() and np.array_equal(crop.images[0, 0, 0].numpy(), np.arange(8, 20))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(5, 400))
def test_folds_partition_the_files(n):
    tests = [fold_indices(n, f"fold{k}-test") for k in range(5)]
    assert sorted(np.concatenate(tests).tolist()) == list(range(n))
    for k in range(5):
        train = fold_indices(n, f"fold{k}-train")
        assert sorted(np.concatenate([train, tests[k]]).tolist()) == list(range(n))
        assert abs(len(tests[k]) - n / 5) < 1
    assert np.array_equal(fold_indices(n, "fold2-test"), tests[2])


@pytest.mark.parametrize("kind", ["seeds", "fruit"])
def test_cluster_image(kind):
    image, masks = make_cluster_image(128, seed=1, kind=kind)
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert masks.dim() == 3 and masks.shape[1:] == (128, 128) and masks.dtype == torch.bool
    assert masks.sum(0).max() == 1 and masks.flatten(1).any(1).all()  # disjoint, none empty
    assert masks.any(0).float().mean() > 0.95  # dense: the ground barely shows (DSF-HOC)
    half_length, half_width = KINDS[kind]["axes"]
    full_area = math.pi * half_length * half_width * (128 / 256) ** 2
    occluded = masks.flatten(1).sum(1) < 0.8 * full_area
    assert occluded.float().mean() > 0.3  # overlapping: many instances are partly hidden
    luma = image.float().mean(0)
    assert luma[masks.any(0)].mean() > luma[~masks.any(0)].mean() + 30
    again, masks_again = make_cluster_image(128, seed=1, kind=kind)
    assert torch.equal(again, image) and torch.equal(masks_again, masks)
    assert not torch.equal(make_cluster_image(128, seed=2, kind=kind)[0], image)
    with pytest.raises(ValueError, match="kind"):
        make_cluster_image(kind="crowd")


@pytest.mark.skipif(not HORSES.is_dir(), reason=f"{HORSES} not present")
def test_weizmann_horses(capsys):
    start = time.perf_counter()
    d = load_dataset("horses", size=64, root=HORSES)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nWeizmann horses: {len(d)} images at 64 px loaded in {elapsed:.2f} s ({d.protocol})")
    assert len(d) == 327 and d.skipped == [] and d.labels is None and d.keypoints is None
    assert 0.15 < d.masks.float().mean() < 0.4
    for i in range(0, 327, 41):  # every mask pixel lies inside its (mask-derived) box
        ys, xs = np.nonzero(d.masks[i, 0].numpy())
        x0, y0, x1, y1 = d.boxes[i].tolist()
        assert xs.min() + 1 >= x0 and xs.max() <= x1 and ys.min() + 1 >= y0 and ys.max() <= y1
    fold = load_dataset("horses", "fold0-test", size=16, root=HORSES)
    assert len(fold) in (65, 66) and set(fold.names) <= set(d.names)


@needs_cub_metadata
@pytest.mark.slow
def test_full_cub_fixture(tmp_path, capsys):
    start = time.perf_counter()
    root = make_cub_fixture(tmp_path)
    built = time.perf_counter() - start
    start = time.perf_counter()
    d = load_dataset("cub", "test", size=64, root=root)
    loaded = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nCUB fixture: 11,788 pictures written in {built:.1f} s; test split loaded in {loaded:.1f} s")
    assert len(d) == 1000 and d.skipped == []


def test_mask_box_is_tight_in_pixel_edges():
    from minseg.data.base import mask_box
    fg = np.zeros((5, 6), bool)
    fg[1:3, 2:5] = True  # rows 1-2, columns 2-4
    assert mask_box(fg) == (2, 1, 5, 3)
    assert mask_box(np.zeros((5, 6), bool)) == (0, 0, 6, 5)  # empty: the whole image
