"""Op A: warp-and-composite of N RGBA layers over a background; the ILSGAN perturbation sampler and contrast jitter.

    x_0 = background;  x_i = T_i(layer_i) * T_i(alpha_i) + x_{i-1} * (1 - T_i(alpha_i));  image = x_N

T_i samples bilinearly with zero padding at the points of F.affine_grid(theta_i, align_corners=False), so
theta maps output to input coordinates (a perturbation A is passed as A^-1). N = 1 is the layered GAN's
perturbed composition (ILSGAN eq. 3), N > 1 the independence prior's recursive composition, theta None with
C = 64 GANSeg's feature-space blend. `composite_reference` is the ground truth; impl="auto" uses the fused
C++/CUDA kernel from csrc/composite.* when it is built, else the reference.
"""

import math

import torch
import torch.nn.functional as F

from minseg.ops import _build


def composite_reference(layers, alphas, background, theta=None):
    """Pure PyTorch: affine_grid + grid_sample per layer, then the blend. Same signature as `composite`."""
    B, N, C, H, W = layers.shape
    image, warped = background, []
    for i in range(N):
        layer, alpha = layers[:, i], alphas[:, i]  # (B, C, H, W), (B, 1, H, W)
        if theta is not None:
            low = theta.dtype in (torch.float16, torch.bfloat16)  # CPU affine_grid lacks half for 1-px sizes
            grid = F.affine_grid(theta[:, i].float() if low else theta[:, i], [B, 1, H, W], align_corners=False)
            grid = grid.to(theta.dtype)  # (B, H, W, 2)
            both = F.grid_sample(torch.cat([layer, alpha], 1), grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
            layer, alpha = both[:, :C], both[:, C:]
        image = image + alpha * (layer - image)
        warped.append(alpha)
    return image, torch.stack(warped, 1)  # (B, C, H, W), (B, N, 1, H, W)


def check_composite_inputs(layers, alphas, background, theta):
    """Clear errors naming the argument, before any kernel sees the tensors."""
    for name, t in (("layers", layers), ("alphas", alphas), ("background", background), ("theta", theta)):
        if name == "theta" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"composite: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"composite: {name} must be a floating-point tensor, got {t.dtype}")
    if layers.dim() != 5:
        raise ValueError(f"composite: layers must be (B, N, C, H, W), got shape {tuple(layers.shape)}")
    B, N, C, H, W = layers.shape
    if tuple(alphas.shape) != (B, N, 1, H, W):
        raise ValueError(f"composite: alphas must be (B, N, 1, H, W) = {(B, N, 1, H, W)}, got {tuple(alphas.shape)}")
    if tuple(background.shape) != (B, C, H, W):
        raise ValueError(f"composite: background must be (B, C, H, W) = {(B, C, H, W)}, got {tuple(background.shape)}")
    if theta is not None:
        if tuple(theta.shape) != (B, N, 2, 3):
            raise ValueError(f"composite: theta must be (B, N, 2, 3) = {(B, N, 2, 3)} or None, got {tuple(theta.shape)}")
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("composite: theta holds non-finite values (nan/inf); check the perturbation parameters")
    for name, t in (("alphas", alphas), ("background", background), ("theta", theta)):
        if t is None:
            continue
        if t.device != layers.device:
            raise ValueError(f"composite: {name} is on {t.device} but layers on {layers.device}; put all on one device")
        if t.dtype != layers.dtype:
            raise TypeError(f"composite: {name} has dtype {t.dtype} but layers {layers.dtype}; use one dtype")
    if min(B, N, C, H, W) == 0:
        raise ValueError(f"composite: empty input, layers shape {tuple(layers.shape)}")


def composite(layers, alphas, background, theta=None, impl="auto"):
    """Warp (optional) and alpha-composite N layers over a background.

    layers (B, N, C, H, W), alphas (B, N, 1, H, W), background (B, C, H, W), theta (B, N, 2, 3) or None
    -> image (B, C, H, W), warped_alphas (B, N, 1, H, W). impl: "auto" | "reference" | "ext".
    """
    check_composite_inputs(layers, alphas, background, theta)
    if _use_extension(impl, layers):
        return _composite_ext(layers, alphas, background, theta)
    return composite_reference(layers, alphas, background, theta)


def _use_extension(impl, tensor):
    if impl == "reference":
        return False
    if impl not in ("auto", "ext"):
        raise ValueError(f"impl must be 'auto', 'reference' or 'ext', got {impl!r}")
    loaded = _build.load_extension()
    if loaded:
        _register_python_side()
    ok = loaded and (tensor.device.type == "cpu" or (tensor.is_cuda and _build.extension_status()["cuda"]))
    if impl == "ext" and not ok:
        raise RuntimeError(f"impl='ext' asked for, but no extension kernel serves {tensor.device}: "
                           f"{_build.extension_status()['error'] or 'built without CUDA'}")
    return ok


def _composite_ext(layers, alphas, background, theta):
    return torch.ops.minseg.composite(layers, alphas, background, theta)


# ---- Python side of the C++ ops: fake kernels (torch.compile, opcheck) and autograd ----

def _composite_fake(layers, alphas, background, theta):
    return background.new_empty(background.shape), alphas.new_empty(alphas.shape)  # contiguous, as the kernels


def _composite_backward_fake(grad_image, grad_warped, layers, alphas, background, theta):
    grad_theta = theta.new_empty(theta.shape) if theta is not None else layers.new_empty(0)
    return layers.new_empty(layers.shape), alphas.new_empty(alphas.shape), background.new_empty(background.shape), grad_theta


def _composite_setup_context(ctx, inputs, output):
    layers, alphas, background, theta = inputs
    ctx.save_for_backward(layers, alphas, background, theta)
    ctx.set_materialize_grads(False)  # an unused warped_alphas passes None, not a tensor of zeros


def _composite_backward(ctx, grad_image, grad_warped):
    layers, alphas, background, theta = ctx.saved_tensors
    if grad_image is None:
        grad_image = torch.zeros_like(background)
    grad_layers, grad_alphas, grad_background, grad_theta = torch.ops.minseg.composite_backward(
        grad_image, grad_warped, layers, alphas, background, theta)
    return grad_layers, grad_alphas, grad_background, grad_theta if theta is not None else None


def _composite_double_backward(ctx, *grads):
    raise NotImplementedError("minseg.ops.composite: double backward is not implemented by the extension; "
                              "use impl='reference' for higher-order gradients")


_python_side_registered = False


def _register_python_side():
    """Register fake kernels and autograd for minseg::composite(_backward), once, after the library loaded."""
    global _python_side_registered
    if _python_side_registered:
        return
    torch.library.register_fake("minseg::composite")(_composite_fake)
    torch.library.register_fake("minseg::composite_backward")(_composite_backward_fake)
    torch.library.register_autograd("minseg::composite", _composite_backward, setup_context=_composite_setup_context)
    torch.library.register_autograd("minseg::composite_backward", _composite_double_backward)
    _python_side_registered = True


def perturbation(batch, size, log2_scale=(-0.2, 0.0), rotation_deg=(-15.0, 15.0), shift_px=(-16.0, 16.0),
                 generator=None, device="cpu", dtype=torch.float32):
    """theta = A^-1 for A = Translate(tx, ty) @ Rotate(alpha) @ Scale(2^s), per sample (ILSGAN appendix eq. 1-2).

    s ~ U(log2_scale), alpha ~ U(rotation_deg) degrees, tx, ty ~ U(shift_px) in output pixels; size = (H, W)
    or an int. Returns (batch, 1, 2, 3), ready for `composite(..., theta=...)` with N = 1.
    Rotation acts in normalised coordinates (exact for square images, which every method here uses).
    """
    H, W = (size, size) if isinstance(size, int) else size
    for name, (lo, hi) in (("log2_scale", log2_scale), ("rotation_deg", rotation_deg), ("shift_px", shift_px)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"perturbation: {name} must be a finite (lo, hi) with lo <= hi, got {(lo, hi)}")

    def uniform(lo, hi, n):
        return lo + (hi - lo) * torch.rand(batch, n, generator=generator, dtype=torch.float64)

    s = uniform(*log2_scale, 1)[:, 0]
    angle = uniform(*rotation_deg, 1)[:, 0] * math.pi / 180
    shift = uniform(*shift_px, 2) * torch.tensor([2.0 / W, 2.0 / H], dtype=torch.float64)  # pixels -> [-1, 1] units
    inv_scale, cos, sin = 2.0 ** -s, torch.cos(angle), torch.sin(angle)
    # A^-1 = Scale^-1 Rot^-1 Translate^-1: linear part R(-alpha) / 2^s, offset -(linear part) @ t
    linear = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) * inv_scale[:, None, None]
    offset = -(linear @ shift[:, :, None])  # (B, 2, 1)
    theta = torch.cat([linear, offset], -1)  # (B, 2, 3)
    return theta[:, None].to(device=device, dtype=dtype)


def contrast_jitter(images, factor_range, generator=None):
    """PerturbGAN's background contrast jitter: scale around the per-image mean, clamp to the original range."""
    lo, hi = factor_range
    k = lo + (hi - lo) * torch.rand(images.shape[0], 1, 1, 1, device=images.device, generator=generator)
    mean = images.mean((1, 2, 3), keepdim=True)
    return ((images - mean) * k + mean).clamp(images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True))
