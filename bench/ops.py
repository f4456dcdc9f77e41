"""Benchmark of the fused ops (op A composite, op B part heatmaps / positional encoding; see
/work/shared/notes/kernels.md): eager reference vs torch.compile(reference) vs the C++/CUDA extension, forward
and forward+backward, as a markdown table of medians and ratios. On CUDA also the forward's achieved bandwidth
against the notes' byte model (reads layers, alphas, background, writes the image: 40 B/pixel for fp32, C = 3,
N = 1), with the L2 cache flushed before every timed call.

    python bench/ops.py [--device cpu|cuda] [--repeats N] [--sizes 32x1x3x64x64 ...] [--skip-compile] [--threads N]
"""

import argparse
import statistics
import time

import torch

from minseg.ops import (composite, composite_reference, part_heatmaps, part_heatmaps_reference, perturbation,
                        positional_encoding, positional_encoding_reference)

COMPOSITE_SIZES = ["32x1x3x64x64", "32x1x3x128x128", "64x1x3x256x256", "32x8x3x64x64"]  # B x N x C x H x W
GANSEG = dict(B=32, K=8, D=64, size=128, margin=10, P=8, F=32)  # op B at GANSeg's sizes: 128 + 2 * 10 px
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # HBM peak by card name
L2_FLUSH_BYTES = 64 * 2**20  # above the 50 MB L2 of an H100/H200


def median_ms(fn, repeats, device):
    fn()  # warm-up: allocations, lazy build, compilation
    fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def forward_and_backward(op, inputs, cotangents):
    """A callable running op forward only (no grad), and one running forward + backward to every input."""
    def forward():
        with torch.no_grad():
            op(*inputs)

    def both():
        outputs = op(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        torch.autograd.grad(outputs, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], cotangents)

    return forward, both


def composite_case(size, device):
    B, N, C, H, W = (int(x) for x in size.split("x"))
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.rand(*shape, generator=g).to(device).requires_grad_()
    theta = perturbation(B * N, (H, W), generator=g).view(B, N, 2, 3).to(device).requires_grad_()
    inputs = [make(B, N, C, H, W), make(B, N, 1, H, W), make(B, C, H, W), theta]
    cotangents = [torch.randn(B, C, H, W, device=device), torch.randn(B, N, 1, H, W, device=device)]
    forward_bytes = 4 * B * H * W * (N * C + N + 2 * C)  # the notes' model: layers, alphas, background in; image out
    ops = {"reference": composite_reference, "ext": lambda *x: composite(*x, impl="ext")}
    return ops, inputs, cotangents, forward_bytes


def heatmaps_case(device):
    B, K, D, S, M = GANSEG["B"], GANSEG["K"], GANSEG["D"], GANSEG["size"], GANSEG["margin"]
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.rand(B, K, 2, generator=g) * 2 - 1).to(device).requires_grad_(),
              (0.1 + 0.1 * torch.rand(B, K, generator=g)).to(device).requires_grad_(),
              torch.randn(B, K, D, generator=g).to(device).requires_grad_(), (S, S), M]
    side = S + 2 * M
    cotangents = [torch.randn(B, K, side, side, device=device), torch.randn(B, D, side, side, device=device)]
    ops = {"reference": part_heatmaps_reference, "ext": lambda *x: part_heatmaps(*x, impl="ext")}
    return ops, inputs, cotangents, None


def encoding_case(device):
    B, P, F, S, M = GANSEG["B"], GANSEG["P"], GANSEG["F"], GANSEG["size"], GANSEG["margin"]
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.rand(B, P, 2, generator=g) * 2 - 1).to(device).requires_grad_(),
              torch.randn(F, 2 * P, generator=g).to(device).requires_grad_(),
              torch.randn(F, generator=g).to(device).requires_grad_(), (S, S), M]
    side = S + 2 * M
    cotangents = [torch.randn(B, 2 * F, side, side, device=device)]
    ops = {"reference": positional_encoding_reference, "ext": lambda *x: positional_encoding(*x, impl="ext")}
    return ops, inputs, cotangents, None


def peak_bytes_per_s(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BYTES_PER_S.items() if key in name), None)


def bench_case(label, size, case, args, device):
    """Rows of the table for one op and size: forward, then forward + backward."""
    ops, inputs, cotangents, forward_bytes = case
    contenders = {"eager": ops["reference"]}
    if not args.skip_compile:
        contenders["compiled"] = torch.compile(ops["reference"], dynamic=False)
    contenders["ext"] = ops["ext"]
    results = {}
    for name, op in contenders.items():
        forward, both = forward_and_backward(op, inputs, cotangents)
        try:
            results[name] = (median_ms(forward, args.repeats, device), median_ms(both, args.repeats, device))
        except (NotImplementedError, AttributeError) as error:  # an op B kernel not wired up (yet)
            results[name] = "n/a (extension op missing)" if name == "ext" else f"n/a ({type(error).__name__})"
        except RuntimeError as error:
            results[name] = f"n/a ({str(error).splitlines()[0][:60]})"
        if name == "compiled":
            torch._dynamo.reset()  # one compiled graph per case: keeps the recompile limit out of the way
    peak = peak_bytes_per_s(device)
    rows = []
    for index, direction in enumerate(("forward", "forward+backward")):
        cells = [label, size, direction]
        for name in ("eager", "compiled", "ext"):
            value = results.get(name, "skipped")
            cells.append(f"{value[index]:.2f}" if isinstance(value, tuple) else value)
        ext = results["ext"]
        for name in ("eager", "compiled"):
            other = results.get(name)
            both_timed = isinstance(ext, tuple) and isinstance(other, tuple)
            cells.append(f"{other[index] / ext[index]:.1f}x" if both_timed else "-")
        if device.type == "cuda":
            timed = forward_bytes is not None and direction == "forward" and isinstance(ext, tuple)
            rate = forward_bytes / (ext[0] * 1e-3) if timed else None
            cells.append(f"{rate / 1e9:.0f}" if rate else "-")
            cells.append(f"{100 * rate / peak:.0f}%" if rate and peak else "-")
        rows.append(cells)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median reported)")
    parser.add_argument("--sizes", nargs="+", default=COMPOSITE_SIZES, metavar="BxNxCxHxW",
                        help=f"composite sizes (default: {' '.join(COMPOSITE_SIZES)})")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile(reference)")
    parser.add_argument("--skip-heatmaps", action="store_true", help="leave out op B")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for size in args.sizes:
        if len(size.split("x")) != 5 or not all(x.isdigit() for x in size.split("x")):
            parser.error(f"--sizes: {size!r} is not BxNxCxHxW, e.g. 32x1x3x128x128")

    header = ["op", "size", "pass", "eager ref (ms)", "compiled ref (ms)", "ext (ms)", "eager / ext", "compiled / ext"]
    if device.type == "cuda":
        header += ["ext fwd GB/s", "% of peak"]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"minseg ops benchmark on {name}{threads}, torch {torch.__version__}, median of {args.repeats}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    cases = [("composite", size, lambda size=size: composite_case(size, device)) for size in args.sizes]
    if not args.skip_heatmaps:
        side = GANSEG["size"] + 2 * GANSEG["margin"]
        cases += [("part_heatmaps", f"{GANSEG['B']}x{GANSEG['K']}x{GANSEG['D']}x{side}^2", lambda: heatmaps_case(device)),
                  ("positional_encoding", f"{GANSEG['B']}x{GANSEG['P']}x{GANSEG['F']}x{side}^2",
                   lambda: encoding_case(device))]
    for label, size, make in cases:
        for row in bench_case(label, size, make(), args, device):
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
