"""Multi-process training (minseg/distributed.py) on the CPU with gloo: 2 processes spawned here agree with one.

One spawn runs four checks in each rank: gradient averaging gives exactly the single-process step on the union
of the ranks' batches; a non-finite loss on one rank skips the step on every rank (no hang); every rank gets rank
0's answer to "does the checkpoint exist?"; a few real ILSGAN steps through training_loop keep the parameters
identical across ranks and count the global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from minseg import distributed
    from minseg.data import load_dataset
    from minseg.methods import ilsgan
    from minseg.train import Checkpoint, guarded_step, start_run, training_loop
    assert distributed.init("cpu", timeout_s=120) == "cpu" and distributed.world_size() == WORLD
    result = {"rank": rank}

    # 1. averaged gradients == one process on the union batch (mean loss, same-size batches per rank)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    data = torch.randn(WORLD, 4, 3, generator=torch.Generator().manual_seed(1))
    assert guarded_step(opt, net(data[rank]).pow(2).mean())
    torch.manual_seed(0)
    single = torch.nn.Linear(3, 1)
    single_opt = torch.optim.SGD(single.parameters(), 0.1)
    single_opt.zero_grad()
    single(data.flatten(0, 1)).pow(2).mean().backward()
    single_opt.step()
    result["union_step_error"] = max((a - b).abs().max().item() for a, b in zip(net.parameters(), single.parameters()))

    # 2. a non-finite loss on rank 1 only: every rank skips, nobody hangs
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(data[rank]).pow(2).mean() * (float("nan") if rank == 1 else 1.0)
    result["poisoned_step_taken"] = guarded_step(opt, loss)
    result["poisoned_params_unchanged"] = all(torch.equal(p, q) for p, q in zip(net.parameters(), before))

    # 3. whether a checkpoint exists decides which collectives run next, so every rank must get rank 0's answer
    #    (asking the file system per rank raced with rank 0's write and deadlocked a torchrun run): each rank
    #    looks at its own path, and only rank 1's file exists
    if rank == 1:
        Path(out, "own1.pt").write_bytes(b"")
    result["exists_agrees_with_rank0"] = Checkpoint(Path(out) / f"own{rank}.pt", net, {}, {}, {}).exists() is False
    distributed.barrier()

    # 4. real ILSGAN steps: rank 0's weights broadcast, own seeds per rank, identical parameters after 3 steps
    torch.manual_seed(100 + rank)  # different initial weights: start_run must broadcast rank 0's
    cfg = ilsgan.ILSGANConfig(size=32, gen_width=8, disc_width=8, z_dim=8, num_codes=4)
    method, state = ilsgan.ILSGAN(cfg), {"images_seen": 0, "seed": 0}
    save = start_run(out, method, state, cfg, {}, seed=0)
    train = load_dataset("shapes", "train", size=32, limit=16)
    batches = train.sampler(4, augment=True)
    first = next(batches)["image"]
    gathered = [torch.empty_like(first) for _ in range(WORLD)]
    dist.all_gather(gathered, first)
    result["ranks_draw_different_batches"] = not torch.equal(gathered[0], gathered[1])
    training_loop(method, batches, state, 3 * 4 * WORLD, out, save, tick_images=8, snapshot_images=8,
                  progress=False)
    flat = torch.cat([p.detach().flatten() for net in (method.G, method.D, method.E_pi) for p in net.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(everyone, flat)
    result["param_spread"] = max((everyone[0] - e).abs().max().item() for e in everyone)
    result.update(images_seen=state["images_seen"], steps=state["steps"], skipped=method.skipped_steps)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def test_two_gloo_processes_match_one(tmp_path):
    mp.spawn(worker, (free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        assert r["union_step_error"] < 1e-6, r
        assert r["poisoned_step_taken"] is False and r["poisoned_params_unchanged"], r
        assert r["ranks_draw_different_batches"], r
        assert r["exists_agrees_with_rank0"], r
        assert r["param_spread"] == 0.0, r  # the same weights on every rank after real steps
        assert r["images_seen"] == 3 * 4 * WORLD and r["steps"] == 3 and r["skipped"] == 0, r
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # rank 0 wrote it, once
    assert saved["world_size"] == WORLD and saved["state"]["images_seen"] == 24
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [s["images"] for s in stats] == [8, 16, 24]  # one record per tick, from rank 0 alone


def test_torchrun_cli(tmp_path):
    """`torchrun --nproc_per_node 2 run.py shapes ...` end to end: rank 0 writes the results, the counter is global."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(free_port()), "run.py", "shapes", "--limit", "32", "--size", "32", "--batch-size", "4",
               "--gan-images", "64", "--final-steps", "1", "--set", "gen_width=8", "--set", "disc_width=8",
               "--set", "z_dim=8", "--set", "tick_images=16", "--set", "snapshot_images=32", "--quiet",
               "--threads", "1", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MINSEG_DIST_TIMEOUT="120"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("results: ") == 1  # rank 0 prints, rank 1 is silent
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["world_size"] == WORLD and saved["state"]["steps"] == 64 // (4 * WORLD)
    assert json.loads((out / "results.json").read_text())["method"] == "ilsgan"
