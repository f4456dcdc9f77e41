"""The method commands end to end through the command line (minseg/commands.py), on tiny settings: the layered
GAN, GANSeg and the independence prior on shapes and on the CUB layout (real metadata, drawn pictures), the
cluster-picture command, the `--set` overrides, the CUB message without data, and the trivial baselines."""

import json

import pytest

from minseg.cli import main

# tiny networks and schedules: each run takes a few seconds on one CPU core
TINY = {
    "ilsgan": ["--set", "gen_width=4", "--set", "disc_width=8", "--set", "num_codes=4", "--set", "group_size=2",
               "--set", "seg_width=4", "--gan-images", "16", "--final-steps", "2"],
    "ganseg": ["--set", "widths=(8, 8, 8)", "--set", "mask_width=4", "--set", "spade_hidden=4", "--set", "emb_dim=4",
               "--set", "z_dim=8", "--set", "disc_width=4", "--set", "margin=2", "--set", "keypoint_fit_images=8",
               "--gan-images", "16", "--final-steps", "2"],
    "independence": ["--set", "seg_width=4", "--set", "seg_depth=2", "--set", "disc_width=4",
                     "--gan-images", "16", "--final-steps", "2"],
}
COMMON = ["--size", "32", "--limit", "16", "--batch-size", "8", "--set", "tick_images=8", "--set",
          "snapshot_images=16", "--quiet", "--threads", "1"]


def results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", sorted(TINY))
def test_each_method_runs_on_shapes(method, tmp_path, capsys):
    out = tmp_path / method
    assert main(["shapes", "--method", method, "--out", str(out), *COMMON, *TINY[method]]) == 0
    scores = results(out)
    assert 0 <= scores["iou"] <= 1 and "shapes test split" in scores["protocol"]
    assert (out / "checkpoint.pt").exists() and (out / "segmenter.pt").exists()
    assert "results:" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["ilsgan", "ganseg"])
def test_self_training_reports_the_scores_before_and_after(method, tmp_path):
    out = tmp_path / method
    assert main(["shapes", "--method", method, "--out", str(out), *COMMON, *TINY[method],
                 "--set", "final_self_train=2"]) == 0
    scores = results(out)
    assert {"iou", "synthetic_iou", "synthetic_acc", "synthetic_miou"} <= set(scores)
    assert len((out / "self-train.jsonl").read_text().splitlines()) == 1


def test_cub_runs_end_to_end_on_the_cub_layout(tmp_path):
    from cub_fixture import METADATA, make_cub_fixture
    if not METADATA.is_dir():
        pytest.skip(f"CUB metadata not found at {METADATA}")
    root = make_cub_fixture(tmp_path / "cub", n_images=16)
    for method in ("ilsgan", "independence"):
        out = tmp_path / f"run-{method}"
        assert main(["cub", "--root", str(root), "--method", method, "--out", str(out), *COMMON, *TINY[method]]) == 0
        scores = results(out)
        assert "P2" in scores["protocol"] or "box" in scores["protocol"]
        assert 0 <= scores["miou"] <= 1


def test_cub_without_data_says_where_it_is_expected(capsys):
    assert main(["cub"]) == 2
    text = capsys.readouterr().out
    assert "CUB_200_2011/images" in text and "segmentations" in text and "python run.py shapes" in text


def test_unknown_setting_is_refused_with_the_known_names(capsys):
    assert main(["shapes", "--set", "no_such_field=1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_field" in err and "g_mi" in err


def test_unknown_schedule_is_refused(capsys):
    assert main(["shapes", "--schedule", "forever", *COMMON]) == 2
    assert "forever" in capsys.readouterr().err


def test_ablation_switch_reaches_the_config(tmp_path):
    out = tmp_path / "no-mi"
    assert main(["shapes", "--out", str(out), "--set", "g_mi=0", "--set", "perturb=False", *COMMON,
                 *TINY["ilsgan"]]) == 0
    import torch
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["config"]["g_mi"] == 0 and saved["config"]["perturb"] is False
    assert "nmi" not in results(out)  # no MI head trained: no NMI reported


def test_hoc_command_on_the_builtin_picture(tmp_path):
    out = tmp_path / "hoc"
    assert main(["hoc", "--out", str(out), "--patch-size", "32", "--gan-images", "8", "--set", "num_layers=2",
                 "--set", "gen_width=8", "--set", "disc_width=4", "--set", "patch_stride=32", "--set", "batch_size=4",
                 "--set", "tick_images=4", "--set", "snapshot_images=8", "--set", "eval_layers=8", "--quiet",
                 "--threads", "1"]) == 0
    scores = results(out)
    assert 0 <= scores["one_instance"] <= 1 and scores["true_area_px"] > 0
    assert (out / "instances.png").exists()


def test_baselines_command(capsys):
    assert main(["baselines", "shapes", "--limit", "50", "--size", "32"]) == 0
    text = capsys.readouterr().out
    assert "centre prior" in text and "all foreground" in text
