"""Checkpoints and --resume (minseg/train.py): atomic saves, weights_only loads, RNG round trips, the shared resume
helper's settings check, an in-process interrupt + resume, and a real run SIGKILLed at a random moment then resumed."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minseg.cli import main
from minseg.data import load_dataset
from minseg.methods import ilsgan
from minseg.train import (Checkpoint, load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state,
                          start_run)

ROOT = Path(__file__).resolve().parents[1]
# a run of a few seconds: 32 px, tiny networks, a checkpoint every 2 steps
TINY = ["--limit", "32", "--size", "32", "--batch-size", "8", "--final-steps", "1", "--set", "gen_width=8",
        "--set", "disc_width=8", "--set", "z_dim=8", "--set", "tick_images=16", "--set", "snapshot_images=16",
        "--quiet", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny:
    """A stand-in method: one linear layer, one optimiser."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = torch.nn.Linear(3, 2)
        self.opt = torch.optim.Adam(self.net.parameters(), 1e-2)

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": torch.tensor(1)})

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": torch.tensor(2)})
    monkeypatch.undo()
    assert int(load_checkpoint(path)["step"]) == 1  # the previous checkpoint, intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_load_checkpoint_rejects_torn_and_foreign_files(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)
    torch.save({"f": Tiny}, path)  # a pickled class: refused by weights_only=True
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip_continues_every_stream(tmp_path):
    seed_everything(3)
    np.random.normal()  # leaves numpy with a cached Gaussian and a mid-block position
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    seed_everything(99)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    torch.testing.assert_close(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_start_run_resumes_and_checks_settings(tmp_path, capsys):
    config, schedule = {"width": 8, "betas": (0.5, 0.9)}, {"gan_images": 64, "batch_size": 8}
    method, state = Tiny(), {"images_seen": 0, "seed": 0}
    save = start_run(tmp_path, method, state, config, schedule, seed=0, resume=True)
    assert "no checkpoint" in capsys.readouterr().out and isinstance(save, Checkpoint)
    state.update(images_seen=32, steps=4)
    save()
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["config"] == config and saved["state"]["steps"] == 4
    assert {"torch", "numpy", "python"} <= set(saved["rng"])

    # same settings, longer schedule: resumes, says what changed
    other, state2 = Tiny(seed=1), {"images_seen": 0, "seed": 0}
    start_run(tmp_path, other, state2, {"width": 8, "betas": [0.5, 0.9]}, dict(schedule, gan_images=128), resume=True)
    out = capsys.readouterr().out
    assert "resumed" in out and "32 images seen" in out and "gan_images 64 -> 128" in out
    assert state2["images_seen"] == 32 and state2["steps"] == 4
    torch.testing.assert_close(other.net.weight, method.net.weight)

    # other settings: an error naming each field, both values, and how to resume
    with pytest.raises(ValueError) as err:
        start_run(tmp_path, Tiny(), {"images_seen": 0}, {"width": 16, "betas": (0.5, 0.9), "extra": 1},
                  dict(schedule, batch_size=4), resume=True)
    message = str(err.value)
    for text in ("config width: 8 in the checkpoint, 16 now", "schedule batch_size: 8",
                 "--set width=8", "--set batch_size=8"):
        assert text in message, message
    assert "gan_images" not in message and "extra" not in message

    # a final_* setting (how the final segmenter is made, after the GAN phase) may change like a length
    start_run(tmp_path, Tiny(), {"images_seen": 0}, config, dict(schedule, final_lr_decay="cosine"), resume=True)
    assert "resumed" in capsys.readouterr().out
    saved["schedule"]["final_lr_decay"] = "constant"
    torch.save(saved, tmp_path / "checkpoint.pt")
    start_run(tmp_path, Tiny(), {"images_seen": 0}, config, dict(schedule, final_lr_decay="cosine"), resume=True)
    assert "final_lr_decay constant -> cosine" in capsys.readouterr().out

    # a field the checkpoint lacks (added to minseg since it was written) resumes with its current value, said so
    start_run(tmp_path, Tiny(), {"images_seen": 0}, {**config, "extra": 1}, dict(schedule, lr_decay="cosine"),
              resume=True)
    out = capsys.readouterr().out
    assert "resumed" in out and "newer than the checkpoint" in out and "extra=1" in out and "lr_decay='cosine'" in out


def tiny_ilsgan_settings(**schedule):
    cfg = ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8)
    values = dict(gan_images=96, final_steps=1, batch_size=8, tick_images=16, snapshot_images=16)
    return cfg, ilsgan.Schedule(**{**values, **schedule})


