"""Independence prior (minseg.methods.independence): background patches never touch a box, the area penalty and
connected components against hand-made cases and an independent flood fill, shape scores of seeds vs blobs,
training steps and state round trips of both applications, run() end to end on shapes and on the CUB layout,
run_hoc() on the built-in cluster picture."""
import dataclasses
import json
import math
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minseg.data.base import SegmentationSet
from minseg.methods.hoc import (HOC_PRESETS, ClusterConfig, ClusterGAN, HOCSchedule, best_shape_iou,
                                connected_components, count_components, cut_patches, elongation, instance_sizes,
                                run_hoc, shape_scores, shape_templates)
from minseg.methods.independence import (PRESETS, ForegroundCarver, IndependenceConfig, PatchPool, Schedule,
                                         area_penalty, background_pool, load_background_set, make_schedule,
                                         outside_box_windows, run)


pytestmark = pytest.mark.usefixtures("one_thread")


def box_pixels(box, side, margin):
    """(side, side) bool: the pixels whose square [i, i + 1) meets the box widened by margin (independent of the
    code under test: tested pixel by pixel)."""
    x0, y0, x1, y1 = box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin
    i = torch.arange(side, dtype=torch.float64)
    cols, rows = (i + 1 > x0) & (i < x1), (i + 1 > y0) & (i < y1)
    return rows[:, None] & cols[None]


boxes = st.tuples(st.floats(0, 23), st.floats(0, 23), st.floats(0.5, 24), st.floats(0.5, 24)).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]) + 0.5, max(b[1], b[3]) + 0.5))


@settings(max_examples=150, deadline=None)
@given(box=boxes, lo=st.integers(1, 8), extra=st.integers(0, 8), margin=st.integers(0, 2), seed=st.integers(0, 99))
def test_background_windows_never_meet_the_box_and_exist_when_there_is_room(box, lo, extra, margin, seed):
    side, hi = 24, lo + extra
    covered = box_pixels(box, side, margin)
    windows = outside_box_windows(box, side, 5, (lo, hi), margin, torch.Generator().manual_seed(seed))
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
        assert lo <= x1 - x0 <= hi and lo <= y1 - y0 <= hi
        assert not covered[y0:y1, x0:x1].any()
    # brute force: some lo x lo window misses the box <=> the sampler finds windows
    room = any(not covered[y:y + lo, x:x + lo].any() for y in range(side - lo + 1) for x in range(side - lo + 1))
    assert (len(windows) == 5) == room and (len(windows) == 0) == (not room)


def test_background_pool_patches_hold_no_box_pixel():
    g = torch.Generator().manual_seed(0)
    n, side = 12, 40
    box_list = torch.rand(n, 2, generator=g) * 20
    box_list = torch.cat([box_list, box_list + 4 + torch.rand(n, 2, generator=g) * 14], 1)  # (n, 4)
    box_list[0] = torch.tensor([0.0, 0.0, 40.0, 40.0])  # no room at all: skipped
    images = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    for i, b in enumerate(box_list.tolist()):
        images[i, :, box_pixels(b, side, 0)] = 255  # box pixels white, the rest black
    whole = SegmentationSet(images=images, boxes=box_list, protocol="painted boxes")
    patches, windows, sources, skipped = background_pool(whole, 16, per_image=3, side_frac=(0.2, 0.4), margin=0)
    assert skipped >= 1 and 0 not in sources.tolist() and len(patches) == 3 * (n - skipped)
    assert patches.shape[1:] == (3, 16, 16) and patches.max() == 0  # not one pixel of white leaked in
    with pytest.raises(ValueError, match="boxes"):
        background_pool(SegmentationSet(images=images), 16)
    with pytest.raises(ValueError, match="outside its box"):
        background_pool(whole.subset([0]), 16)


def test_area_penalty_by_hand():
    masks = torch.zeros(2, 3, 1, 4, 4)
    masks[0, 0, :, :2] = 1.0  # area 0.5
    masks[0, 1] = 0.25        # 0.25 everywhere
    masks[1, 2] = 1.0         # area 1; the others 0
    # (0.25^2 + 0 + 0.25^2 + 0.25^2 + 0.25^2 + 0.75^2) / 6 with a = 0.25
    expected = (4 * 0.0625 + 0.5625) / 6
    assert area_penalty(masks, 0.25).item() == pytest.approx(expected)
    assert area_penalty(torch.full((3, 1, 1, 8, 8), 0.25), 0.25).item() == 0.0


