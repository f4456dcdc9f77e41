"""GANSeg (minseg.methods.ganseg): translation equivariance of the generator by construction (appendix E), the
part geometry and losses against hand-computed values, training steps, state round trip, and run() end to end."""
import json
import math

import pytest
import torch

from minseg.methods.ganseg import (PRESETS, GANSeg, GANSegConfig, Schedule, area_loss, concentration_loss,
                                   make_schedule, part_geometry, run)
from minseg.ops import part_heatmaps, pixel_grid
from minseg.visual import PART_COLOURS, draw_points


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(size=128, resolutions=(32, 64, 128), **overrides):
    """Tiny widths; two 2x upsamples, so shifts by multiples of 4 output px are whole pixels at every level."""
    values = dict(size=size, num_parts=3, n_per=4, z_dim=16, emb_dim=8, resolutions=resolutions, widths=(8, 8, 8),
                  mask_width=8, spade_hidden=8, disc_width=8)
    values.update(overrides)
    return GANSegConfig(**values)


def fake_batch(cfg, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(batch, 3, cfg.size, cfg.size, generator=g) * 2 - 1}


@pytest.fixture(scope="module")
def trained_method():
    torch.manual_seed(0)
    method = GANSeg(tiny_config(lr_G=1e-2, lr_D=1e-2))  # large steps: the weights move far from their init
    for _ in range(3):
        method.train_step(fake_batch(method.cfg, batch=2))
    return method


def shifted_pair(G, tx, ty, move_background=True, seed=1):
    """Outputs for explicit points / bg centre, and for all of them moved by (tx, ty) output pixels."""
    torch.manual_seed(seed)
    codes = G.sample_codes(2, "cpu")
    del codes["z_point"]
    points = torch.rand(2, G.cfg.num_parts * G.cfg.n_per, 2) - 0.5
    t = torch.tensor([tx, ty], dtype=torch.float32) * 2 / G.cfg.size  # pixels -> normalised units
    moved = dict(codes, bg_center=codes["bg_center"] + t if move_background else codes["bg_center"])
    with torch.no_grad():
        return G(points=points, **codes), G(points=points + t, **moved)


def interior_error(a, b, tx, ty, band):
    """max |roll(a, t) - b| over pixels at least `band` px from every border."""
    diff = (torch.roll(a, (ty, tx), (-2, -1)) - b).abs()
    return diff[..., band:a.shape[-2] - band, band:a.shape[-1] - band].max().item()


# Border band: masks come from a branch whose margins absorb every padding effect, so they are exact wherever the
# roll does not wrap (band = |t|). The foreground branch's coarsest level has only margin // 4 = 2 px of true mask
# beyond the image (the rest is edge-padded); with the receptive field of the later layers and the final convs'
# zero padding that reaches about 20 output px inward: band = |t| + 24 for the image.
@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "trained"])
@pytest.mark.parametrize("tx, ty", [(4, 0), (0, -4), (8, 4), (-4, -8)])
def test_generator_is_translation_equivariant(trained, tx, ty, trained_method):
    G = trained_method.G if trained else GANSeg(tiny_config()).G
    G.eval()
    a, b = shifted_pair(G, tx, ty)
    shift = max(abs(tx), abs(ty))
    assert interior_error(a["masks"], b["masks"], tx, ty, band=shift) < 1e-5
    assert interior_error(a["image"], b["image"], tx, ty, band=shift + 24) < 1e-5
    assert torch.equal(b["parts"][:, shift:-shift, shift:-shift],
                       torch.roll(a["parts"], (ty, tx), (-2, -1))[:, shift:-shift, shift:-shift])
    # the shift is visible: the unshifted outputs differ from the shifted ones
    assert (a["masks"] - b["masks"]).abs().max() > 1e-2


def test_background_not_moved_breaks_image_equivariance(trained_method):
    """Control: a background centre left behind must show up in the compared interior (the test can fail)."""
    G = trained_method.G.eval()
    a, b = shifted_pair(G, 4, 0, move_background=False)
    assert interior_error(a["masks"], b["masks"], 4, 0, band=4) < 1e-5  # masks ignore the background
    assert interior_error(a["image"], b["image"], 4, 0, band=28) > 1e-3


