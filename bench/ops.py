"""Benchmark of the fused ops (op A composite, op B part heatmaps / positional encoding; see
/work/shared/notes/kernels.md): eager reference vs torch.compile(reference) vs the C++/CUDA extension, forward
and forward+backward, as a markdown table of medians and ratios.

The contenders run side by side: every round times each of them once, in a rotating order, and a ratio is the
median over rounds of (other time / ext time) measured in the same round, so that load from other processes
(a shared CPU) hits all of them alike. Report ratios from one run, never absolute times from different runs.

On CUDA, the L2 cache is flushed (a write of max(64 MiB, 2 x L2) bytes) before every timed call, calls are timed
with CUDA events, and the ext's achieved bandwidth is reported against a byte model of the least traffic the op
needs (every input read once, every output written once; element size of --dtype):
    composite forward           reads layers, alphas, background; writes image, warped_alphas
                                (fp32, C = 3, N = 1: 44 B/pixel; the notes' 40 B leave out warped_alphas)
    composite forward+backward  the forward, plus reads grad_image, grad_warped, layers, alphas, background,
                                writes grad_layers, grad_alphas, grad_background (theta's bytes are negligible)
    part_heatmaps               writes heat and embedding_map (forward; fwd+bwd adds reading both cotangents
                                and heat once more)
    positional_encoding         writes the encoding (forward; fwd+bwd adds reading its cotangent)
and as a percentage of the card's peak DRAM bandwidth (from the device's memory clock and bus width, else a
table by name).

    python bench/ops.py [--device cpu|cuda] [--threads N] [--repeats N] [--sizes 32x1x3x64x64 ...]
                        [--dtype float32|bfloat16|float64] [--skip-compile] [--skip-heatmaps]
"""

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from minseg.ops import (composite, composite_reference, part_heatmaps, part_heatmaps_reference, perturbation,
                        positional_encoding, positional_encoding_reference)

COMPOSITE_SIZES = ["32x1x3x64x64", "32x1x3x128x128", "64x1x3x256x256", "32x8x3x64x64", "16x1x64x64x64"]
NO_WARP_CHANNELS = 64  # C = 64 composites run without theta: GANSeg's feature-space blend
GANSEG = dict(B=32, K=8, D=64, size=128, margin=10, P=8, F=32)  # op B at GANSeg's sizes: 128 + 2 * 10 px
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # fallback when the device reports no clock
CONTENDERS = ("eager", "compiled", "ext")


# ---- timing ----

class Timer:
    """Times one call: wall clock on CPU; CUDA events after an L2 flush on CUDA."""

    def __init__(self, device):
        self.device = device
        self.flush = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
            self.flush = torch.empty(max(64 * 2**20, 2 * l2), dtype=torch.uint8, device=device)

    def __call__(self, fn):
        if self.flush is None:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        self.flush.zero_()  # evict the inputs from L2: the op reads them from DRAM, as in a training step
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end)


def time_side_by_side(callables, repeats, timer):
    """{name: [ms per round]}: each round times every callable once, the order rotating between rounds."""
    names = list(callables)
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            times[name].append(timer(callables[name]))
    return times


def paired_ratio(other, ext):
    """Median over rounds of other / ext, each pair timed in the same round."""
    return statistics.median(o / e for o, e in zip(other, ext))


# ---- cases: (ops, inputs, cotangents, forward bytes, forward+backward bytes) ----

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


def composite_case(size, device, dtype):
    B, N, C, H, W = (int(x) for x in size.split("x"))
    g = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.rand(*shape, generator=g).to(device, dtype).requires_grad_()
    warp = C != NO_WARP_CHANNELS
    theta = perturbation(B * N, (H, W), generator=g).view(B, N, 2, 3).to(device, dtype).requires_grad_() if warp else None
    inputs = [make(B, N, C, H, W), make(B, N, 1, H, W), make(B, C, H, W), theta]
    cotangents = [torch.randn(B, C, H, W).to(device, dtype), torch.randn(B, N, 1, H, W).to(device, dtype)]
    pixels, size_of = B * H * W, torch.finfo(dtype).bits // 8
    forward_elements = (N * C + N + C) + (C + N)  # read layers, alphas, background; write image, warped alphas
    backward_elements = (C + N) + (N * C + N + C) + (N * C + N + C)  # read cotangents, inputs; write gradients
    ops = {"reference": composite_reference, "ext": lambda *x: composite(*x, impl="ext")}
    label = "composite" if warp else "composite (no warp)"
    return label, ops, inputs, cotangents, size_of * pixels * forward_elements, \
        size_of * pixels * (forward_elements + backward_elements)