def test_interrupted_run_resumes_to_the_same_step_count(tmp_path, monkeypatch):
    """Interrupt ilsgan.run mid-training (as Ctrl-C would), resume: steps, EMA updates and Adam steps all agree."""
    train = load_dataset("shapes", "train", size=32, limit=16)
    test = load_dataset("shapes", "test", size=32, limit=8)
    cfg, schedule = tiny_ilsgan_settings()
    step, calls = ilsgan.ILSGAN.train_step, []

    def interrupted(self, real):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return step(self, real)
    monkeypatch.setattr(ilsgan.ILSGAN, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ilsgan.run(cfg, schedule, train, test, tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["state"]["images_seen"] == 48  # the snapshot after step 6
    monkeypatch.setattr(ilsgan.ILSGAN, "train_step", step)
    metrics = ilsgan.run(cfg, schedule, train, test, tmp_path, resume=True, progress=False)
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    steps = schedule.gan_images // schedule.batch_size
    assert final["state"]["steps"] == steps and final["state"]["round"] == 1 and metrics["skipped_steps"] == 0
    assert final["method"]["ema_updates"] == steps
    assert all(int(s["step"]) == steps for s in final["method"]["opt_G"]["state"].values())
    images = [r["images"] for r in map(json.loads, (tmp_path / "stats.jsonl").read_text().splitlines())]
    assert images == list(range(16, 97, 16))  # every tick once: none lost, none repeated


def test_finished_run_resumed_longer_goes_on_training(tmp_path, capsys):
    """A finished run resumed with more GAN images continues its last round from where it stopped (also from a
    checkpoint written before `last_round_images` existed); one resumed with another round trains the judge first."""
    train = load_dataset("shapes", "train", size=32, limit=16)
    test = load_dataset("shapes", "test", size=32, limit=8)
    cfg, schedule = tiny_ilsgan_settings(gan_images=32)
    ilsgan.run(cfg, schedule, train, test, tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    saved = load_checkpoint(path)
    assert saved["state"]["round"] == 1 and saved["state"]["last_round_images"] == 32
    del saved["state"]["last_round_images"]  # as an older checkpoint: its schedule says how far round 1 went
    save_checkpoint(path, saved)
    capsys.readouterr()
    ilsgan.run(cfg, tiny_ilsgan_settings(gan_images=64)[1], train, test, tmp_path, resume=True, progress=False)
    assert "round 1 goes on from 32 images" in capsys.readouterr().out
    final = load_checkpoint(path)
    assert final["state"]["steps"] == 8 and final["state"]["last_round_images"] == 64
    assert final["method"]["ema_updates"] == 8
    images = [r["images"] for r in map(json.loads, (tmp_path / "stats.jsonl").read_text().splitlines())]
    assert images == [16, 32, 48, 64]
    # the same length again: nothing more to train, the final segmenter is remade
    ilsgan.run(cfg, tiny_ilsgan_settings(gan_images=64)[1], train, test, tmp_path, resume=True, progress=False)
    assert load_checkpoint(path)["state"]["steps"] == 8
    # one more round: the judge for it is trained from the generator as it stands, then round 2 runs with L_bg
    assert not (tmp_path / "judge.pt").exists()
    two = tiny_ilsgan_settings(gan_images=64, rounds=2, judge_steps=1)[1]
    ilsgan.run(cfg, two, train, test, tmp_path, resume=True, progress=False)
    from minseg.segmenter import load_segmenter
    assert load_segmenter(tmp_path / "judge.pt").meta["round"] == 1
    final = load_checkpoint(path)["state"]
    assert final["round"] == 2 and final["steps"] == 16
    assert any(r.get("loss_bg", 0) > 0 for r in map(json.loads, (tmp_path / "stats.jsonl").read_text().splitlines()))


def wait_for(path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before its first checkpoint:\n"
                                 + proc.stdout.read())
        assert time.time() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_sigkill_at_a_random_moment_then_resume(tmp_path, capsys):
    """A real run (subprocess) is SIGKILLed at a random moment after its first checkpoint, then `--resume` finishes
    it: the checkpoint is never torn, the step counter and config agree with an uninterrupted run, results exist."""
    seed = int(os.environ.get("MINSEG_KILL_SEED", time.time_ns() % 2**32))
    delay = random.Random(seed).uniform(0.0, 6.0)
    out = tmp_path / "run"
    args = ["shapes", *TINY, "--gan-images", "320", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "run.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(out / "checkpoint.pt", proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    note = f"(kill {delay:.2f} s after the first checkpoint; rerun with MINSEG_KILL_SEED={seed})"
    killed = load_checkpoint(out / "checkpoint.pt")  # loads: never torn
    assert killed["state"]["images_seen"] % 8 == 0, note

    assert main([*args, "--resume"]) == 0, note
    assert "resumed" in capsys.readouterr().out, note
    final = load_checkpoint(out / "checkpoint.pt")
    assert final["config"] == killed["config"] and final["config"]["gen_width"] == 8, note
    assert final["schedule"] == killed["schedule"], note
    assert final["state"]["steps"] == 320 // 8 and final["state"]["round"] == 1, note
    assert final["method"]["ema_updates"] == 40 and final["method"]["skipped_steps"] == 0, note
    records = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records] == list(range(16, 321, 16)), note
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "ilsgan" and 0 <= results["iou"] <= 1, note
    from minseg.segmenter import load_segmenter
    load_segmenter(out / "segmenter.pt")
    for png in (out / "samples").glob("*.png"):
        with Image.open(png) as im:
            im.load()
    assert not list(out.glob(".*tmp*")), note