def flood_fill_count(mask, connectivity):
    """Independent reference: breadth-first search over a 2-D bool list of lists."""
    H, W = len(mask), len(mask[0])
    steps = [(1, 0), (-1, 0), (0, 1), (0, -1)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if connectivity == 8 else [])
    seen, sizes = set(), []
    for y in range(H):
        for x in range(W):
            if mask[y][x] and (y, x) not in seen:
                seen.add((y, x))
                queue, size = deque([(y, x)]), 0
                while queue:
                    cy, cx = queue.popleft()
                    size += 1
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < H and 0 <= nx < W and mask[ny][nx] and (ny, nx) not in seen:
                            seen.add((ny, nx))
                            queue.append((ny, nx))
                sizes.append(size)
    return sizes


def test_connected_components_on_hand_made_masks():
    masks = torch.zeros(4, 6, 6, dtype=torch.bool)
    masks[1, 1:4, 1:3] = True             # one blob
    masks[2, 0:2, 0:2] = True             # two blobs far apart
    masks[2, 4:6, 3:6] = True
    masks[3, 1, 1] = masks[3, 2, 2] = masks[3, 3, 3] = True  # a diagonal line
    assert count_components(masks, connectivity=8).tolist() == [0, 1, 2, 1]
    assert count_components(masks, connectivity=4).tolist() == [0, 1, 2, 3]
    assert count_components(masks, min_area=5, connectivity=4).tolist() == [0, 1, 1, 0]  # 6 px and 4 px + 6 px
    labels = connected_components(masks[2:3], connectivity=4)[0]
    assert labels[0, 0] == 1 and labels[5, 5] == 4 * 6 + 3 + 1  # smallest flat index + 1 of each component
    assert (labels == 0).sum() == 36 - 10
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(masks, connectivity=6)


@settings(max_examples=40, deadline=None)
@given(bits=st.lists(st.booleans(), min_size=64, max_size=64), connectivity=st.sampled_from([4, 8]),
       min_area=st.integers(1, 4))
def test_component_counts_match_a_flood_fill(bits, connectivity, min_area):
    mask = torch.tensor(bits).view(8, 8)
    sizes = flood_fill_count(mask.tolist(), connectivity)
    assert count_components(mask[None], min_area, connectivity).item() == sum(s >= min_area for s in sizes)


def test_cut_patches_and_instance_sizes():
    image = torch.arange(3 * 10 * 12, dtype=torch.int64).view(3, 10, 12).remainder(251).to(torch.uint8)
    patches = cut_patches(image, 4, 4, 2)  # window == size: plain crops
    assert patches.shape == (4 * 5, 3, 4, 4)
    assert torch.equal(patches[0], image[:, :4, :4]) and torch.equal(patches[6], image[:, 2:6, 2:6])
    with pytest.raises(ValueError, match="window"):
        cut_patches(image, 11, 4, 2)
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, 0:3, 0:5] = True  # extent 5, touches the border: not in the area median
    masks[1, 2:4, 2:4] = True  # area 4
    masks[2, 5:9, 5:8] = True  # area 12, extent 4
    assert instance_sizes(masks) == (5, 8.0)


def ellipse(size, cx, cy, a, b, angle=0.0):
    """(size, size) bool ellipse with half-axes a, b (px) turned by angle (radians), drawn independently."""
    i = torch.arange(size, dtype=torch.float64) + 0.5
    dy, dx = i[:, None] - cy, i[None] - cx
    u = math.cos(angle) * dx + math.sin(angle) * dy
    v = -math.sin(angle) * dx + math.cos(angle) * dy
    return (u / a) ** 2 + (v / b) ** 2 < 1


def test_elongation_of_disks_and_ellipses():
    masks = torch.stack([ellipse(64, 32, 32, 12, 12), ellipse(64, 30, 33, 16, 8, 0.7), torch.zeros(64, 64, dtype=torch.bool)])
    e = elongation(masks)
    assert e[0] == pytest.approx(1.0, abs=0.03) and e[1] == pytest.approx(2.0, abs=0.08) and torch.isnan(e[2])


