"""Op B: GANSeg's Gaussian part heatmaps and point-relative positional encoding (GANSeg sec. 3, appendix E).

Coordinates are normalised to [-1, 1] across the image, x along the width: pixel j's centre sits at
(2j + 1) / W - 1, and the grid extends `margin` pixels past each border, so the output is
(H + 2 margin) x (W + 2 margin) and pixel j of the output is image pixel j - margin.

    heat_k(p)         = exp(-|p - x_k|^2 / sigma_k^2)
    embedding_map(p)  = sum_k heat_k(p) w_k
    PE(p)             = [sin(pi (Wt . [p - x_1, ..., p - x_P] + b)), cos(...)]   ([dx_1, dy_1, dx_2, dy_2, ...])

Only differences p - x appear, never p alone: translating every point by t translates every map by t.
`*_reference` are the ground truth; impl="auto" uses csrc/heatmaps.* when the extension is built, its ops
minseg::part_heatmaps / minseg::positional_encoding getting their autograd and fake kernels at the end of this file.
"""

import threading

import torch


def pixel_grid(size, margin=0, device="cpu", dtype=torch.float32):
    """Pixel-centre coordinates (H', W', 2) as (x, y) in the normalised convention above."""
    H, W = size
    cols = (2 * torch.arange(-margin, W + margin, device=device, dtype=dtype) + 1) / W - 1  # (W',)
    rows = (2 * torch.arange(-margin, H + margin, device=device, dtype=dtype) + 1) / H - 1  # (H',)
    return torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1)  # (H', W', 2)


def part_heatmaps_reference(centers, sigmas, embeddings, size, margin=0):
    grid = pixel_grid(size, margin, centers.device, centers.dtype)  # (H', W', 2)
    diff = grid[None, None] - centers[:, :, None, None, :]  # (B, K, H', W', 2)
    heat = torch.exp(-(diff * diff).sum(-1) / (sigmas * sigmas)[:, :, None, None])  # (B, K, H', W')
    embedding_map = torch.einsum("bkhw,bkd->bdhw", heat, embeddings)  # (B, D, H', W')
    return heat, embedding_map


def positional_encoding_reference(points, weight, bias, size, margin=0):
    B, P, _ = points.shape
    grid = pixel_grid(size, margin, points.device, points.dtype)  # (H', W', 2)
    diff = (grid[None, :, :, None, :] - points[:, None, None]).flatten(-2)  # (B, H', W', 2P)
    phase = torch.pi * (diff @ weight.t() + bias)  # (B, H', W', F)
    return torch.cat([torch.sin(phase), torch.cos(phase)], -1).permute(0, 3, 1, 2)  # (B, 2F, H', W')


def _check_size(size, margin, op):
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{op}: size must be (H, W) with positive ints, got {size!r}")
    if not (isinstance(margin, int) and margin >= 0):
        raise ValueError(f"{op}: margin must be an int >= 0, got {margin!r}")


def check_heatmap_inputs(centers, sigmas, embeddings, size, margin):
    _check_size(size, margin, "part_heatmaps")
    for name, t in (("centers", centers), ("sigmas", sigmas), ("embeddings", embeddings)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"part_heatmaps: {name} must be a floating-point torch.Tensor")
        if t.device != centers.device or t.dtype != centers.dtype:
            raise ValueError(f"part_heatmaps: {name} must share centers' device and dtype ({centers.device}, {centers.dtype})")
    if centers.dim() != 3 or centers.shape[-1] != 2:
        raise ValueError(f"part_heatmaps: centers must be (B, K, 2), got {tuple(centers.shape)}")
    B, K, _ = centers.shape
    if tuple(sigmas.shape) != (B, K):
        raise ValueError(f"part_heatmaps: sigmas must be (B, K) = {(B, K)}, got {tuple(sigmas.shape)}")
    if embeddings.dim() != 3 or tuple(embeddings.shape[:2]) != (B, K):
        raise ValueError(f"part_heatmaps: embeddings must be (B, K, D) with (B, K) = {(B, K)}, got {tuple(embeddings.shape)}")
    if min(B, K, embeddings.shape[2]) == 0:
        raise ValueError(f"part_heatmaps: empty input, centers {tuple(centers.shape)}, "
                         f"embeddings {tuple(embeddings.shape)}")


