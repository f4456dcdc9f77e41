"""Command-line input checks: bad ranges, devices, paths, --set values and resumes with other settings end in one
error line naming the argument and what to fix (exit code 2, no traceback), before any training starts."""
from dataclasses import asdict

import pytest
import torch

from minseg.cli import build_parser, main
from minseg.commands import method_settings
from minseg.train import save_checkpoint

TINY = ["--limit", "8", "--size", "32", "--gan-images", "8", "--threads", "1", "--quiet"]


def error_of(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("args, message", [
    (["--restarts", "-1"], "argument --restarts: must be an integer >= 0"),
    (["--device", "banana"], "argument --device: must be a torch device"),
    (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "argument --device: "),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--size", "4"], "argument --size: must be an image size >= 8"),
    (["--set", "gen_width=abc"], "--set gen_width='abc': expected an integer"),
    (["--set", "gen_width=0"], "--set gen_width=0: expected an integer >= 1"),
    (["--set", "perturb=1"], "--set perturb=1: expected True or False"),
    (["--set", "betas=0.5"], "--set betas=0.5: expected a tuple of numbers"),
    (["--set", "lr=nan"], "--set lr='nan': expected a finite number"),
    (["--set", "tick_images=0"], "--set tick_images=0: expected an integer >= 1"),
    (["--set", "nonsense=1"], "--set nonsense: no such setting"),
    (["--set", "gen_width=None"], "--set gen_width=None: expected an integer"),  # None only where the type allows it
    (["--size", "48"], "size must be a power of two >= 8"),
    (["--method", "independence", "--size", "40"], "size must be a multiple of 16"),
    (["--set", "gan_images=16"], "--gan-images and --set gan_images=... both set gan_images; give it once"),
])
def test_bad_method_arguments_name_what_to_fix(args, message, capsys, tmp_path):
    assert message in error_of(["shapes", *TINY, "--out", str(tmp_path / "run"), *args], capsys)


def test_none_is_accepted_where_the_field_allows_it():
    from minseg.cli_args import check_settings
    from minseg.methods.ganseg import GANSegConfig
    assert check_settings(GANSegConfig, {"area_reference_size": None, "fixed_sigma": None}) == {
        "area_reference_size": None, "fixed_sigma": None}
    with pytest.raises(ValueError, match="lambda_con=None: expected a finite number"):
        check_settings(GANSegConfig, {"lambda_con": None})


def test_bad_paths(capsys, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("not a folder")
    assert "is a file; name a folder" in error_of(["shapes", *TINY, "--out", str(file)], capsys)
    assert "folder" in error_of(["horses", *TINY, "--root", str(tmp_path / "missing")], capsys)
    picture = tmp_path / "broken.png"
    picture.write_bytes(b"\x89PNG not really")
    assert "not a readable picture" in error_of(["hoc", "--image", str(picture), "--window", "20",
                                                  "--out", str(tmp_path / "hoc")], capsys)


def settings_of(argv):
    return method_settings(build_parser().parse_args(argv))


def test_a_schedule_field_with_a_flag_may_come_from_either():
    _, by_flag = settings_of(["shapes", "--final-steps", "7", "--gan-images", "64"])
    _, by_set = settings_of(["shapes", "--set", "final_steps=7", "--set", "gan_images=64"])
    assert by_flag == by_set and by_set.final_steps == 7 and by_set.gan_images == 64
    _, distill = settings_of(["shapes", "--method", "independence", "--set", "distill_steps=9"])
    assert distill.distill_steps == 9


def test_a_field_off_at_zero_may_be_set_to_zero_but_not_below(capsys, tmp_path):
    _, schedule = settings_of(["shapes", "--set", "final_self_train=0", "--set", "final_standing_stats=0"])
    assert schedule.final_self_train == 0 and schedule.final_standing_stats == 0
    assert "--set final_self_train=-1: expected an integer >= 0" in error_of(
        ["shapes", *TINY, "--out", str(tmp_path / "run"), "--set", "final_self_train=-1"], capsys)


def test_ganseg_size_scales_its_pyramid():
    cfg, _ = settings_of(["shapes", "--method", "ganseg", "--size", "32"])
    assert cfg.size == 32 and cfg.resolutions == (8, 16, 32)


def test_resume_with_other_settings_names_the_fields(capsys, tmp_path):
    out = tmp_path / "run"
    argv = ["shapes", *TINY, "--out", str(out), "--set", "gen_width=8"]
    cfg, schedule = settings_of(argv)
    save_checkpoint(out / "checkpoint.pt", {"method": {}, "state": {"images_seen": 8}, "rng": {},
                                            "config": dict(asdict(cfg), gen_width=16, z_dim=32),
                                            "schedule": dict(asdict(schedule), gan_images=4)})
    message = error_of([*argv, "--resume"], capsys)
    assert "config gen_width: 16 in the checkpoint, 8 now" in message and "config z_dim: 32" in message
    assert "--set gen_width=16 --set z_dim=32" in message and "gan_images" not in message
