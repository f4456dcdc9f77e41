"""The divergence guard (minseg/train.py): every method skips and counts non-finite steps; after a run of them the
training loop restores the last good checkpoint and lowers the learning rates, and says so in stats.jsonl."""
import itertools
import json
import math

import pytest
import torch

from minseg.methods import ganseg, ilsgan
from minseg.train import DivergenceError, guarded_step, load_checkpoint, start_run, training_loop
from test_ganseg import tiny_config
from test_independence import tiny_carver, tiny_cluster_gan


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_ilsgan():
    torch.manual_seed(0)
    return ilsgan.ILSGAN(ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4))


def tiny_ganseg():
    torch.manual_seed(0)
    return ganseg.GANSeg(tiny_config(size=32, resolutions=(8, 16, 32)))


def nan_batch(size=32, batch=4):
    return {"image": torch.full((batch, 3, size, size), float("nan"))}


@pytest.mark.parametrize("make", [tiny_ilsgan, tiny_ganseg, tiny_carver, tiny_cluster_gan])
def test_every_method_skips_a_poisoned_step(make):
    method = make()
    before = [p.detach().clone() for p in method.D.parameters()]
    stats = method.train_step(nan_batch())
    assert stats["skipped"] == 1 and method.skipped_steps >= 1
    for p, q in zip(method.D.parameters(), before):  # the discriminator step was not taken
        assert torch.equal(p, q)
    assert all(torch.isfinite(p).all() for p in method.D.parameters())


def test_guarded_step_skips_non_finite_losses_and_gradients():
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    before = [p.detach().clone() for p in net.parameters()]
    assert not guarded_step(opt, net(torch.ones(1, 2)).sum() * float("nan"))  # non-finite loss: no backward
    assert not guarded_step(opt, (net.weight * 0).abs().sqrt().sum())  # loss 0, gradient nan
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before)) and net.weight.grad is None
    assert guarded_step(opt, net(torch.ones(1, 2)).sum())  # finite: steps
    assert not torch.equal(net.weight, before[0])


class Flaky:
    """A one-layer method whose steps 7..7+bad-1 report non-finite losses (skipped), the rest train normally."""

    def __init__(self, bad=5, first_bad=7):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(1, 1)
        self.opt = torch.optim.SGD(self.net.parameters(), 0.1)
        self.calls, self.bad, self.first_bad = 0, bad, first_bad

    def train_step(self, real):
        self.calls += 1
        if self.first_bad <= self.calls < self.first_bad + self.bad:
            return {"loss": float("nan"), "skipped": 1.0}
        loss = (self.net(real["image"]) - 1).pow(2).mean()
        ok = guarded_step(self.opt, loss)
        return {"loss": loss.item(), "skipped": float(not ok)}

    def snapshot(self, path):
        pass

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def batches(batch=4):
    return itertools.repeat({"image": torch.ones(batch, 1)})


def test_divergence_restores_the_last_good_checkpoint_and_halves_the_learning_rate(tmp_path, capsys):
    method, state = Flaky(bad=5), {"images_seen": 0}
    save = start_run(tmp_path, method, state, {}, {})
    training_loop(method, batches(), state, 64, tmp_path, save, tick_images=8, snapshot_images=8, progress=False,
                  divergence_steps=5)
    assert "divergence: 5 steps in a row skipped" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    events = [r for r in records if r.get("event") == "divergence"]
    assert len(events) == 1
    # steps 1..6 fine (the last snapshot at 24 images), 7..11 skipped (44 images): back to 24, lr x0.5
    assert events[0] == {"phase": "gan", "event": "divergence", "images": 44, "skipped_in_a_row": 5,
                         "restored_images": 24, "lr_scale": 0.5, "restores": 1}
    assert method.opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert state["images_seen"] == 64 and state["steps"] == 16 and state["restores"] == 1
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["method"]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.05)  # survives a resume
    assert final["state"]["lr_scale"] == 0.5
    ticks = [r["images"] for r in records if "event" not in r]
    assert ticks[-1] == 64 and all(r["loss"] is None or math.isfinite(r["loss"]) for r in records if "loss" in r)

    # resumed later: the lowered rate and the event record are kept
    again, state = Flaky(bad=0), {"images_seen": 0}
    save = start_run(tmp_path, again, state, {}, {}, resume=True)
    training_loop(again, batches(), state, 72, tmp_path, save, tick_images=8, snapshot_images=8, progress=False)
    assert again.opt.param_groups[0]["lr"] == pytest.approx(0.05) and state["lr_scale"] == 0.5
    assert sum('"divergence"' in line for line in (tmp_path / "stats.jsonl").read_text().splitlines()) == 1