def check_encoding_inputs(points, weight, bias, size, margin):
    _check_size(size, margin, "positional_encoding")
    for name, t in (("points", points), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"positional_encoding: {name} must be a floating-point torch.Tensor")
        if t.device != points.device or t.dtype != points.dtype:
            raise ValueError(f"positional_encoding: {name} must share points' device and dtype ({points.device}, {points.dtype})")
    if points.dim() != 3 or points.shape[-1] != 2:
        raise ValueError(f"positional_encoding: points must be (B, P, 2), got {tuple(points.shape)}")
    P = points.shape[1]
    if weight.dim() != 2 or weight.shape[1] != 2 * P:
        raise ValueError(f"positional_encoding: weight must be (F, 2P) = (F, {2 * P}), got {tuple(weight.shape)}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"positional_encoding: bias must be (F,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if min(points.shape[0], P, weight.shape[0]) == 0:
        raise ValueError(f"positional_encoding: empty input, points {tuple(points.shape)}, "
                         f"weight {tuple(weight.shape)}")


def part_heatmaps(centers, sigmas, embeddings, size, margin=0, impl="auto"):
    """centers (B, K, 2), sigmas (B, K), embeddings (B, K, D) -> heat (B, K, H', W'), embedding_map (B, D, H', W')."""
    size = tuple(size) if isinstance(size, (tuple, list)) else size
    check_heatmap_inputs(centers, sigmas, embeddings, size, margin)
    if _use_extension(impl, centers):
        return _part_heatmaps_ext(centers, sigmas, embeddings, size, margin)
    return part_heatmaps_reference(centers, sigmas, embeddings, size, margin)


def positional_encoding(points, weight, bias, size, margin=0, impl="auto"):
    """points (B, P, 2), weight (F, 2P), bias (F,) -> (B, 2F, H', W'): sin channels then cos channels."""
    size = tuple(size) if isinstance(size, (tuple, list)) else size
    check_encoding_inputs(points, weight, bias, size, margin)
    if _use_extension(impl, points):
        return _positional_encoding_ext(points, weight, bias, size, margin)
    return positional_encoding_reference(points, weight, bias, size, margin)


def _use_extension(impl, tensor):
    from minseg.ops.composite import _use_extension as use
    if not use(impl, tensor):
        return False
    _register_ops()
    return True


def _part_heatmaps_ext(centers, sigmas, embeddings, size, margin):
    heat, embedding_map = torch.ops.minseg.part_heatmaps(centers, sigmas, embeddings, size[0], size[1], margin)
    return heat, embedding_map


def _positional_encoding_ext(points, weight, bias, size, margin):
    return torch.ops.minseg.positional_encoding(points, weight, bias, size[0], size[1], margin)


# Autograd and fake (shape-only) kernels for the C++ ops of csrc/heatmaps.cpp. The backward ops are registered
# there too (fake kernels here), so torch.compile and torch.library.opcheck see every op the forward and backward use.

def _part_heatmaps_fake(centers, sigmas, embeddings, height, width, margin):
    B, K, _ = centers.shape
    H, W = height + 2 * margin, width + 2 * margin
    return centers.new_empty(B, K, H, W), centers.new_empty(B, embeddings.shape[2], H, W)


def _part_heatmaps_backward_fake(grad_heat, grad_embedding_map, heat, centers, sigmas, embeddings, height, width,
                                 margin):
    return centers.new_empty(centers.shape), sigmas.new_empty(sigmas.shape), embeddings.new_empty(embeddings.shape)


def _part_heatmaps_setup(ctx, inputs, output):
    centers, sigmas, embeddings, height, width, margin = inputs
    ctx.save_for_backward(output[0], centers, sigmas, embeddings)
    ctx.size_margin = (height, width, margin)
    ctx.set_materialize_grads(False)  # an unused output passes None, not a tensor of zeros (B, D, H', W')


def _part_heatmaps_backward(ctx, grad_heat, grad_embedding_map):
    heat, centers, sigmas, embeddings = ctx.saved_tensors
    grads = torch.ops.minseg.part_heatmaps_backward(grad_heat, grad_embedding_map, heat, centers, sigmas, embeddings,
                                                    *ctx.size_margin)
    return *grads, None, None, None


def _positional_encoding_fake(points, weight, bias, height, width, margin):
    return points.new_empty(points.shape[0], 2 * weight.shape[0], height + 2 * margin, width + 2 * margin)


def _positional_encoding_backward_fake(grad, points, weight, bias, height, width, margin):
    return points.new_empty(points.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _positional_encoding_setup(ctx, inputs, output):
    points, weight, bias, height, width, margin = inputs
    ctx.save_for_backward(points, weight, bias)
    ctx.size_margin = (height, width, margin)


def _positional_encoding_backward(ctx, grad):
    points, weight, bias = ctx.saved_tensors
    grads = torch.ops.minseg.positional_encoding_backward(grad, points, weight, bias, *ctx.size_margin)
    return *grads, None, None, None


_registered = False
_register_lock = threading.Lock()


def _register_ops():
    """Attach the Python side to the loaded C++ ops, once per process (call only after the extension loaded)."""
    global _registered
    with _register_lock:
        if not _registered:
            _register_fake_and_autograd()
            _registered = True


def _register_fake_and_autograd():
    lib = torch.library
    lib.register_fake("minseg::part_heatmaps")(_part_heatmaps_fake)
    lib.register_fake("minseg::part_heatmaps_backward")(_part_heatmaps_backward_fake)
    lib.register_fake("minseg::positional_encoding")(_positional_encoding_fake)
    lib.register_fake("minseg::positional_encoding_backward")(_positional_encoding_backward_fake)
    lib.register_autograd("minseg::part_heatmaps", _part_heatmaps_backward, setup_context=_part_heatmaps_setup)
    lib.register_autograd("minseg::positional_encoding", _positional_encoding_backward,
                          setup_context=_positional_encoding_setup)