def heatmaps_case(device, dtype):
    B, K, D, S, M = GANSEG["B"], GANSEG["K"], GANSEG["D"], GANSEG["size"], GANSEG["margin"]
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.rand(B, K, 2, generator=g) * 2 - 1).to(device, dtype).requires_grad_(),
              (0.1 + 0.1 * torch.rand(B, K, generator=g)).to(device, dtype).requires_grad_(),
              torch.randn(B, K, D, generator=g).to(device, dtype).requires_grad_(), (S, S), M]
    side = S + 2 * M
    cotangents = [torch.randn(B, K, side, side).to(device, dtype), torch.randn(B, D, side, side).to(device, dtype)]
    ops = {"reference": part_heatmaps_reference, "ext": lambda *x: part_heatmaps(*x, impl="ext")}
    plane_bytes = (torch.finfo(dtype).bits // 8) * B * side * side
    forward = plane_bytes * (K + D)  # write heat, embedding_map
    return "part_heatmaps", ops, inputs, cotangents, forward, forward + plane_bytes * (K + D + K)


def encoding_case(device, dtype):
    B, P, F, S, M = GANSEG["B"], GANSEG["P"], GANSEG["F"], GANSEG["size"], GANSEG["margin"]
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.rand(B, P, 2, generator=g) * 2 - 1).to(device, dtype).requires_grad_(),
              torch.randn(F, 2 * P, generator=g).to(device, dtype).requires_grad_(),
              torch.randn(F, generator=g).to(device, dtype).requires_grad_(), (S, S), M]
    side = S + 2 * M
    cotangents = [torch.randn(B, 2 * F, side, side).to(device, dtype)]
    ops = {"reference": positional_encoding_reference, "ext": lambda *x: positional_encoding(*x, impl="ext")}
    forward = (torch.finfo(dtype).bits // 8) * B * 2 * F * side * side  # write the encoding
    return "positional_encoding", ops, inputs, cotangents, forward, 2 * forward


def peak_bytes_per_s(device):
    """The card's DRAM peak: 2 (double data rate) x memory clock x bus width, else the table by name."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0) or 0, getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    return next((peak for key, peak in PEAK_BYTES_PER_S.items() if key in props.name), None)


# ---- one table row per op, size and pass ----

def bench_case(size, case, args, device, timer):
    label, ops, inputs, cotangents, forward_bytes, both_bytes = case
    contenders = {"eager": ops["reference"], "ext": ops["ext"]}
    if not args.skip_compile:
        contenders["compiled"] = torch.compile(ops["reference"], dynamic=False)
    calls, failed = {}, {}
    for name, op in contenders.items():
        forward, both = forward_and_backward(op, inputs, cotangents)
        try:
            for _ in range(2):  # warm-up: allocations, lazy build, compilation
                forward()
                both()
            calls[name] = (forward, both)
        except (NotImplementedError, AttributeError) as error:  # an op not wired up
            failed[name] = f"n/a ({type(error).__name__})"
        except RuntimeError as error:
            failed[name] = f"n/a ({str(error).splitlines()[0][:60]})"
    peak = peak_bytes_per_s(device)
    rows = []
    for index, (direction, model_bytes) in enumerate((("forward", forward_bytes), ("forward+backward", both_bytes))):
        times = time_side_by_side({name: pair[index] for name, pair in calls.items()}, args.repeats, timer)
        cells = [label, size, direction]
        for name in CONTENDERS:
            cells.append(f"{statistics.median(times[name]):.2f}" if name in times else failed.get(name, "skipped"))
        for name in ("eager", "compiled"):
            both_timed = name in times and "ext" in times
            cells.append(f"{paired_ratio(times[name], times['ext']):.2f}x" if both_timed else "-")
        if device.type == "cuda":
            rate = model_bytes / (statistics.median(times["ext"]) * 1e-3) if "ext" in times else None
            cells.append(f"{rate / 1e9:.0f}" if rate else "-")
            cells.append(f"{100 * rate / peak:.0f}%" if rate and peak else "-")
        rows.append(cells)
    if "compiled" in contenders:
        torch._dynamo.reset()  # one compiled graph per case: keeps the recompile limit out of the way
    return rows


def machine_description(device):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak = peak_bytes_per_s(device)
        return f"{props.name} (peak {peak / 1e12:.2f} TB/s)" if peak else props.name
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per measurement (medians reported)")
    parser.add_argument("--sizes", nargs="+", default=COMPOSITE_SIZES, metavar="BxNxCxHxW",
                        help=f"composite sizes; C = {NO_WARP_CHANNELS} runs without theta "
                             f"(default: {' '.join(COMPOSITE_SIZES)})")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile(reference)")
    parser.add_argument("--skip-heatmaps", action="store_true", help="leave out op B")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for size in args.sizes:
        if len(size.split("x")) != 5 or not all(x.isdigit() and int(x) > 0 for x in size.split("x")):
            parser.error(f"--sizes: {size!r} is not BxNxCxHxW, e.g. 32x1x3x128x128")
    timer = Timer(device)

    header = ["op", "size", "pass", "eager ref (ms)", "compiled ref (ms)", "ext (ms)", "eager / ext", "compiled / ext"]
    if device.type == "cuda":
        header += ["ext GB/s (byte model)", "% of peak"]
    print(f"minseg ops benchmark, {datetime.date.today().isoformat()}, {machine_description(device)}, "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"command: python bench/ops.py {' '.join(sys.argv[1:])}")
    print(f"medians of {args.repeats} side-by-side rounds; ratios: median over rounds of the per-round ratio\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    cases = [(size, lambda size=size: composite_case(size, device, dtype)) for size in args.sizes]
    if not args.skip_heatmaps:
        side = GANSEG["size"] + 2 * GANSEG["margin"]
        cases += [(f"{GANSEG['B']}x{GANSEG['K']}x{GANSEG['D']}x{side}^2", lambda: heatmaps_case(device, dtype)),
                  (f"{GANSEG['B']}x{GANSEG['P']}x{GANSEG['F']}x{side}^2", lambda: encoding_case(device, dtype))]
    for size, make in cases:
        for row in bench_case(size, make(), args, device, timer):
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
