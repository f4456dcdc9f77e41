"""GAN annotation (minseg.methods.annotation): generator features, the decoder fitting its masks, the checks on
painted masks, and the annotate gan -> export -> paint -> train and curve commands end to end on tiny nets."""
import importlib.util
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from minseg.cli import main
from minseg.methods.annotation import IGNORE, FrozenGenerator, decode, fit_decoder, load_generator, read_annotations
from minseg.methods.ganseg import PRESETS as GANSEG_PRESETS
from minseg.methods.ganseg import GANSeg, GANSegConfig
from minseg.methods.hoc import ClusterConfig
from minseg.methods.ilsgan import ILSGANConfig, LayeredGenerator
from minseg.methods.plain_gan import PlainConfig, PlainGAN, PlainGenerator

TINY = ["--set", "gen_width=4", "--set", "disc_width=4", "--set", "z_dim=8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny plain GAN (32 px) trained for two steps by the CLI."""
    out = tmp_path_factory.mktemp("gan")
    assert main(["annotate", "gan", "shapes", "--size", "32", "--gan-images", "8", "--batch-size", "4", "--limit",
                 "16", "--out", str(out), "--quiet", *TINY]) == 0
    return out / "checkpoint.pt"


def test_generator_features_have_the_expected_shapes():
    G = PlainGenerator(PlainConfig(size=32, z_dim=8, gen_width=4))
    out = G(G.sample_codes(2), return_features=True)
    assert out["image"].shape == (2, 3, 32, 32)
    assert [tuple(f.shape) for f in out["features"]] == [(2, 32, 4, 4), (2, 16, 8, 8), (2, 8, 16, 16), (2, 4, 32, 32)]
    layered = FrozenGenerator(LayeredGenerator(ILSGANConfig(size=32, z_dim=8, gen_width=4)))
    latents = layered.sample_latents(3)
    image, features = layered(latents)
    assert set(latents) == {"z", "c"} and image.shape == (3, 3, 32, 32)
    assert [f.shape[-1] for f in features] == [8, 16, 32]
    assert [f.shape[1] for f in features] == [2 * 16, 2 * 8, 2 * 4]  # fg trunk and bg branch, side by side
    with torch.no_grad():  # the background drawn while collecting features is the branch's own output
        out = layered.net(latents["z"], latents["c"], return_features=True)
        torch.testing.assert_close(out["background"], layered.net.background(latents["z"]))
        torch.testing.assert_close(out["features"][-1][:, 4:], layered.net.background[0](latents["z"]))


def test_ganseg_features_are_its_three_branches_per_block():
    """GANSeg exposes, per block, its mask, foreground and background branches' outputs without their margins; the
    last level's mask channels are the logits whose softmax gives the masks."""
    cfg = GANSegConfig(**GANSEG_PRESETS["shapes"])
    gen = FrozenGenerator(GANSeg(cfg).G)
    latents = gen.sample_latents(2, torch.Generator().manual_seed(0))
    image, features = gen(latents)
    assert gen.kind == "ganseg" and set(latents) == {"z_point", "z_app", "z_bg", "bg_center"}
    assert image.shape == (2, 3, 32, 32)
    mask_ch, fg_ch = [cfg.mask_width, cfg.mask_width, cfg.num_parts + 1], [*cfg.widths[1:], cfg.emb_dim]
    assert [tuple(f.shape) for f in features] == [(2, m + 2 * c, r, r) for m, c, r in
                                                  zip(mask_ch, fg_ch, cfg.resolutions)]
    with torch.no_grad():
        out = gen.net(**latents)
    torch.testing.assert_close(features[-1][:, :cfg.num_parts + 1].softmax(1), out["masks"])
    torch.testing.assert_close(features[-1][:, -cfg.emb_dim:], out["background"])


def test_a_ganseg_checkpoint_is_exported_with_latents_that_reproduce_it(tmp_path):
    """A GANSeg run's checkpoint (no EMA: its G) is taken; the exported latents give back the exported samples."""
    cfg = GANSegConfig(**GANSEG_PRESETS["shapes"])
    method = GANSeg(cfg)
    torch.save({"method": method.state_dict(), "config": asdict(cfg)}, tmp_path / "c.pt")
    gen = load_generator(tmp_path / "c.pt")
    assert gen.kind == "ganseg"
    assert main(["annotate", "export", "--checkpoint", str(tmp_path / "c.pt"), "--n", "3", "--out",
                 str(tmp_path / "x")]) == 0
    latents = torch.load(tmp_path / "x" / "latents.pt", weights_only=True)["latents"]
    with torch.no_grad():
        expected = method.G.eval()(**latents)["image"]
    torch.testing.assert_close(gen(latents)[0], expected)
    saved = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "x" / "images").glob("*.png"))])
    assert np.abs(saved.astype(int) - ((expected.permute(0, 2, 3, 1) + 1) * 127.5).round().numpy()).max() <= 1


