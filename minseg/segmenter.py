"""Train, apply, score, save and load a segmenter; the supervised baseline.

Every method ends the same way: a segmenter (minseg.nets) trained on (image, mask) pairs - generated pairs for
the layered GAN (ILSGAN eq. 7, BCE, colour augmentation), carved-foreground composites for the independence
prior's distillation (App. 1, smooth-L1 on the soft teacher mask), argmax part maps for GANSeg (DeepLab, CE +
Dice), labelled real images for the supervised upper bound, or real images labelled by a trained segmenter
(`pseudo_labelled`, for optional self-training; not in the papers). `train_segmenter` takes any source of batches:

    a data set with .sampler (SegmentationSet): its augmented sampler(batch_size, generator=..., device=...);
    a callable: called as source(batch_size) once per step;
    an iterator / iterable: next() once per step (it decides the batch size).

A batch is dict(image=(B, 3, H, W) in [-1, 1], mask=(B, 1, H, W) float {0, 1} or soft) for a binary net, or
dict(image, parts=(B, H, W) long) for a K + 1 class net (a K + 1 net given only a mask learns classes {0, 1}).
"""

import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minseg.data.transforms import colour_jitter as jitter_colours
from minseg.metrics import SegmentationMeter
from minseg.nets import NETS, build_net

LOSSES = ("bce", "ce_dice", "smooth_l1")
LR_DECAYS = ("constant", "cosine")


def batch_source(batches, batch_size, generator=None, device="cpu"):
    """An iterator of batch dicts from a data set, a callable or an iterable (see the module docstring)."""
    if hasattr(batches, "sampler"):
        return batches.sampler(batch_size, augment=True, generator=generator, device=device)
    if callable(batches):
        return iter(lambda: batches(batch_size), None)
    try:
        return iter(batches)
    except TypeError:
        raise ValueError(f"batches must be a data set, a callable or an iterable of dicts, got "
                         f"{type(batches).__name__}") from None


def dice_loss(probs, onehot, eps=1.0):
    """1 - soft Dice per class over the batch, averaged over classes. probs, onehot: (B, C, H, W)."""
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return (1 - (2 * inter + eps) / (total + eps)).mean()


def segmentation_loss(logits, batch, loss):
    """The training loss of `logits` (B, C, H, W) against the batch's mask (C = 1) or parts (C > 1)."""
    B, C, H, W = logits.shape
    if C == 1:
        if "mask" not in batch:
            raise ValueError("a binary segmenter needs batches with a 'mask' (B, 1, H, W)")
        target = batch["mask"].to(logits.device, torch.float32)  # (B, 1, H, W) in [0, 1]
        if target.shape != logits.shape:
            raise ValueError(f"batch mask has shape {tuple(target.shape)}, expected {(B, 1, H, W)}")
        if loss == "smooth_l1":  # independence prior distillation: 4x^2 if |x| < 0.25 else |x|
            x = (torch.sigmoid(logits) - target).abs()
            return torch.where(x < 0.25, 4 * x ** 2, x).mean()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return bce + dice_loss(torch.sigmoid(logits), target) if loss == "ce_dice" else bce
    if loss == "smooth_l1":
        raise ValueError("loss 'smooth_l1' is for binary (1-logit) segmenters only")
    if "parts" in batch:
        labels = batch["parts"].to(logits.device, torch.long)  # (B, H, W)
    elif "mask" in batch:
        labels = (batch["mask"][:, 0] > 0.5).to(logits.device, torch.long)
    else:
        raise ValueError(f"a {C}-class segmenter needs batches with 'parts' (B, H, W) or a 'mask'")
    if labels.shape != (B, H, W):
        raise ValueError(f"batch labels have shape {tuple(labels.shape)}, expected {(B, H, W)}")
    ce = F.cross_entropy(logits, labels)
    if loss != "ce_dice":
        return ce
    onehot = F.one_hot(labels, C).permute(0, 3, 1, 2).float()  # (B, C, H, W)
    return ce + dice_loss(logits.softmax(1), onehot)


def train_segmenter(batches, net=None, num_classes=None, steps=2000, lr=1e-3, batch_size=32, colour_jitter=True,
                    loss="bce", progress=True, log_path=None, device="cpu", generator=None, log_every=50,
                    lr_decay="constant"):
    """Train a segmenter with Adam for `steps` steps; returns it in eval mode.

    net: a minseg.nets module, or a kind ("unet" | "deeplab"; None = "unet") built with its defaults and
    `num_classes` (default 1).
    loss: "bce" (sigmoid BCE for 1 logit, softmax CE for K + 1), "ce_dice" (that + soft Dice, GANSeg) or
    "smooth_l1" (binary only, on the sigmoid vs a soft target). colour_jitter: random colour per sample on the
    images (ILSGAN's colour augmentation), drawn from `generator`. log_path: a JSON-lines file, one line
    (step, loss averaged since the last line, seconds) every `log_every` steps.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if lr_decay not in LR_DECAYS:
        raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {lr_decay!r}")
    if net is None or isinstance(net, str):
        net = build_net(net or "unet", num_classes=num_classes or 1)
    elif num_classes is not None and num_classes != net.num_classes:
        raise ValueError(f"num_classes={num_classes} but the given net has {net.num_classes} output classes")
    net = net.to(device).train()
    source = batch_source(batches, batch_size, generator, device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if lr_decay == "cosine" else None
    log = open(log_path, "w") if log_path else None
    start, running, count = time.time(), 0.0, 0
    bar = tqdm(range(1, steps + 1), desc="segmenter", disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            batch = next(source, None)
            if batch is None:
                raise ValueError(f"the batch source ran out after {step - 1} of {steps} steps")
            images = batch["image"].to(device, torch.float32)  # (B, 3, H, W) in [-1, 1]
            if colour_jitter:
                images = jitter_colours(images, generator)
            value = segmentation_loss(net(images), batch, loss)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if decay is not None:
                decay.step()
            running, count = running + value.item(), count + 1
            if step % 10 == 0:
                bar.set_postfix(loss=f"{running / count:.4f}")
            if log and (step % log_every == 0 or step == steps):
                record = dict(step=step, loss=running / count, seconds=round(time.time() - start, 2))
                log.write(json.dumps(record) + "\n")
                log.flush()
                running, count = 0.0, 0
    finally:
        if log:
            log.close()
    return net.eval()


def _as_float_images(images):
    """uint8 (N, 3, H, W) in [0, 255] or float in [-1, 1] -> float in [-1, 1]."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def predict(net, images, batch_size=64):
    """Label maps (N, H, W) long on the CPU: sigmoid > 0.5 for a binary net, argmax for a K + 1 class net.

    images: (N, 3, H, W) float in [-1, 1] or uint8 (as stored in a SegmentationSet), any device.
    """
    was_training, device = net.training, next(net.parameters()).device
    net.eval()
    out = []
    for i in range(0, len(images), batch_size):
        logits = net(_as_float_images(images[i:i + batch_size]).to(device))  # (b, C, H, W)
        labels = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)  # sigmoid > 0.5 <=> logit > 0
        out.append(labels.cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, *images.shape[-2:], dtype=torch.long)


