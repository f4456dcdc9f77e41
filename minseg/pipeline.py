"""How every method ends: generate (image, mask) pairs, train a segmenter on them, score it on real images,
and write the results (markdown + JSON) and pictures next to the run's samples.
"""

import json
import time
from pathlib import Path

import torch

from minseg.visual import overlay, save_grid


def pair_stream(sample_fn, batch_size):
    """An endless iterator of synthetic batches dict(image, mask | parts) from sample_fn(batch_size)."""
    while True:
        yield {k: v.detach() for k, v in sample_fn(batch_size).items()}


def finish(name, pairs, test_set, out_dir, net="unet", num_classes=1, steps=2000, loss="bce", lr=1e-3,
           batch_size=32, device="cpu", extra=None, more_scores=None, progress=True, lr_decay="constant",
           real_set=None, self_train_steps=0, self_train_fresh=False):
    """Train a fresh segmenter on `pairs` (an iterator of batches), score it on `test_set`, write results.

    Returns (segmenter, metrics dict). `extra` holds method-specific numbers added to the table (e.g. NMI);
    more_scores(segmenter) -> dict adds scores of the trained segmenter (e.g. GANSeg's keypoint errors).
    self_train_steps > 0: then train it `self_train_steps` more steps on `real_set`'s images (never its masks)
    labelled by its own predictions; the scores before that step are kept with the prefix "synthetic_".
    """
    from minseg.metrics import format_table
    from minseg.nets import build_net
    from minseg.segmenter import evaluate_segmenter, pseudo_labelled, save_segmenter, train_segmenter
    if self_train_steps and real_set is None:
        raise ValueError("self-training needs the real training images (real_set)")
    out_dir = Path(out_dir)
    start = time.time()
    segmenter = train_segmenter(pairs, net=net, num_classes=num_classes, steps=steps, lr=lr, batch_size=batch_size,
                                loss=loss, device=device, progress=progress, log_path=out_dir / "segmenter.jsonl",
                                lr_decay=lr_decay)
    scores = lambda net: {k: v for k, v in evaluate_segmenter(net, test_set).items()
                          if not isinstance(v, (list, torch.Tensor))}
    metrics = scores(segmenter)
    if self_train_steps:
        before = {f"synthetic_{k}": metrics[k] for k in ("iou", "acc", "miou")}
        labelled = pseudo_labelled(segmenter, real_set)
        if self_train_fresh:
            segmenter = build_net(segmenter.kind, **segmenter.config)
        segmenter = train_segmenter(labelled, net=segmenter, steps=self_train_steps, lr=lr, batch_size=batch_size,
                                    loss=loss, device=device, progress=progress,
                                    log_path=out_dir / "self-train.jsonl")
        metrics = {**scores(segmenter), **before}
    metrics.update(extra or {})
    metrics.update(more_scores(segmenter) if more_scores else {})
    metrics["segmenter_seconds"] = round(time.time() - start, 1)
    save_segmenter(out_dir / "segmenter.pt", segmenter, {"method": name, "num_classes": num_classes})
    write_results(out_dir, name, metrics, test_set.protocol, format_table)
    show_predictions(segmenter, test_set, out_dir / "test-predictions.png", device)
    return segmenter, metrics


def write_results(out_dir, name, metrics, protocol, format_table):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"method": name, "protocol": protocol, **metrics}, indent=2))
    table = format_table([{"method": name, **metrics}], protocol)
    (out_dir / "results.md").write_text(table + "\n")
    print(table)


@torch.no_grad()
def show_predictions(segmenter, test_set, path, device="cpu", n=12):
    """Real test images | predicted mask overlay | GT overlay, as one PNG."""
    from minseg.segmenter import predict
    batch = test_set.batch(list(range(min(n, len(test_set)))))
    images = batch["image"]
    pred = predict(segmenter.to(device), images.to(device)).cpu()  # (n, H, W)
    rows = [images, overlay(images, (pred > 0).float()[:, None])]
    if pred.max() > 1:
        rows.append(pred)
    if "mask" in batch:
        rows.append(overlay(images, batch["mask"], colour=(-1.0, 1.0, -1.0)))
    save_grid(rows, path)
