"""The GAN training loop every method runs, and its checkpoints (the shape of NVIDIA EDM's training_loop).

A method is an object with
    train_step(real_batch) -> dict of float stats   one discriminator + generator update
    snapshot(path)                                  write a sample grid PNG
    state_dict() / load_state_dict(state)           networks, EMA, optimisers
and, optionally, `collapse_message(tick_stats) -> str | None` to recognise a trivial decomposition.
The loop counts images seen by the discriminator (as the papers state schedules), prints one status line
per tick, appends the tick's mean stats to stats.jsonl, and at every snapshot writes a grid and an atomic
checkpoint holding everything needed to resume: the method, the caller's pipeline state, the RNG states.
"""

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm


class CollapseError(RuntimeError):
    """The generator fell into a trivial decomposition (e.g. an empty or full mask) and stayed there."""


def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, then rename: a killed run never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (start without --resume)")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_loop(method, batches, state, total_images, out_dir, save_state, tick_images=2000,
                  snapshot_images=10000, collapse_ticks=5, progress=True, desc="gan"):
    """Train `method` on real batches until state["images_seen"] reaches total_images.

    state: the caller's pipeline dict (checkpointed by `save_state()`), updated in place.
    Raises CollapseError when the method reports a collapse for `collapse_ticks` ticks in a row.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_file = out_dir / "stats.jsonl"
    tick_sums, tick_count, collapsed_ticks = {}, 0, 0
    tick_start, next_tick = time.time(), state["images_seen"] + tick_images
    next_snapshot = state["images_seen"] + snapshot_images
    bar = tqdm(total=total_images, initial=state["images_seen"], unit="img", desc=desc, disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    while state["images_seen"] < total_images:
        real = next(batches)
        stats = method.train_step(real)
        batch_size = len(real["image"])
        state["images_seen"] += batch_size
        bar.update(batch_size)
        for key, value in stats.items():
            tick_sums[key] = tick_sums.get(key, 0.0) + float(value)
        tick_count += 1

        done = state["images_seen"] >= total_images
        if state["images_seen"] >= next_tick or done:
            elapsed = time.time() - tick_start
            means = {key: value / tick_count for key, value in tick_sums.items()}
            record = {"phase": desc, "images": state["images_seen"], "img_per_s": tick_count * batch_size / elapsed,
                      **{k: round(v, 5) for k, v in means.items()}}
            with open(stats_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:6]})
            if not progress:
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()), flush=True)
            message = method.collapse_message(means) if hasattr(method, "collapse_message") else None
            collapsed_ticks = collapsed_ticks + 1 if message else 0
            if message:
                tqdm.write(f"warning: {message} ({collapsed_ticks}/{collapse_ticks} ticks)")
            if collapsed_ticks >= collapse_ticks:
                bar.close()
                raise CollapseError(message)
            tick_sums, tick_count, tick_start = {}, 0, time.time()
            next_tick += tick_images
        if state["images_seen"] >= next_snapshot or done:
            method.snapshot(out_dir / "samples" / f"{desc}-{state['images_seen']:08d}.png")
            save_state()
            next_snapshot += snapshot_images
    bar.close()


def finite(*values):
    return all(math.isfinite(float(v)) for v in values)