def test_lasting_nans_in_a_real_method_end_in_a_divergence_error(tmp_path):
    """ILSGAN on a poisoned data stream: every step skipped; two restores at x0.5, x0.25, then DivergenceError."""
    method, state = tiny_ilsgan(), {"images_seen": 0}
    start = [p.detach().clone() for p in method.D.parameters()]
    save = start_run(tmp_path, method, state, method.cfg, {})
    with pytest.raises(DivergenceError, match="after 2 restores"):
        training_loop(method, itertools.repeat(nan_batch()), state, 400, tmp_path, save, tick_images=8,
                      snapshot_images=8, progress=False, divergence_steps=3, max_restores=2)
    events = [r for r in map(json.loads, (tmp_path / "stats.jsonl").read_text().splitlines()) if "event" in r]
    assert [e["lr_scale"] for e in events] == [0.5, 0.25] and all(e["restored_images"] == 0 for e in events)
    assert method.opt_D.param_groups[0]["lr"] == pytest.approx(0.25 * method.cfg.lr)
    assert method.skipped_steps >= 3
    for p, q in zip(method.D.parameters(), start):
        assert torch.equal(p, q)


class Collapsing(Flaky):
    """Reports a mask mean that falls to 0 after step 4: a collapse the loop must recognise."""

    def __init__(self):
        super().__init__(bad=0)

    def train_step(self, real):
        stats = super().train_step(real)
        return {**stats, "mask_mean": 0.5 if self.calls <= 4 else 0.0}

    def collapse_message(self, tick):
        return "mask collapsed to all background" if tick["mask_mean"] < 0.02 else None


def test_collapse_is_recorded_raised_and_summarized(tmp_path, capsys):
    from minseg.cli import main
    from minseg.train import CollapseError
    run = tmp_path / "runs" / "seed1"
    method, state = Collapsing(), {"images_seen": 0}
    save = start_run(run, method, state, {}, {})
    with pytest.raises(CollapseError, match="all background"):  # ticks of 2 steps: 3 ticks in a row at 0 after step 4
        training_loop(method, batches(), state, 400, run, save, tick_images=8, snapshot_images=8, progress=False,
                      collapse_ticks=3)
    assert state["images_seen"] == 40 and "(3/3 ticks)" in capsys.readouterr().out
    events = [r for r in map(json.loads, (run / "stats.jsonl").read_text().splitlines()) if "event" in r]
    assert events == [{"phase": "gan", "event": "collapse", "images": 40, "message": "mask collapsed to all background"}]

    finished = tmp_path / "runs" / "seed2"
    finished.mkdir()
    (finished / "stats.jsonl").write_text(json.dumps({"phase": "gan", "images": 8, "mask_mean": 0.3}) + "\n"
                                          + '{"phase": "gan", "ima')  # torn by a kill: skipped
    (finished / "results.json").write_text(json.dumps({"method": "x", "protocol": "toy test", "iou": 0.5, "acc": 0.75}))
    assert main(["summarize", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "Protocol: toy test" in table
    assert "| seed1 | collapsed at 40 images (mask collapsed to all background) | 0.0 |" in table
    assert "| seed2 | finished | 30.0 | 75.0 | 50.0 |" in table  # first-seen column order; fractions in %
    assert main(["summarize", str(tmp_path / "nothing")]) == 2
