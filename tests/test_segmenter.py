"""Segmenter nets, training, prediction, scoring, checkpoints and the eval / supervised command line."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minseg.cli import main
from minseg.data.base import SegmentationSet
from minseg.metrics import segmentation_scores
from minseg.nets import DeepLab, UNet, build_net
from minseg.segmenter import (evaluate_segmenter, load_segmenter, predict, pseudo_labelled, save_segmenter,
                              segmentation_loss,
                              train_segmenter)

REPO = Path(__file__).resolve().parents[1]
HORSES = Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann-horses"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind, kwargs, size", [("unet", dict(width=8), 64), ("unet", dict(width=8, depth=3), 32),
                                                ("deeplab", dict(width=8), 64), ("deeplab", dict(width=8), 40),
                                                ("deeplab", dict(width=8, output_stride=4), 32)])
@pytest.mark.parametrize("num_classes", [1, 5])
def test_output_shapes(kind, kwargs, size, num_classes):
    net = build_net(kind, num_classes=num_classes, **kwargs)
    assert net(torch.rand(2, 3, size, size) * 2 - 1).shape == (2, num_classes, size, size)


def test_default_unet_widths_and_clear_errors():
    net = UNet()
    assert net.config == dict(num_classes=1, width=32, depth=4, max_width=256, in_channels=3)
    assert net(torch.zeros(1, 3, 128, 128)).shape == (1, 1, 128, 128)  # scales to 128 px
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="output_stride"):
        DeepLab(output_stride=16)
    with pytest.raises(ValueError, match="unknown segmenter kind"):
        build_net("segnet")


def toy_batches(batch_size, size=32, parts=False, generator=None, box=(6, 11)):
    """Trivially separable pairs: a red box (class 1) and, with parts, a green box (class 2) on grey noise."""
    g = generator
    image = 0.1 * torch.randn(batch_size, 3, size, size, generator=g)
    labels = torch.zeros(batch_size, size, size, dtype=torch.long)
    for b in range(batch_size):
        for cls in (1, 2) if parts else (1,):
            x0, y0 = torch.randint(0, size - box[1] + 1, (2,), generator=g).tolist()
            w, h = torch.randint(*box, (2,), generator=g).tolist()
            labels[b, y0:y0 + h, x0:x0 + w] = cls
    colour = torch.tensor([[0.0, 0, 0], [0.9, -0.9, -0.9], [-0.9, 0.9, -0.9]])[labels].permute(0, 3, 1, 2)
    image = torch.where(labels[:, None] > 0, colour, image)
    batch = dict(image=image.clamp(-1, 1), mask=(labels > 0).float()[:, None])
    if parts:
        batch["parts"] = labels
    return batch


@pytest.mark.parametrize("kind, num_classes, loss, steps, lr, box", [
    ("unet", 1, "bce", 60, 3e-3, (6, 11)), ("unet", 1, "smooth_l1", 60, 3e-3, (6, 11)),
    ("deeplab", 3, "ce_dice", 100, 1e-2, (10, 17)),  # logits 4x coarser than the image: bigger boxes
])
def test_tiny_training_learns_a_separable_task(kind, num_classes, loss, steps, lr, box, tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = build_net(kind, num_classes=num_classes, width=8, **({"depth": 2} if kind == "unet" else {}))
    source = lambda n: toy_batches(n, parts=num_classes > 1, generator=g, box=box)  # a callable source
    log = tmp_path / "log.jsonl"
    net = train_segmenter(source, net, steps=steps, lr=lr, batch_size=16, loss=loss, progress=False, log_path=log,
                          generator=g, log_every=20)
    test = toy_batches(64, parts=num_classes > 1, generator=torch.Generator().manual_seed(123), box=box)
    pred = predict(net, test["image"])
    assert segmentation_scores(pred, test["mask"])["iou"] > 0.9
    if num_classes > 1:  # the two parts, not just the foreground
        assert (pred[test["parts"] > 0] == test["parts"][test["parts"] > 0]).float().mean() > 0.9
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(20, steps + 1, 20)) and lines[-1]["loss"] < lines[0]["loss"]


def test_cosine_lr_decay_matches_a_hand_written_loop():
    torch.manual_seed(0)
    net = build_net("unet", width=4, depth=2)
    batches = [toy_batches(4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    ours = train_segmenter(iter(batches), copy.deepcopy(net), steps=6, lr=1e-2, colour_jitter=False,
                           lr_decay="cosine", progress=False)
    theirs = copy.deepcopy(net).train()
    optimizer = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    for t, batch in enumerate(batches):  # lr_t = lr (1 + cos(pi t / T)) / 2, T = 6 steps
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 + math.cos(math.pi * t / 6)) / 2
        loss = torch.nn.functional.binary_cross_entropy_with_logits(theirs(batch["image"]), batch["mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b)
    constant = train_segmenter(iter(batches), copy.deepcopy(net), steps=6, lr=1e-2, colour_jitter=False,
                               progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(constant.parameters(), ours.parameters()))
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        train_segmenter(iter(batches), net, steps=1, lr_decay="linear")


def test_losses_match_their_definitions():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])  # (1, 1, 2, 2)
    mask = torch.tensor([[[[0.5, 1.0], [0.0, 0.0]]]])
    x = (torch.sigmoid(logits) - mask).abs()  # smooth-L1: 4x^2 if |x| < 0.25 else |x|
    expected = sum(4 * v ** 2 if v < 0.25 else v for v in x.flatten().tolist()) / 4
    assert segmentation_loss(logits, dict(mask=mask), "smooth_l1").item() == pytest.approx(expected)
    p = torch.sigmoid(logits)
    bce = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean()
    assert segmentation_loss(logits, dict(mask=mask), "bce").item() == pytest.approx(bce.item(), rel=1e-5)
    dice = 1 - (2 * (p * mask).sum() + 1) / (p.sum() + mask.sum() + 1)
    assert segmentation_loss(logits, dict(mask=mask), "ce_dice").item() == pytest.approx((bce + dice).item(), rel=1e-5)
    with pytest.raises(ValueError, match="binary"):
        segmentation_loss(torch.zeros(1, 3, 2, 2), dict(parts=torch.zeros(1, 2, 2, dtype=torch.long)), "smooth_l1")
    with pytest.raises(ValueError, match="loss must be one of"):
        train_segmenter(lambda n: None, steps=1, loss="dice")
    net = train_segmenter(lambda n: toy_batches(n, parts=True), "deeplab", num_classes=3, steps=1, batch_size=2,
                          progress=False)  # a kind name builds that net with its defaults
    assert isinstance(net, DeepLab) and net.num_classes == 3 and not net.training
    with pytest.raises(ValueError, match="num_classes=2 but the given net has 3"):
        train_segmenter(lambda n: toy_batches(n, parts=True), net, num_classes=2, steps=1, progress=False)
    with pytest.raises(ValueError, match="ran out after 0 of 5 steps"):
        train_segmenter([], build_net("unet", width=4, depth=1), steps=5, progress=False)


def red_channel_net(num_classes=1):
    """A 1x1 conv whose logit is the red channel: predictions computable by hand."""
    net = torch.nn.Conv2d(3, num_classes, 1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[0, 0] = 1.0
        if num_classes > 1:
            net.bias[0] = 0.0  # class 0 logit = red; class c > 0 logit = c / 10
            net.bias[1:] = torch.arange(1, num_classes) / 10
    return net


def test_predict_thresholds_and_argmax():
    images = torch.tensor([0.5, -0.5, 0.05, 0.3]).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    assert predict(red_channel_net(), images, batch_size=3)[:, 0, 0].tolist() == [1, 0, 1, 1]  # sigmoid(r) > 0.5
    assert predict(red_channel_net(3), images)[:, 0, 0].tolist() == [0, 2, 2, 0]  # argmax(r, 0.1, 0.2)
    stored = ((images + 1) * 127.5).round().to(torch.uint8)  # uint8 images as in a SegmentationSet
    assert predict(red_channel_net(), stored).tolist() == predict(red_channel_net(), images).tolist()


def test_evaluate_segmenter_matches_metrics():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 2, (10, 1, 8, 8), dtype=torch.uint8, generator=g)
    ds = SegmentationSet(images=images, masks=masks, protocol="toy")
    expected = segmentation_scores(images[:, 0] > 127, masks)  # red logit r / 127.5 - 1 > 0
    assert evaluate_segmenter(red_channel_net(), ds, batch_size=4) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no masks"):
        evaluate_segmenter(red_channel_net(), SegmentationSet(images=images))


def test_evaluate_segmenter_reports_part_recall_by_name():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    parts = torch.randint(0, 3, (6, 8, 8), dtype=torch.uint8, generator=g)
    parts[parts == 1] = torch.randint(1, 3, parts.shape, dtype=torch.uint8, generator=g)[parts == 1]
    ds = SegmentationSet(images=images, masks=(parts > 0)[:, None].to(torch.uint8), parts=parts, num_parts=3,
                         part_names=["body", "head", "tail"], protocol="toy")
    scores = evaluate_segmenter(red_channel_net(), ds, batch_size=4)
    red = images[:, 0] > 127  # what the net predicts foreground
    for k, name in ((1, "body"), (2, "head")):
        assert scores[f"recall_{name}"] == pytest.approx((red & (parts == k)).sum().item() / (parts == k).sum().item())
    assert "recall_tail" not in scores  # no pixel of part 3: left out rather than 0 / 0
    unnamed = SegmentationSet(images=images, masks=ds.masks, parts=parts, num_parts=3)
    assert evaluate_segmenter(red_channel_net(), unnamed)["recall_part2"] == scores["recall_head"]
    with pytest.raises(ValueError, match="part_names has 2 entries for 3 parts"):
        SegmentationSet(images=images, parts=parts, num_parts=3, part_names=["body", "head"])


def test_pseudo_labels_are_the_nets_predictions_never_the_sets_labels():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g)
    truth = dict(masks=torch.randint(0, 2, (10, 1, 8, 8), dtype=torch.uint8, generator=g),
                 parts=torch.randint(0, 3, (10, 8, 8), dtype=torch.uint8, generator=g), num_parts=2,
                 labels=torch.arange(10), boxes=torch.zeros(10, 4))
    ds = SegmentationSet(images=images, protocol="toy", **truth)
    binary = red_channel_net()
    binary.num_classes = 1
    labelled = pseudo_labelled(binary, ds, batch_size=3)
    assert labelled.masks[:, 0].tolist() == (images[:, 0] > 127).long().tolist()  # red logit r / 127.5 - 1 > 0
    assert labelled.parts is None and labelled.labels is None and torch.equal(labelled.images, images)
    three = red_channel_net(3)
    three.num_classes = 3
    labelled = pseudo_labelled(three, ds)
    assert labelled.parts.tolist() == predict(three, images).tolist() and labelled.num_parts == 2
    assert labelled.masks[:, 0].tolist() == (labelled.parts > 0).long().tolist()
    assert "labelled by a segmenter" in labelled.protocol


def test_finish_self_trains_on_real_images_labelled_by_its_segmenter(tmp_path):
    from minseg.pipeline import finish
    to_set = lambda batch, masks: SegmentationSet(images=((batch["image"] + 1) * 127.5).round().to(torch.uint8),
                                                  masks=masks.to(torch.uint8), protocol="toy")
    real = toy_batches(64, generator=torch.Generator().manual_seed(1))
    test = toy_batches(64, generator=torch.Generator().manual_seed(2))
    real_set = to_set(real, torch.zeros_like(real["mask"]))  # wrong masks: self-training must not read them
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    pairs = iter(lambda: toy_batches(16, generator=g), None)
    kwargs = dict(net=build_net("unet", width=8, depth=2), steps=60, lr=3e-3, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="needs the real training images"):
        finish("toy", pairs, to_set(test, test["mask"]), tmp_path, self_train_steps=5, **kwargs)
    net, metrics = finish("toy", pairs, to_set(test, test["mask"]), tmp_path, real_set=real_set, self_train_steps=20,
                          **kwargs)
    assert metrics["synthetic_iou"] > 0.9 and metrics["iou"] > 0.9
    assert len((tmp_path / "self-train.jsonl").read_text().splitlines()) == 1  # one line per 50 steps, and the last
    assert json.loads((tmp_path / "results.json").read_text())["iou"] == metrics["iou"]


@pytest.mark.parametrize("kind", ["unet", "deeplab"])
def test_save_load_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    net = build_net(kind, num_classes=3, width=8)
    train_segmenter(lambda n: toy_batches(n, parts=True), net, steps=2, batch_size=4, progress=False)  # moves BN stats
    path = tmp_path / "sub" / "seg.pt"
    save_segmenter(path, net, dict(size=32, note="x"))
    assert sorted(os.listdir(path.parent)) == ["seg.pt"]  # no temp file left behind
    loaded = load_segmenter(path)
    assert loaded.meta == dict(size=32, note="x") and loaded.config == net.config and not loaded.training
    images = toy_batches(8, parts=True)["image"]
    assert torch.equal(predict(loaded, images), predict(net, images))
    with torch.no_grad():
        assert torch.equal(loaded(images), net.eval()(images))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_segmenter(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a segmenter checkpoint"):
        load_segmenter(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------- command line

def test_supervised_and_eval_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "sup"
    code = main(["supervised", "shapes", "--size", "32", "--steps", "3", "--limit", "24", "--width", "4",
                 "--batch-size", "8", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and len(results["runs"]) == 1 and results["runs"][0]["n_images"] == 24
    assert "shapes" in results["protocol"] and "--steps 3" in results["command"]
    assert "Protocol: shapes test" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "segmenter.pt"), "--data", "shapes", "--limit", "24"]) == 0
    printed = capsys.readouterr().out
    assert "Protocol: shapes test" in printed and "32 px" in printed  # size taken from the checkpoint
    lines = printed.strip().splitlines()
    row = dict(zip([c.strip() for c in lines[-3].split("|")], [c.strip() for c in lines[-1].split("|")]))
    assert row["run"] == "segmenter.pt" and row["images"] == "24"
    assert float(row["iou"]) == pytest.approx(100 * results["runs"][0]["iou"], abs=0.051)  # same test images
    assert {"recall_body", "recall_head", "recall_tail", "recall_wing"} <= set(row)  # shapes has part maps


@pytest.mark.parametrize("argv, message", [
    (["supervised", "shapes", "--steps", "-5"], "argument --steps: must be a positive integer"),
    (["supervised", "horses"], "argument --root: required"),
    (["supervised", "horses", "--root", "/no/such/folder"], "argument --root: folder /no/such/folder does not exist"),
    (["supervised", "shapes", "--fold", "1"], "argument --fold: only horses"),
    (["supervised", "horses", "--root", ".", "--fold", "7"], "argument --fold: must be 0..4"),
    (["eval", "--checkpoint", "/no/such.pt", "--data", "shapes"], "argument --checkpoint: file /no/such.pt"),
    (["eval", "--data", "shapes"], "the following arguments are required: --checkpoint"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_from_the_shell_give_no_traceback():
    result = subprocess.run([sys.executable, "run.py", "supervised", "shapes", "--size", "4"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "argument --size: must be an image size >= 8" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not HORSES.is_dir(), reason="Weizmann horses not at ../shared/data")
def test_supervised_horses_all_folds(tmp_path):
    out = tmp_path / "horses"
    assert main(["supervised", "horses", "--root", str(HORSES), "--size", "16", "--steps", "1", "--width", "4",
                 "--batch-size", "4", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["fold"] for r in results["runs"]] == [0, 1, 2, 3, 4]
    assert sum(r["n_images"] for r in results["runs"]) == 327  # the five test folds cover the set once
    assert "mean +- std (5 folds)" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.glob("segmenter-fold*.pt")) == [f"segmenter-fold{k}.pt" for k in range(5)]