def test_part_geometry_by_hand():
    # part 0: unit square corners -> centre (0.5, 0.5), sum of squared distances 4 * 0.5 = 2, sigma sqrt(2) / 3
    # part 1: four copies of (0.2, -0.1) -> zero spread (floored at sqrt(1e-8) / 3)
    points = torch.tensor([[[0, 0], [1, 0], [0, 1], [1, 1], [.2, -.1], [.2, -.1], [.2, -.1], [.2, -.1]]]).float()
    centres, sigmas = part_geometry(points, 2)
    torch.testing.assert_close(centres, torch.tensor([[[0.5, 0.5], [0.2, -0.1]]]))
    torch.testing.assert_close(sigmas, torch.tensor([[math.sqrt(2) / 3, 1e-4 / 3]]))
    _, fixed = part_geometry(points, 2, fixed_sigma=0.05)  # ablation F.2
    torch.testing.assert_close(fixed, torch.full((1, 2), 0.05))


def test_concentration_and_area_losses_by_hand():
    size = 8
    grid = pixel_grid((size, size))  # (8, 8, 2)
    masks = torch.zeros(1, 3, size, size)  # background + 2 parts
    masks[0, 0] = 1
    masks[0, 1, 2, 5] = 1  # part 1 is one pixel (row 2, column 5)
    masks[0, 2, 6, 1] = masks[0, 2, 6, 3] = 0.5  # part 2 is two half pixels
    centres = torch.tensor([[[0.0, 0.0], [0.25, -0.75]]])
    expected = ((grid[2, 5] - centres[0, 0]) ** 2).sum() + 0.5 * (((grid[6, 1] - centres[0, 1]) ** 2).sum()
                                                                  + ((grid[6, 3] - centres[0, 1]) ** 2).sum())
    assert concentration_loss(masks, centres).item() == pytest.approx(expected.item(), rel=1e-5)

    sigmas = torch.tensor([[0.3, 0.2]])
    heat = torch.exp(-((grid[None] - centres[0, :, None, None]) ** 2).sum(-1) / sigmas[0, :, None, None] ** 2)
    expected = sum(max(0.0, heat[k].sum().item() - masks[0, k + 1].sum().item()) for k in range(2))
    assert area_loss(masks, centres, sigmas).item() == pytest.approx(expected, rel=1e-5)
    # counted in px of a 32 px image: 16 of them per px of this 8 px one
    assert area_loss(masks, centres, sigmas, reference_size=32).item() == pytest.approx(16 * expected, rel=1e-5)
    masks[0, 1:] = 1  # masks far larger than the heatmaps: no penalty
    assert area_loss(masks, centres, sigmas).item() == 0.0


def test_draw_points_colours_the_pixel_under_each_point():
    images = torch.zeros(1, 3, 10, 10)
    pixel = pixel_grid((10, 10))  # pixel (row, column) centre at pixel[row, column]
    points = torch.stack([pixel[2, 7], pixel[6, 1]])[None]  # one point for each of 2 parts
    out = draw_points(images, points, num_parts=2, radius=0)
    torch.testing.assert_close(out[0, :, 2, 7], PART_COLOURS[1])
    torch.testing.assert_close(out[0, :, 6, 1], PART_COLOURS[2])
    assert (out[0] != 0).any(0).sum() == 2 and images.abs().sum() == 0  # nothing else drawn; input untouched


def test_generator_outputs_and_masks_form_a_partition():
    cfg = tiny_config(size=32, resolutions=(8, 16, 32))
    G = GANSeg(cfg).G
    out = G(**G.sample_codes(3, "cpu"))
    assert out["image"].shape == (3, 3, 32, 32) and out["image"].abs().max() <= 1
    assert out["masks"].shape == (3, cfg.num_parts + 1, 32, 32)
    torch.testing.assert_close(out["masks"].sum(1), torch.ones(3, 32, 32))
    assert out["points"].shape == (3, cfg.num_parts * cfg.n_per, 2) and out["points"].abs().max() < 1
    heat, _ = part_heatmaps(out["centres"], out["sigmas"], torch.zeros(3, cfg.num_parts, 1), (32, 32))
    assert torch.isfinite(heat).all()