def pseudo_labelled(net, real_set, batch_size=64):
    """`real_set`'s images labelled by `net`: masks (and parts, for a K + 1 class net) are its predictions.

    The real set's own masks, parts and labels are never read; the copy keeps images, boxes and names only.
    """
    from minseg.data.base import SegmentationSet
    labels = predict(net, real_set.images, batch_size)  # (N, H, W) long
    parts = labels.to(torch.uint8) if net.num_classes > 1 else None
    return SegmentationSet(images=real_set.images, masks=(labels > 0).to(torch.uint8)[:, None], parts=parts,
                           num_parts=net.num_classes - 1, boxes=real_set.boxes, names=list(real_set.names),
                           protocol=f"{real_set.protocol}, labelled by a segmenter")


def evaluate_segmenter(net, ds, batch_size=64):
    """Foreground scores of `net` on a data set with masks (foreground = predicted class != 0).

    Returns SegmentationMeter.result(): acc, iou, miou (data set level), per_image_iou, per_image_acc, n_images;
    where the set has GT part maps, also `recall_<part>` for each part (named by ds.part_names, else part1, ...):
    the share of that part's pixels predicted foreground (parts absent from the set left out). Predicted part maps
    are not scored: unsupervised parts have no fixed correspondence to annotated ones.
    """
    if ds.masks is None:
        raise ValueError(f"data set ({ds.protocol or 'no protocol'}) has no masks to score against")
    num_parts = ds.num_parts if ds.parts is not None else 0
    meter = SegmentationMeter(num_parts)
    for i in range(0, len(ds), batch_size):
        parts = ds.parts[i:i + batch_size] if num_parts else None
        meter.update(predict(net, ds.images[i:i + batch_size], batch_size), ds.masks[i:i + batch_size], parts)
    scores = meter.result()
    names = ds.part_names or [f"part{k}" for k in range(1, num_parts + 1)]
    scores.update({f"recall_{name}": r for name, r in zip(names, scores.pop("part_recall", [])) if r is not None})
    return scores


def save_segmenter(path, net, meta=None):
    """torch.save the net's kind, constructor kwargs, weights and `meta` (plain types) to `path`, atomically."""
    if getattr(net, "kind", None) not in NETS:
        raise ValueError(f"can only save minseg.nets segmenters ({sorted(NETS)}), got {type(net).__name__}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    payload = dict(kind=net.kind, config=dict(net.config), meta=dict(meta or {}),
                   state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()})
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_segmenter(path, device="cpu"):
    """The net (eval mode, on `device`) saved by save_segmenter, its meta dict as `net.meta`; weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"segmenter checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or not {"kind", "config", "state_dict"} <= set(payload):
        raise ValueError(f"{path} is not a segmenter checkpoint (expected keys kind, config, state_dict)")
    net = build_net(payload["kind"], **payload["config"])
    net.load_state_dict(payload["state_dict"])
    net.meta = payload.get("meta", {})
    return net.to(device).eval()


def supervised_baseline(ds_train, ds_test, net="unet", steps=2000, batch_size=32, lr=1e-3, colour_jitter=True,
                        seed=0, progress=True, log_path=None, device="cpu", **net_kwargs):
    """Train a binary segmenter on the labelled train split (augmented sampler), score it on the test split.

    net: "unet" | "deeplab" (built with num_classes=1 and **net_kwargs, e.g. width) or a ready nn.Module.
    Returns (net, metrics) with metrics as in evaluate_segmenter.
    """
    if ds_train.masks is None:
        raise ValueError(f"the supervised baseline needs masks in the train split ({ds_train.protocol})")
    torch.manual_seed(seed)  # the weight init
    if isinstance(net, str):
        net = build_net(net, num_classes=1, **net_kwargs)
    elif net_kwargs:
        raise ValueError(f"net_kwargs {sorted(net_kwargs)} only apply when net is a kind name, not a module")
    generator = torch.Generator().manual_seed(seed)  # batch order, augmentation, colour jitter
    net = train_segmenter(ds_train, net, steps=steps, lr=lr, batch_size=batch_size, colour_jitter=colour_jitter,
                          loss="bce", progress=progress, log_path=log_path, device=device, generator=generator)
    return net, evaluate_segmenter(net, ds_test, batch_size=64)
