"""The GAN training loop every method runs, its checkpoints, and the resume block every run() shares.

A method is an object with
    train_step(real_batch) -> dict of float stats   one discriminator + generator update; stats["skipped"] is 1
                                                    when a step was skipped for a non-finite loss or gradient
    snapshot(path)                                  write a sample grid PNG
    state_dict() / load_state_dict(state)           networks, EMA, optimisers
and, optionally, `collapse_message(tick_stats) -> str | None` to recognise a trivial decomposition. Its optimisers
(attributes that are torch.optim.Optimizer) should step through `guarded_step`, which skips non-finite steps and,
under torchrun, averages gradients over ranks (minseg/distributed.py).

The loop counts images seen by the discriminator (as the papers state schedules; under torchrun the global batch),
prints one status line per tick, appends the tick's mean stats to stats.jsonl, and at every snapshot writes a grid
and an atomic checkpoint (`Checkpoint`, made by `start_run`) holding everything needed to resume: the method, the
pipeline state (images seen, steps, round, stage, seed, learning-rate scale), the RNG states, config and schedule.
Divergence guard: after `divergence_steps` skipped steps in a row the loop reloads the last good checkpoint and
lowers every learning rate by `lr_factor`, saying so on the console and in stats.jsonl (an "event" record).
"""

import json
import math
import os
import pickle
import random
import shlex
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minseg.distributed import (average_gradients, barrier, broadcast_modules, is_main, mean_over_ranks, rank,
                                rank0_says, world_size)

# Schedule fields that may change on --resume: those that only say how long to train (or log), e.g. to extend a
# run, and those that say how the final segmenter is made (final_*), which act only after the GAN phase.
LENGTH_FIELDS = ("rounds", "eval_layers")
MISSING = "<missing>"  # a settings field one side does not have


def may_change_on_resume(name):
    return name in LENGTH_FIELDS or name.endswith("_images") or name.endswith("_steps") or name.startswith("final_")


class CollapseError(RuntimeError):
    """The generator fell into a trivial decomposition (e.g. an empty or full mask) and stayed there."""