@settings(max_examples=20, deadline=None)
@given(dx=st.integers(-8, 8), dy=st.integers(-8, 8), angle=st.floats(0, 3.1))
def test_shape_iou_ignores_position_and_finds_a_turned_template(dx, dy, angle):
    picture = torch.stack([ellipse(96, 30, 30, 12, 6), ellipse(96, 66, 66, 9, 9)])  # one seed-like, one round
    templates = shape_templates(picture, window=48, size=32, top=2, angles=24)
    assert templates.shape == (2 * 2 * 24, 32, 32)
    seed = ellipse(32, 16, 16, 8, 4, angle)  # the first instance at patch scale (48 px -> 32 px), turned
    moved = torch.roll(seed, (dy, dx), (0, 1))
    here, there = best_shape_iou(torch.stack([seed, moved]), templates)
    assert here == pytest.approx(there.item(), abs=1e-6) and here > 0.8  # turned templates every 15 deg
    disk = ellipse(32, 16, 16, 6, 6)
    # rows: the ellipse's 24 turns, the disk's 24, then both mirrored
    assert best_shape_iou(disk[None], templates[:24]).item() < 0.75 < best_shape_iou(disk[None], templates[24:48]).item()
    assert best_shape_iou(torch.zeros(1, 32, 32, dtype=torch.bool), templates).item() == 0


def test_shape_scores_tell_a_seed_from_a_blob():
    from minseg.data.cluster import make_cluster_image
    _, masks = make_cluster_image(128, seed=0, kind="seeds")
    extent, _ = instance_sizes(masks)
    window = round(1.5 * extent)
    templates = shape_templates(masks, window, 32)
    seeds = templates[5::24][:8].float()  # true shapes as "generated" layers
    blobs = ellipse(32, 16, 16, 6, 6)[None].float().expand(8, -1, -1)
    good, bad = shape_scores(seeds, masks, window, 32), shape_scores(blobs, masks, window, 32)
    assert good["shape_iou"] == pytest.approx(1.0) and good["elongation"] > 1.5 > bad["elongation"]
    assert bad["shape_iou"] < good["shape_iou_true"] and good["shape_iou_disk"] < good["shape_iou_true"]


def tiny_carver(size=32, seed=0, **config):
    torch.manual_seed(seed)
    cfg = IndependenceConfig(size=size, seg_width=4, seg_depth=2, disc_width=4, **config)
    patches = (torch.rand(6, 3, size, size) * 255).to(torch.uint8)
    return ForegroundCarver(cfg, PatchPool(patches), torch.rand(3, 3, size, size) * 2 - 1)


def tiny_cluster_gan(seed=0):
    torch.manual_seed(seed)
    cfg = ClusterConfig(size=32, num_layers=3, z_dim=2, gen_width=8, disc_width=4)
    return ClusterGAN(cfg, PatchPool((torch.rand(6, 3, 32, 32) * 255).to(torch.uint8), vflip=True))


@pytest.mark.parametrize("make", [tiny_carver, tiny_cluster_gan])
def test_train_steps_finite_and_state_round_trip(make, tmp_path):
    method = make()
    for step in range(3):
        stats = method.train_step({"image": torch.rand(4, 3, 32, 32) * 2 - 1})
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
        assert stats["skipped"] == 0 and 0 <= stats["mask_mean"] <= 1
    method.snapshot(tmp_path / "snap.png")
    assert (tmp_path / "snap.png").exists()
    clone = make(seed=1)
    clone.load_state_dict(method.state_dict())
    for name in ("S", "D") if hasattr(method, "S") else ("G", "D", "Q"):
        for a, b in zip(getattr(method, name).state_dict().values(), getattr(clone, name).state_dict().values()):
            torch.testing.assert_close(a, b)
    opt = "opt_S" if hasattr(method, "S") else "opt_G"
    for ours, theirs in zip(getattr(method, opt).state_dict()["state"].values(),
                            getattr(clone, opt).state_dict()["state"].values()):
        torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"])


