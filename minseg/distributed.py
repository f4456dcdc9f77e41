"""Multi-GPU training: one process per GPU under `torchrun --nproc_per_node N run.py ...` (or per CPU process, gloo).

Plain data parallelism, written out rather than hidden in DistributedDataParallel (GAN steps toggle
requires_grad, take gradient penalties with create_graph and skip non-finite steps, which DDP's hooks handle
badly): every rank builds the same networks (rank 0's weights are broadcast once), draws its own batches and
noise from its own seed, and after every backward `average_gradients` all-reduces the gradients, so each
optimiser step is the same on every rank and the networks stay identical. A step is skipped on all ranks when
any rank's loss or gradient is non-finite. Rank 0 alone prints, writes samples, stats and checkpoints; the
images-seen counter counts the global batch (batch size x world size).

Without WORLD_SIZE > 1 in the environment nothing here does anything: world_size() is 1, is_main() is True.
"""

import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Rank 0 (or a single process): the one that logs and writes files."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def init(device="cpu", timeout_s=None):
    """Join the process group torchrun describes (env WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns the device this rank trains on: `device` as given in a single process; under torchrun cuda:LOCAL_RANK
    (backend nccl) for a CUDA device, else the CPU (backend gloo). Ranks other than 0 print nothing. The C++ ops
    extension is built once: rank 0 builds it while the others wait, then they load the cached build.
    timeout_s (or env MINSEG_DIST_TIMEOUT): seconds a collective may wait for the other ranks before it raises
    (torch's default, 30 min, when neither is set); the tests set it so that a deadlock fails instead of hanging.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             "start at most that many processes (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        timeout_s = timeout_s or float(os.environ.get("MINSEG_DIST_TIMEOUT", 0)) or None
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
        atexit.register(shutdown)
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank-0 logging; errors still reach stderr
    from minseg.ops._build import load_extension
    if is_main():
        load_extension()
    barrier()
    if not is_main():
        load_extension()
    return device


def shutdown():
    """Leave the process group. All ranks meet at a barrier first: a rank that tears gloo down while another is
    still finishing its last collective can abort the other ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def broadcast_modules(modules):
    """Copy rank 0's parameters and buffers into every rank's copy of `modules` (identical starting weights)."""
    if world_size() == 1:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def average_gradients(params, poison=False):
    """All-reduce the gradients of `params` (one flat tensor) and divide by the world size, in place.

    poison: this rank's loss was non-finite (no backward ran): it contributes NaN, so every rank sees a
    non-finite average and skips the step together. Returns True when the averaged gradients are all finite.
    """
    if world_size() == 1 or not params:
        return True
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    if poison:
        flat.fill_(float("nan"))
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        n = p.numel()
        if p.grad is not None:
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n
    return bool(torch.isfinite(flat).all())


def _collective_device():
    """Where small tensors for a collective must live: the GPU under nccl, the CPU under gloo."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def rank0_says(flag):
    """Rank 0's value of a bool, on every rank. For decisions that pick which collectives run next (does the
    checkpoint exist yet?): each rank asking the file system itself races with rank 0's write and deadlocks."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, 0)
    return bool(t.item())


def mean_over_ranks(values):
    """{name: float} averaged over ranks (every rank passes the same names): tick stats, collapse checks."""
    if world_size() == 1 or not values:
        return values
    keys = list(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}