class DivergenceError(CollapseError):
    """Training kept producing non-finite losses or gradients, even after restoring checkpoints at lower rates."""


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, state):
    """torch.save to a temp file in the same folder, flushed to disk, then rename: a killed run never leaves a torn
    file, only the previous checkpoint (and at worst a stale .tmp file, which `start_run` removes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """The dict save_checkpoint wrote, loaded with weights_only=True (tensors and plain Python types only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume (start without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:  # torn, foreign, objects
        raise ValueError(f"checkpoint {path} is unreadable ({str(err).splitlines()[0]}); move it away to start "
                         "fresh, or point --out at another run") from None


def rng_state():
    """The torch (and CUDA), numpy and Python RNG states as tensors (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
             "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    pos, has_gauss = state["numpy_pos"].tolist() if "numpy_pos" in state else (624, 0)
    gauss = float(state["numpy_gauss"]) if "numpy_gauss" in state else 0.0
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(value):
    """Lists (as a checkpoint may hold them) and tuples compare alike."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def setting_differences(saved, current):
    """{name: (saved value, current value)} of the fields that differ between two settings dicts (MISSING where
    one of them lacks the field)."""
    return {k: (saved.get(k, MISSING), current.get(k, MISSING)) for k in sorted(set(saved) | set(current))
            if _plain(saved.get(k, MISSING)) != _plain(current.get(k, MISSING))}


def check_resumable(saved, config, schedule, path):
    """Raise ValueError naming every config / schedule field that differs from the checkpoint's, except schedule
    lengths (LENGTH_FIELDS, *_images, *_steps) and final_* fields, which may change (to shorten or extend a run, or
    to remake its final segmenter), and fields the checkpoint does not have (added to minseg since): those are
    printed."""
    config_diff = setting_differences(saved.get("config", config), config)
    schedule_diff = setting_differences(saved.get("schedule", schedule), schedule)
    lengths = {k: v for k, v in schedule_diff.items() if may_change_on_resume(k) and v[0] != MISSING}
    added = {k: v for k, v in {**config_diff, **schedule_diff}.items() if v[0] == MISSING}
    wrong = [("config", k, v) for k, v in config_diff.items() if k not in added]
    wrong += [("schedule", k, v) for k, v in schedule_diff.items() if k not in lengths and k not in added]
    if wrong:
        listing = "; ".join(f"{kind} {k}: {old!r} in the checkpoint, {new!r} now" for kind, k, (old, new) in wrong)
        fix = " ".join("--set " + shlex.quote(f"{k}={old!r}") for _, k, (old, _) in wrong)
        raise ValueError(f"--resume: {path} was written with other settings: {listing}. Resume with the "
                         f"checkpoint's settings ({fix or 'as it was started'}), or start a fresh run without "
                         "--resume or in another --out")
    if added:  # fields minseg gained after the checkpoint was written: the run goes on with their values now
        print("--resume: settings newer than the checkpoint, used as they are now: "
              + ", ".join(f"{k}={new!r}" for k, (_, new) in added.items()))
    if lengths:
        print("--resume: schedule lengths or final_* settings differ from the checkpoint's (the run goes on with "
              "the new ones): "
              + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in lengths.items()))


def _as_dict(settings):
    return asdict(settings) if is_dataclass(settings) else dict(settings or {})


class Checkpoint:
    """A run's checkpoint file: calling it saves everything needed to resume (rank 0, atomically); `restore()`
    reloads the last one into the method and the pipeline state (the divergence guard's way back)."""

    def __init__(self, path, method, state, config, schedule):
        self.path, self.method, self.state = Path(path), method, state
        self.config, self.schedule = _as_dict(config), _as_dict(schedule)
        self.saved_schedule = {}  # the schedule the resumed checkpoint was written with (start_run fills it in)

    def exists(self):
        return rank0_says(self.path.is_file())  # collective under torchrun: every rank must get the same answer

    def __call__(self):
        if is_main():
            save_checkpoint(self.path, {"method": self.method.state_dict(), "state": dict(self.state),
                                        "rng": rng_state(), "config": self.config, "schedule": self.schedule,
                                        "world_size": world_size()})
        barrier()

    def restore(self):
        """Load the checkpoint's method state and pipeline state (not its RNG states: the retry draws afresh)."""
        barrier()
        saved = load_checkpoint(self.path)
        self.method.load_state_dict(saved["method"])
        self.state.update(saved["state"])


def start_run(out_dir, method, state, config, schedule, seed=0, resume=False, describe=None):
    """The resume block of every method's run(): returns the run's `Checkpoint` (call it to save).

    resume: continue from OUT/checkpoint.pt when it exists (networks, EMA, optimisers, pipeline state, RNG states)
    after `check_resumable`; without one, start fresh. A fresh start empties OUT/stats.jsonl. Under torchrun rank 0's
    weights are broadcast and each rank gets its own seed. describe(state) -> str says where a resumed run stands.
    """
    checkpoint = Checkpoint(Path(out_dir) / "checkpoint.pt", method, state, config, schedule)
    resumed = resume and checkpoint.exists()
    if is_main():
        for stale in [*Path(out_dir).glob(".*.tmp*"), *Path(out_dir).glob("samples/.*.tmp*")]:  # left by a kill
            stale.unlink(missing_ok=True)
    if resumed:
        saved = load_checkpoint(checkpoint.path)
        check_resumable(saved, checkpoint.config, checkpoint.schedule, checkpoint.path)
        checkpoint.saved_schedule = dict(saved.get("schedule", {}))
        method.load_state_dict(saved["method"])
        state.update(saved["state"])
        set_rng_state(saved["rng"])
        where = describe(state) if describe else f"{state['images_seen']:,} images seen"
        print(f"resumed {checkpoint.path}: {where}")
        if state.get("seed", seed) != seed:
            print(f"--resume: continuing the checkpoint's run of seed {state['seed']} (not {seed})")
    else:
        if resume:
            print(f"--resume: no checkpoint at {checkpoint.path} yet, starting fresh")
        if is_main():
            (Path(out_dir) / "stats.jsonl").unlink(missing_ok=True)
    if world_size() > 1:
        broadcast_modules(modules_of(method))
        seed_everything(seed + 1_000_003 * rank() + 7919 * int(state.get("steps", 0)))
    return checkpoint


# -------------------------------------------------------------------------------------------- the optimiser

def modules_of(method):
    """The networks a method holds as attributes (an EMA's copy included)."""
    out = {}
    for value in vars(method).values():
        net = value if isinstance(value, torch.nn.Module) else getattr(value, "net", None)
        if isinstance(net, torch.nn.Module):
            out[id(net)] = net
    return list(out.values())


def optimizers_of(method):
    return [v for v in vars(method).values() if isinstance(v, torch.optim.Optimizer)]


def guarded_step(optimizer, loss):
    """Backward and step, unless the loss or a gradient is non-finite: then skip and return False (the divergence
    guard's first line; the loop counts skipped steps in a row). Under torchrun the gradients are averaged over
    ranks first, and a step skipped on one rank is skipped on all."""
    optimizer.zero_grad(set_to_none=True)
    finite_loss = bool(torch.isfinite(loss))
    if finite_loss:
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if world_size() > 1:
        ok = average_gradients(params, poison=not finite_loss)
    else:
        ok = finite_loss and all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
    if not ok:
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


# ------------------------------------------------------------------------------------------------- the loop

def read_stats(path):
    """The (line, record) pairs of a stats.jsonl, skipping a torn line (a run killed mid-write); [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    pairs = []
    for line in path.read_text().splitlines():
        try:
            pairs.append((line, json.loads(line)))
        except ValueError:
            continue
    return pairs


def _trim_stats(path, phase, images_seen):
    """Drop the records a resumed run writes again (this phase's ticks past images_seen; events stay) and any
    torn line."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line, record in read_stats(path)
            if not (record.get("phase") == phase and record.get("images", 0) > images_seen and "event" not in record)]
    if keep != lines:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def training_loop(method, batches, state, total_images, out_dir, save_state, tick_images=2000,
                  snapshot_images=10000, collapse_ticks=5, progress=True, desc="gan", divergence_steps=20,
                  lr_factor=0.5, max_restores=5):
    """Train `method` on real batches until state["images_seen"] reaches total_images.

    state: the caller's pipeline dict (checkpointed by `save_state()`), updated in place.
    save_state: a `Checkpoint` (or any callable that saves; then divergence only lowers the learning rates).
    Raises CollapseError when the method reports a collapse for `collapse_ticks` ticks in a row, DivergenceError
    when `divergence_steps` skipped steps in a row recur after `max_restores` restores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = is_main()
    stats_file = out_dir / "stats.jsonl"
    if main:
        _trim_stats(stats_file, desc, state["images_seen"])
    restore = getattr(save_state, "restore", None)
    if restore is not None and not save_state.exists():
        save_state()  # a good state to come back to before the first snapshot
    state.setdefault("steps", 0)
    tick_sums, tick_counts, tick_count, collapsed_ticks, streak = {}, {}, 0, 0, 0
    tick_start, next_tick = time.time(), state["images_seen"] + tick_images
    next_snapshot = state["images_seen"] + snapshot_images
    bar = tqdm(total=total_images, initial=state["images_seen"], unit="img", desc=desc,
               disable=not (progress and main), dynamic_ncols=True, smoothing=0.1)

    def log(record, message=None):
        if main:
            with open(stats_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if message:
                tqdm.write(message)

    while state["images_seen"] < total_images:
        real = next(batches)
        stats = method.train_step(real)
        batch_size = len(real["image"]) * world_size()  # the global batch
        if batch_size == 0:
            raise ValueError("training_loop: the batch stream gave an empty batch (it would never finish)")
        state["images_seen"] += batch_size
        state["steps"] += 1
        bar.update(batch_size)
        for key, value in stats.items():
            tick_sums.setdefault(key, 0.0)
            tick_counts.setdefault(key, 0)
            if math.isfinite(float(value)):  # a skipped step's losses may be nan: left out of the means
                tick_sums[key] += float(value)
                tick_counts[key] += 1
        tick_count += 1
        streak = streak + 1 if stats.get("skipped", 0) else 0

        if streak >= divergence_steps:
            restores, scale = state.get("restores", 0) + 1, state.get("lr_scale", 1.0) * lr_factor
            if restores > max_restores:
                bar.close()
                raise DivergenceError(f"{streak} steps in a row with a non-finite loss or gradient after "
                                      f"{max_restores} restores at lower learning rates (now x{scale / lr_factor:g})")
            at = state["images_seen"]
            optimizers = optimizers_of(method)
            rates = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
            if restore is not None:
                restore()  # rewinds the networks, optimisers and state to the last good checkpoint
            for opt, lrs in zip(optimizers, rates):
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr * lr_factor
            state.update(restores=restores, lr_scale=scale)
            where = (f"restored {save_state.path} ({state['images_seen']:,} images seen)" if restore is not None
                     else "no checkpoint to restore")
            log({"phase": desc, "event": "divergence", "images": at, "skipped_in_a_row": streak,
                 "restored_images": state["images_seen"] if restore is not None else None, "lr_scale": scale,
                 "restores": restores},
                f"divergence: {streak} steps in a row skipped (non-finite loss or gradient) at {at:,} images; "
                f"{where}, learning rates x{lr_factor:g} (now x{scale:g} of the config's), restore "
                f"{restores}/{max_restores}")
            save_state()  # the lowered rates survive a kill
            streak, tick_sums, tick_counts, tick_count, tick_start = 0, {}, {}, 0, time.time()
            next_tick = state["images_seen"] + tick_images
            next_snapshot = state["images_seen"] + snapshot_images
            bar.n = state["images_seen"]
            bar.refresh()
            continue

        done = state["images_seen"] >= total_images
        if state["images_seen"] >= next_tick or done:
            elapsed = max(time.time() - tick_start, 1e-9)
            means = mean_over_ranks({k: v / tick_counts[k] if tick_counts[k] else math.nan
                                     for k, v in tick_sums.items()})
            record = {"phase": desc, "images": state["images_seen"], "img_per_s": tick_count * batch_size / elapsed,
                      **{k: round(v, 5) if math.isfinite(v) else None for k, v in means.items()}}
            log(record)
            bar.set_postfix({k: f"{v:.3g}" for k, v in list(means.items())[:6]})
            if not progress and main:
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
            message = method.collapse_message(means) if hasattr(method, "collapse_message") and means else None
            collapsed_ticks = collapsed_ticks + 1 if message else 0
            if message and main:
                tqdm.write(f"warning: {message} ({collapsed_ticks}/{collapse_ticks} ticks)")
            if collapsed_ticks >= collapse_ticks:
                bar.close()
                log({"phase": desc, "event": "collapse", "images": state["images_seen"], "message": message})
                raise CollapseError(message)
            tick_sums, tick_counts, tick_count, tick_start = {}, {}, 0, time.time()
            next_tick += tick_images
        # a snapshot waits for a step that was not skipped, so the checkpoint it writes is a good one
        if (state["images_seen"] >= next_snapshot and streak == 0) or done:
            if main:
                method.snapshot(out_dir / "samples" / f"{desc}-{state['images_seen']:08d}.png")
            save_state()
            next_snapshot = max(next_snapshot + snapshot_images, state["images_seen"] + 1)
    bar.close()


def finite(*values):
    return all(math.isfinite(float(v)) for v in values)
