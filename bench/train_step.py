"""Benchmark of one GAN training step per method at its shapes preset: the step as shipped (the discriminator frozen
while the generator's loss runs through it, `minseg.nets.blocks.frozen`) against the same step with the
discriminator left trainable (so autograd also computes its weight gradients, which the generator's optimiser
throws away). Both variants give the same parameters bit for bit (tests/test_blocks.py checks every method);
only the time differs.

Side by side, as bench/ops.py: every round times each variant once (a few steps each), in a rotating order, and the
ratio is the median over rounds of (trainable time / frozen time) measured in the same round, so that load from
other processes hits both alike.

    python bench/train_step.py [--threads N] [--rounds N] [--steps N] [--methods ilsgan ganseg ...]
"""

import argparse
import contextlib
import statistics
import sys

import torch

from ops import Timer, time_side_by_side  # bench/ops.py: this script's folder is on sys.path when run as a script


def make_method(name, disc_width=None):
    """(method, batch size) at the method's shapes preset and quick schedule (the plain GAN: 32 px, default widths)."""
    from minseg.methods import ganseg, ilsgan, independence, plain_gan
    torch.manual_seed(0)
    if name == "ilsgan":
        preset = dict(ilsgan.PRESETS["shapes"], **({"disc_width": disc_width} if disc_width else {}))
        return ilsgan.ILSGAN(ilsgan.ILSGANConfig(**preset)), ilsgan.make_schedule("quick", "shapes").batch_size
    if name == "ganseg":
        batch = ganseg.make_schedule("quick", "shapes").batch_size
        return ganseg.GANSeg(ganseg.GANSegConfig(**ganseg.PRESETS["shapes"])), batch
    if name == "plain":
        return plain_gan.PlainGAN(plain_gan.PlainConfig(size=32)), 32
    if name == "independence":
        cfg = independence.IndependenceConfig(**independence.PRESETS["shapes"])
        pool = independence.PatchPool(torch.randint(0, 256, (64, 3, cfg.size, cfg.size), dtype=torch.uint8))
        return independence.ForegroundCarver(cfg, pool, torch.zeros(2, 3, cfg.size, cfg.size)), 32
    raise ValueError(f"unknown method {name!r}")


MODULES = {"ilsgan": "ilsgan", "ilsgan-dw16": "ilsgan", "ganseg": "ganseg", "plain": "plain_gan",
           "independence": "independence"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed call")
    parser.add_argument("--methods", nargs="+", default=list(MODULES), choices=list(MODULES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps\n")
    print("| method (shapes preset) | batch | frozen D, ms/step | trainable D, ms/step | trainable / frozen |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.methods:
        method, batch = make_method(name.split("-")[0], 16 if name.endswith("dw16") else None)
        size = method.cfg.size
        real = {"image": torch.rand(batch, 3, size, size) * 2 - 1}
        module = sys.modules[f"minseg.methods.{MODULES[name]}"]
        shipped = module.frozen

        def steps(freeze):
            module.frozen = shipped if freeze else (lambda *nets: contextlib.nullcontext())
            try:
                for _ in range(args.steps):
                    method.train_step(real)
            finally:
                module.frozen = shipped

        steps(True)  # warm-up (and the ops' JIT build on first use)
        times = time_side_by_side({"frozen": lambda: steps(True), "trainable": lambda: steps(False)}, args.rounds,
                                  Timer(torch.device("cpu")))
        frozen_ms = [t / args.steps for t in times["frozen"]]
        trainable_ms = [t / args.steps for t in times["trainable"]]
        ratio = statistics.median(b / a for a, b in zip(frozen_ms, trainable_ms))
        print(f"| {name} | {batch} | {statistics.median(frozen_ms):.1f} | {statistics.median(trainable_ms):.1f} | "
              f"{ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