def test_an_ilsgan_checkpoint_is_accepted(tmp_path, capsys):
    cfg = ILSGANConfig(size=32, z_dim=8, gen_width=4)
    torch.save({"method": {"G_ema": LayeredGenerator(cfg).state_dict()}, "config": asdict(cfg)}, tmp_path / "c.pt")
    assert load_generator(tmp_path / "c.pt").kind == "layered"
    assert main(["annotate", "export", "--checkpoint", str(tmp_path / "c.pt"), "--n", "2", "--out",
                 str(tmp_path / "x")]) == 0
    assert len(list((tmp_path / "x" / "images").glob("*.png"))) == 2
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert main(["annotate", "export", "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "y")]) == 2
    assert "not a generator checkpoint" in capsys.readouterr().err
    torch.save({"method": {"G": {}}, "config": asdict(ClusterConfig(size=32))}, tmp_path / "hoc.pt")
    assert main(["annotate", "export", "--checkpoint", str(tmp_path / "hoc.pt"), "--out", str(tmp_path / "z")]) == 2
    assert "does not take" in capsys.readouterr().err


def test_plain_gan_step_and_state_round_trip():
    torch.manual_seed(0)
    gan = PlainGAN(PlainConfig(size=16, z_dim=8, gen_width=4, disc_width=4))
    stats = gan.train_step({"image": torch.rand(4, 3, 16, 16) * 2 - 1})
    assert set(stats) == {"loss_D", "loss_G"} and all(np.isfinite(v) for v in stats.values())
    other = PlainGAN(gan.cfg)
    other.load_state_dict(gan.state_dict())
    z = gan.G.sample_codes(2)
    assert torch.equal(other.G_ema.net(z)["image"], gan.G_ema.net(z)["image"])


def test_decoder_fits_the_masks_it_was_trained_on():
    torch.manual_seed(0)
    gen = FrozenGenerator(PlainGenerator(PlainConfig(size=32, z_dim=8, gen_width=4)))
    images, features = gen(gen.sample_latents(4, torch.Generator().manual_seed(0)))
    brightness = images.mean(1)  # (4, 32, 32): annotate "bright" pixels, leave a band unpainted
    labels = (brightness > brightness.flatten(1).median(1).values[:, None, None]).long()
    labels[:, :, :4] = IGNORE
    decoder = fit_decoder(features, labels, steps=150, seed=0)
    painted = labels != IGNORE
    accuracy = (decode(decoder, features, 32) == labels)[painted].float().mean().item()
    assert accuracy > 0.95, accuracy


def test_all_ignore_annotation_is_refused():
    features = [torch.randn(2, 4, 4, 4), torch.randn(2, 4, 8, 8)]
    with pytest.raises(ValueError, match="no painted pixel"):
        fit_decoder(features, torch.full((2, 8, 8), IGNORE, dtype=torch.long), steps=1)


def paint(directory, value=None, size=None):
    """Paint every exported sample: object = brighter than its median (or a constant `value`), at `size`."""
    for path in sorted((directory / "images").glob("*.png")):
        grey = np.asarray(Image.open(path).convert("L"))
        mask = np.where(grey > np.median(grey), 255, 0).astype(np.uint8) if value is None else np.full_like(grey, value)
        mask[:2] = 128  # an unpainted (ignored) band
        picture = Image.fromarray(mask)
        (picture.resize((size, size)) if size else picture).save(directory / "masks" / path.name)


def test_export_paint_train_round_trip(checkpoint, tmp_path, capsys):
    export = tmp_path / "export"
    assert main(["annotate", "export", "--checkpoint", str(checkpoint), "--n", "3", "--out", str(export)]) == 0
    assert sorted(p.name for p in (export / "images").iterdir()) == [f"sample-00{i}.png" for i in range(3)]
    assert main(["annotate", "export", "--checkpoint", str(checkpoint), "--out", str(export)]) == 2
    assert "already holds an export" in capsys.readouterr().err
    paint(export)
    meta, labels = read_annotations(export)
    assert labels.shape == (3, 32, 32) and (labels[:, :2] == IGNORE).all()
    assert set(labels.unique().tolist()) <= {IGNORE, 0, 1} and meta["stems"] == [f"sample-00{i}" for i in range(3)]
    out = tmp_path / "result"
    assert main(["annotate", "train", "--dir", str(export), "--limit", "16", "--decoder-steps", "5", "--synthetic",
                 "8", "--steps", "2", "--width", "4", "--batch-size", "4", "--out", str(out)]) == 0  # data from the GAN
    results = json.loads((out / "results.json").read_text())
    assert results["annotated"] == 3 and "shapes test" in results["protocol"] and 0 <= results["iou"] <= 1
    assert (out / "segmenter.pt").is_file() and (out / "synthetic.png").is_file()
    assert load_generator(checkpoint).meta["data"] == "shapes"


@pytest.mark.parametrize("problem, message", [("missing", "sample-001.png is missing"),
                                              ("size", "sample-001.png is 16x16 px, expected 32x32"),
                                              ("ignore", "sample-001.png has no painted pixel")])
def test_bad_masks_are_named(checkpoint, tmp_path, capsys, problem, message):
    export = tmp_path / "export"
    assert main(["annotate", "export", "--checkpoint", str(checkpoint), "--n", "2", "--out", str(export)]) == 0
    paint(export)
    bad = export / "masks" / "sample-001.png"
    if problem == "missing":
        bad.unlink()
    else:
        Image.fromarray(np.full((16, 16) if problem == "size" else (32, 32), 128, np.uint8)).save(bad)
    assert main(["annotate", "train", "--dir", str(export), "--steps", "1"]) == 2
    assert message in capsys.readouterr().err


def test_curve_runs_tiny_end_to_end(checkpoint, tmp_path):
    out = tmp_path / "curve"
    assert main(["annotate", "curve", "shapes", "--checkpoint", str(checkpoint), "--ns", "1,2", "--seeds", "2",
                 "--steps", "2", "--decoder-steps", "3", "--synthetic", "8", "--oracle-steps", "2", "--width", "4",
                 "--limit", "16", "--test-limit", "8", "--batch-size", "4", "--out", str(out)]) == 0
    results = json.loads((out / "curve.json").read_text())
    assert results["ns"] == [1, 2] and len(results["runs"]) == 10  # 2 seeds x (2 N x 2 routes + the ceiling)
    assert {(r["route"], r["n"]) for r in results["runs"]} == {(a, n) for a in ("decoder", "real") for n in (1, 2)} | {
        ("oracle-labelled", None)}
    table = (out / "curve.md").read_text()
    assert "| 1 |" in table and "oracle: all 16 real" in table and (out / "oracle.pt").is_file()
    assert "| ceiling: oracle labels the synthetic set |" in table
    assert main(["annotate", "curve", "shapes", "--checkpoint", str(checkpoint), "--ns", "0,x"]) == 2
    (out / "curve.png").unlink(missing_ok=True)
    if importlib.util.find_spec("matplotlib") is not None:  # an optional extra: `annotate plot` redraws the PNG
        assert main(["annotate", "plot", str(out / "curve.json")]) == 0 and (out / "curve.png").is_file()
    else:
        assert main(["annotate", "plot", str(out / "curve.json")]) == 1 and not (out / "curve.png").exists()