def test_train_steps_and_state_round_trip(trained_method):
    method = trained_method
    method.G.train()  # other tests leave it in eval mode
    stats = method.train_step(fake_batch(method.cfg, seed=5))
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert stats["skipped"] == 0 and method.skipped_steps == 0
    assert stats["loss_gp"] > 0  # computed on the first D step (lazy: every 16th)
    assert 0 <= stats["fg"] <= 1

    clone = GANSeg(method.cfg)
    clone.load_state_dict(method.state_dict())
    assert (clone.d_steps, clone.g_steps) == (method.d_steps, method.g_steps)
    codes = method.G.sample_codes(2, "cpu")
    with torch.no_grad():
        a, b = method.G.eval()(**codes), clone.G.eval()(**codes)
    torch.testing.assert_close(a["image"], b["image"])
    x = fake_batch(method.cfg, seed=6)["image"]
    torch.testing.assert_close(method.D(x), clone.D(x))
    for ours, theirs in zip(method.opt_G.state_dict()["state"].values(), clone.opt_G.state_dict()["state"].values()):
        torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"])


def test_point_scale_sets_the_initial_pose_variety():
    """The `spread` stat (std over the batch of the part centres) grows with point_scale: the knob that decides how
    varied the untrained generator's poses are (tanh(point_scale * MLP(z)))."""
    spreads = []
    for scale in (0.15, 1.0):
        torch.manual_seed(0)
        method = GANSeg(tiny_config(size=32, resolutions=(8, 16, 32), point_scale=scale))
        spreads.append(method.train_step(fake_batch(method.cfg, batch=16))["spread"])
    assert 0 < spreads[0] and 3 * spreads[0] < spreads[1], spreads


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="resolutions"):
        tiny_config(resolutions=(32, 96, 128))
    with pytest.raises(ValueError, match="n_per"):
        tiny_config(n_per=1)
    with pytest.raises(ValueError, match="widths"):
        tiny_config(widths=(8, 8))
    G = GANSeg(tiny_config(size=32, resolutions=(8, 16, 32))).G
    codes = G.sample_codes(1, "cpu")
    with pytest.raises(ValueError, match="exactly one"):
        G(points=torch.zeros(1, 12, 2), **codes)
    del codes["z_point"]
    with pytest.raises(ValueError, match="points must be"):
        G(points=torch.zeros(1, 5, 2), **codes)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("nope", "shapes")
    for name, preset in PRESETS.items():
        GANSegConfig(**preset)  # every preset is a valid config


def test_run_end_to_end_on_tiny_shapes(tmp_path):
    from minseg.data import load_dataset
    train = load_dataset("shapes", split="train", size=32, limit=64)
    test = load_dataset("shapes", split="test", size=32, limit=16)
    cfg = tiny_config(size=32, resolutions=(8, 16, 32), num_parts=4)
    schedule = Schedule(gan_images=16, final_steps=3, batch_size=8, seg_batch_size=8, tick_images=8,
                        snapshot_images=16, keypoint_fit_images=64)
    metrics = run(cfg, schedule, train, test, tmp_path, seed=0, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "ganseg" and 0 <= results["iou"] <= 1
    assert results["kp_error"] == pytest.approx(metrics["kp_error"]) and results["kp_error"] > 0
    assert results["kp_box_baseline"] == pytest.approx(metrics["kp_box_baseline"]) and results["kp_box_baseline"] > 0
    assert (tmp_path / "test-parts.png").exists() and (tmp_path / "checkpoint.pt").exists()
    assert list((tmp_path / "samples").glob("gan-*.png"))

    with pytest.raises(ValueError, match="px"):
        run(tiny_config(), schedule, train, test, tmp_path / "bad", progress=False)