def test_teacher_ema_averages_S_and_survives_a_checkpoint():
    plain, method = tiny_carver(), tiny_carver(teacher_ema=0.9)
    assert plain.teacher() is plain.S
    average = [p.detach().clone() for p in method.S.parameters()]
    for n in range(30):
        method.train_step({"image": torch.rand(4, 3, 32, 32) * 2 - 1})
        decay = min(0.9, (1 + n) / (10 + n))  # the ramped decay, recomputed by hand
        average = [decay * a + (1 - decay) * p.detach() for a, p in zip(average, method.S.parameters())]
    teacher = method.teacher()
    assert teacher is method.S_ema.net and not teacher.training
    for a, q, p in zip(average, teacher.parameters(), method.S.parameters()):
        torch.testing.assert_close(q, a)
    assert any(not torch.equal(q, p) for q, p in zip(teacher.parameters(), method.S.parameters()))
    clone = tiny_carver(seed=1, teacher_ema=0.9)
    clone.load_state_dict(method.state_dict())
    assert clone.S_ema.updates == 30
    for a, b in zip(teacher.state_dict().values(), clone.teacher().state_dict().values()):
        torch.testing.assert_close(a, b)
    old = tiny_carver(seed=2, teacher_ema=0.9)  # a checkpoint written without the average starts it from S
    old.load_state_dict(plain.state_dict())
    for a, b in zip(plain.S.state_dict().values(), old.teacher().state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cluster_layers_are_translated_and_composited():
    method = tiny_cluster_gan()
    method.cfg.shift_frac = 0.0  # no layout warp: warped alphas are the provider's alphas
    out = method.generate(2)
    assert out["rgb"].shape == (2, 3, 3, 32, 32) and out["alpha"].shape == (2, 3, 1, 32, 32)
    torch.testing.assert_close(out["warped"], out["alpha"])
    assert method.backgrounds(2)[:, :, 16, 16].eq(-1).all()  # the black disk
    assert out["image"].shape == (2, 3, 32, 32)


def test_cluster_layout_rotation_turns_the_layers():
    method = tiny_cluster_gan()
    method.cfg.shift_frac, method.cfg.rotation_deg = 0.0, 180.0
    bar = torch.zeros(1, 1, 32, 32)
    bar[..., 14:18, 4:28] = 1.0  # a horizontal bar through the centre
    method.G = lambda z: (torch.zeros(len(z), 3, 32, 32), bar.expand(len(z), -1, -1, -1))
    warped = method.generate(64)["warped"][:, :, 0]  # (64, 3, 32, 32)
    rows, cols = warped.sum(-1).amax(-1), warped.sum(-2).amax(-1)  # the longest row and column of each layer
    assert (warped[..., 16, 16] > 0.9).all()  # turned about the centre
    assert (cols > 12).any() and (rows > 12).any()  # some layers come out upright, some still lying
    method.cfg.rotation_deg = 0.0
    torch.testing.assert_close(method.generate(2)["warped"][:, :, 0], bar.expand(2, 3, -1, -1))


def test_bad_configs_and_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        IndependenceConfig(size=40)
    with pytest.raises(ValueError, match="size"):
        ClusterConfig(size=48)
    for turn in (-1.0, 181.0):
        with pytest.raises(ValueError, match="rotation_deg"):
            ClusterConfig(rotation_deg=turn)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("nope", "shapes")
    with pytest.raises(ValueError, match="distill_lr_decay must be one of"):
        make_schedule("quick", "shapes", distill_lr_decay="step")
    with pytest.raises(ValueError, match="student_width"):
        make_schedule("quick", "shapes", student_width=-1)
    with pytest.raises(ValueError, match="distill_rounds"):
        make_schedule("quick", "shapes", distill_rounds=0)
    with pytest.raises(ValueError, match="distill_augment"):
        make_schedule("quick", "shapes", distill_augment="yes")
    for scale in ((0.0, 1.0), (0.9, 0.5), (0.5, 1.5), 0.5):
        with pytest.raises(ValueError, match="distill_crop_scale"):
            make_schedule("quick", "shapes", distill_crop_scale=scale)
    for preset in PRESETS.values():
        IndependenceConfig(**preset)
    for preset in HOC_PRESETS.values():
        ClusterConfig(**preset)
    with pytest.raises(ValueError, match="background_set"):
        run(IndependenceConfig(size=32), Schedule(), None, None, tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        run_hoc(ClusterConfig(size=32), torch.zeros(3, 64, 64), tmp_path)
    with pytest.raises(ValueError, match="window"):
        run_hoc(ClusterConfig(size=32), torch.zeros(3, 64, 64, dtype=torch.uint8), tmp_path)


TINY_SCHEDULE = Schedule(gan_images=16, distill_steps=2, batch_size=8, tick_images=8, snapshot_images=16)


def check_results(out_dir, rounds=1):
    results = json.loads((out_dir / "results.json").read_text())
    later = [f"student (distilled), round {r}" for r in range(2, rounds + 1)]
    assert results["method"] == "independence" and [r["run"] for r in results["rows"]] == [
        "teacher (adversarial)", "student (distilled)", *later]
    for row in results["rows"]:
        assert all(0 <= row[k] <= 1 for k in ("acc", "iou", "miou"))
    assert results["rows"][-1]["iou"] == pytest.approx(results["iou"])  # the last student's
    assert results["rows"][0]["iou"] == pytest.approx(results["teacher_iou"])
    assert "teacher" in (out_dir / "results.md").read_text()
    for name in ("teacher.pt", "segmenter.pt", "checkpoint.pt", "teacher-predictions.png", "test-predictions.png"):
        assert (out_dir / name).exists(), name
    assert list((out_dir / "samples").glob("gan-*.png"))


def test_run_end_to_end_on_tiny_shapes(tmp_path):
    from minseg.data import load_dataset
    train = load_dataset("shapes", "train", 32, protocol="box", limit=64)
    test = load_dataset("shapes", "test", 32, protocol="box", limit=16)
    cfg = IndependenceConfig(size=32, seg_width=4, seg_depth=2, disc_width=4)
    whole = load_background_set("shapes", 32, limit=64)
    run(cfg, TINY_SCHEDULE, train, test, tmp_path, background_set=whole, progress=False)
    check_results(tmp_path)
    assert torch.load(tmp_path / "segmenter.pt", weights_only=True)["config"]["width"] == 4  # the carver's width
    wider = dataclasses.replace(TINY_SCHEDULE, student_width=6, distill_augment=False, distill_rounds=2)
    run(cfg, wider, train, test, tmp_path / "wide", background_set=whole, progress=False)
    check_results(tmp_path / "wide", rounds=2)
    assert torch.load(tmp_path / "wide" / "segmenter.pt", weights_only=True)["config"]["width"] == 6
    assert torch.load(tmp_path / "wide" / "teacher.pt", weights_only=True)["config"]["width"] == 4
    with pytest.raises(ValueError, match="px"):
        run(IndependenceConfig(size=64), TINY_SCHEDULE, train, test, tmp_path / "bad", background_set=whole)


def test_run_on_the_cub_layout(tmp_path):
    from cub_fixture import METADATA, make_cub_fixture
    if not METADATA.is_dir():
        pytest.skip(f"CUB metadata not found at {METADATA}")
    from minseg.data import load_dataset
    root = make_cub_fixture(tmp_path / "cub", n_images=8)
    train = load_dataset("cub", "train", 32, root, protocol="box", limit=8)
    test = load_dataset("cub", "test", 32, root, protocol="box", limit=8)
    whole = load_background_set("cub", 32, root, limit=8)
    assert len(train) == len(whole) == 8 and train.names == whole.names
    cfg = IndependenceConfig(size=32, seg_width=4, seg_depth=2, disc_width=4, bg_side_frac=(0.15, 0.3))
    run(cfg, TINY_SCHEDULE, train, test, tmp_path / "run", background_set=whole, progress=False)
    check_results(tmp_path / "run")


def test_run_hoc_on_the_builtin_cluster_picture(tmp_path):
    from minseg.data.cluster import make_cluster_image
    image, masks = make_cluster_image(128, seed=0, kind="seeds")
    cfg = ClusterConfig(size=32, num_layers=2, z_dim=2, gen_width=8, disc_width=4, patch_stride=16)
    schedule = HOCSchedule(gan_images=8, batch_size=4, tick_images=4, snapshot_images=8, eval_layers=8)
    scores = run_hoc(cfg, image, tmp_path, instance_masks=masks, schedule=schedule, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    extent, _ = instance_sizes(masks)
    assert results["window_px"] == round(1.5 * extent) and results["layers_scored"] == 8
    shares = results["one_instance"] + results["no_instance"] + results["several_instances"]
    assert shares == pytest.approx(1.0) and results["true_area_px"] > 0
    assert scores["mask_area_px"] == pytest.approx(results["mask_area_px"])
    assert 0 <= results["shape_iou"] <= 1 and results["shape_iou_disk"] < results["shape_iou_true"] <= 1
    assert (tmp_path / "instances.png").exists() and list((tmp_path / "samples").glob("hoc-*.png"))
