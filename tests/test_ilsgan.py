"""The layered GAN's training step (minseg/methods/ilsgan.py) against an independent transcript of eq. 5-6."""
import pytest
import torch
import torch.nn.functional as F

from minseg.methods import ilsgan


def small_method(seed=0, **overrides):
    torch.manual_seed(seed)
    return ilsgan.ILSGAN(ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4, **overrides))


def reference_step(method, real):
    """One D step then one G step, written out plainly, every network trainable throughout."""
    cfg, B = method.cfg, real.shape[0]
    z, c = method.G.sample_codes(B, "cpu")
    with torch.no_grad():
        out = method.G(z, c)
        fake, _ = method.compose(out)
    real_logits, _ = method.D(real)
    fake_logits, code_logits = method.D(fake)
    loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    mi = F.cross_entropy(code_logits, c) + F.cross_entropy(method.E_pi(out["mask"]), c // cfg.group_size)
    loss = loss + cfg.g_mi * mi
    method.opt_D.zero_grad(set_to_none=True)
    loss.backward()
    method.opt_D.step()

    out = method.G(z, c)
    fake, mask = method.compose(out)
    fake_logits, code_logits = method.D(fake)
    mi = F.cross_entropy(code_logits, c) + F.cross_entropy(method.E_pi(out["mask"]), c // cfg.group_size)
    loss = -fake_logits.mean() + cfg.g_mi * mi + cfg.g_bin * torch.minimum(mask, 1 - mask).mean()
    if cfg.mask_ceiling is not None:  # the cap on each sample's mask area: mean over samples of the excess
        area = out["mask"].mean((1, 2, 3))
        loss = loss + cfg.g_ceiling * torch.where(area > cfg.mask_ceiling, area - cfg.mask_ceiling, 0.0).mean()
    method.opt_G.zero_grad(set_to_none=True)
    loss.backward()
    method.opt_G.step()
    method.G_ema.update(method.G)


@pytest.mark.parametrize("ceiling", [None, 0.57])
def test_training_step_matches_the_plain_transcript(ceiling):
    """The step freezes D and E_pi during the generator's update (no weight gradients for them); G must get the same
    gradients as with everything trainable, and D, E_pi must be trainable again afterwards. With a mask ceiling the
    generator's loss gains the capped area term (0.57: some untrained samples lie above it, some below)."""
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    ours, reference = small_method(mask_ceiling=ceiling), small_method(mask_ceiling=ceiling)
    for _ in range(3):
        torch.manual_seed(1)
        stats = ours.train_step({"image": real})
        assert (stats["loss_area"] > 0) == (ceiling is not None)
        torch.manual_seed(1)
        reference_step(reference, real)
    for name in ("G", "D", "E_pi"):
        a, b = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
    assert all(p.requires_grad for p in [*ours.D.parameters(), *ours.E_pi.parameters()])


def test_discriminator_rate_defaults_to_the_shared_one():
    shared = small_method()
    assert [g["lr"] for g in shared.opt_D.param_groups] == [shared.cfg.lr]
    cfg = ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4, lr=1e-4, lr_D=4e-4)
    two_rates = ilsgan.ILSGAN(cfg)
    assert [g["lr"] for g in two_rates.opt_D.param_groups] == [4e-4]
    assert [g["lr"] for g in two_rates.opt_G.param_groups] == [1e-4]


def test_settle_sampler_measures_the_ema_generators_own_statistics_only_when_asked():
    method = small_method()
    method.train_step({"image": torch.rand(4, 3, 32, 32) * 2 - 1})
    norm = method.G_ema.net.trunk[0][1]  # the trunk's first BatchNorm1d, copied from G at the EMA update
    copied = norm.running_mean.clone()
    rng = torch.get_rng_state()
    method.settle_sampler(0, 8)  # final_standing_stats = 0: nothing happens, no random number is drawn
    assert torch.equal(norm.running_mean, copied) and torch.equal(torch.get_rng_state(), rng)
    method.settle_sampler(4, 8)
    assert not torch.equal(norm.running_mean, copied) and not method.G_ema.net.training
    assert any(not torch.equal(a, b) for a, b in zip(method.G_ema.net.parameters(), method.G.parameters()))
    method.settle_sampler(0, 8, raw=True)  # final_sampler = "raw": the trained G's weights and statistics
    for (name, a), b in zip(method.G_ema.net.state_dict().items(), method.G.state_dict().values()):
        assert torch.equal(a, b), name
    assert method.G_ema.net is not method.G and not method.G_ema.net.training


@pytest.mark.parametrize("field, value, message", [
    ("final_sampler", "average", "final_sampler must be 'ema' or 'raw'"),
    ("final_lr_decay", "linear", "final_lr_decay must be one of"),
    ("final_standing_stats", -1, "final_standing_stats must be an int >= 0"),
    ("final_self_train", -5, "final_self_train must be an int >= 0"),
])
def test_schedule_refuses_bad_final_settings_before_training(field, value, message):
    with pytest.raises(ValueError, match=message):
        ilsgan.Schedule(**{field: value})


@pytest.mark.parametrize("background_code", ["public", "own"])
def test_background_code_decides_what_the_background_sees(background_code):
    """With "public" the background is drawn from the foreground's z (the paper); with "own" from a code of its own,
    so that changing it leaves foreground and mask as they were and changing the public code leaves the background."""
    torch.manual_seed(0)
    cfg = ilsgan.ILSGANConfig(size=16, gen_width=4, z_dim=6, num_codes=4, background_code=background_code)
    G = ilsgan.LayeredGenerator(cfg).eval()
    z, c = G.sample_codes(5, "cpu")
    assert z.shape == (5, 12 if background_code == "own" else 6)
    public_changed = z.clone()
    public_changed[:, :6] = torch.randn(5, 6)
    base, new_public = G(z, c), G(public_changed, c)
    assert (new_public["mask"] - base["mask"]).abs().amax() > 1e-3
    if background_code == "public":
        assert (new_public["background"] - base["background"]).abs().amax() > 1e-3
        return
    torch.testing.assert_close(new_public["background"], base["background"])
    own_changed = z.clone()
    own_changed[:, 6:] = torch.randn(5, 6)
    new_own = G(own_changed, c)
    torch.testing.assert_close(new_own["mask"], base["mask"])
    torch.testing.assert_close(new_own["foreground"], base["foreground"])
    assert (new_own["background"] - base["background"]).abs().amax() > 1e-3


def test_fg_width_widens_the_foreground_side_only():
    """`fg_width` sets the channels of the mask/foreground trunk and colour branch; the background keeps gen_width,
    and the annotation features (trunk | background at each resolution) carry both."""
    cfg = ilsgan.ILSGANConfig(size=16, gen_width=4, fg_width=12, z_dim=6, num_codes=4)
    G = ilsgan.LayeredGenerator(cfg)
    default = ilsgan.LayeredGenerator(ilsgan.ILSGANConfig(size=16, gen_width=4, z_dim=6, num_codes=4))
    assert G.background[1].in_channels == default.background[1].in_channels == 4
    assert (G.mask_head.in_channels, default.mask_head.in_channels) == (12, 4)
    n_bg = sum(p.numel() for p in G.background.parameters())
    assert n_bg == sum(p.numel() for p in default.background.parameters())
    out = G(*G.sample_codes(3, "cpu"), return_features=True)
    assert out["foreground"].shape == out["background"].shape == (3, 3, 16, 16)
    assert [f.shape[1] for f in out["features"]] == [24 + 8, 12 + 4]  # 8 x 8 (x2 channels), then 16 x 16


def test_collapse_is_a_mask_near_none_or_all_of_the_picture():
    method = small_method()
    assert method.collapse_message({"mask_mean": 0.21}) is None
    assert method.collapse_message({"mask_mean": 0.9}) is None
    assert "all foreground" in method.collapse_message({"mask_mean": 0.97})
    assert "all background" in method.collapse_message({"mask_mean": 0.01})


def test_background_code_is_checked():
    with pytest.raises(ValueError, match="background_code"):
        ilsgan.ILSGANConfig(background_code="private")
    with pytest.raises(ValueError, match="fg_width must be None"):
        ilsgan.ILSGANConfig(fg_width=0)
    with pytest.raises(ValueError, match="mask_ceiling must be None"):
        ilsgan.ILSGANConfig(mask_ceiling=1.5)


def test_contrast_jitter_scales_about_the_mean_within_the_original_range():
    """PerturbGAN's background jitter: factor 1 is the identity; factor k scales each image's deviations from its own
    mean by k, except where that leaves the image's original [min, max], where it is clamped."""
    from minseg.ops import contrast_jitter
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(contrast_jitter(images, (1.0, 1.0)), images, atol=1e-12, rtol=0)
    mean = images.mean((1, 2, 3), keepdim=True)
    lo, hi = images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True)
    torch.testing.assert_close(contrast_jitter(images, (0.5, 0.5)), (images - mean) * 0.5 + mean, atol=1e-12, rtol=0)
    strong = contrast_jitter(images, (1.5, 1.5))
    torch.testing.assert_close(strong, ((images - mean) * 1.5 + mean).clamp(lo, hi), atol=1e-12, rtol=0)
    assert (strong == hi).any() and (strong == lo).any()  # some pixels were pushed past the range and clamped
    drawn = contrast_jitter(images, (0.7, 1.3), generator=torch.Generator().manual_seed(1))
    k = (drawn - mean).abs().sum((1, 2, 3)) / (images - mean).abs().sum((1, 2, 3))  # per image, before clamping <= k
    assert ((k > 0.5) & (k < 1.3 + 1e-9)).all() and len(set(k.tolist())) == 4  # one factor per image
