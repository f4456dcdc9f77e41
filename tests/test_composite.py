"""Op A, minseg.ops.composite: the C++ kernel against the PyTorch reference (fp64 to ~1e-10, every gradient),
gradcheck and opcheck, properties of the composition (hypothesis), the perturbation sampler, error messages."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minseg.ops import _build
from minseg.ops.composite import composite, perturbation

PROPERTY = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Every test here exercises the kernel; skip only when it could not be built and CI does not require it."""
    if not _build.load_extension():  # raises instead under MINSEG_EXT_REQUIRED=1
        if os.environ.get(_build.ENV_REQUIRED):
            pytest.fail(f"extension required but not loaded: {_build.extension_status()['error']}")
        pytest.skip(f"the C++ extension is not available: {_build.extension_status()['error']}")
    composite(*make_inputs(1, 1, 1, 2, 2)[:3], impl="ext")  # registers the ops' autograd and fake kernels


@pytest.fixture
def two_threads():
    """With 2 threads the CPU backward gathers for B = 1 (the GPU's plan) and scatters per sample for B >= 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def make_inputs(B, N, C, H, W, warp=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = torch.randn(B, N, C, H, W, generator=g, dtype=dtype)
    alphas = torch.rand(B, N, 1, H, W, generator=g, dtype=dtype)
    background = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    theta = torch.eye(2, 3, dtype=dtype) + 0.1 * torch.randn(B, N, 2, 3, generator=g, dtype=dtype) if warp else None
    return layers, alphas, background, theta


def outputs_and_grads(impl, layers, alphas, background, theta, grad_image, grad_warped):
    inputs = [t.detach().clone().requires_grad_() for t in (layers, alphas, background, theta) if t is not None]
    image, warped = composite(*inputs[:3], inputs[3] if theta is not None else None, impl=impl)
    loss = sum((out * cot).sum() for out, cot in ((image, grad_image), (warped, grad_warped)) if cot is not None)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # the reference leaves unused inputs at None
    return [image, warped, *(torch.zeros_like(x) if dx is None else dx for x, dx in zip(inputs, grads))]


def assert_all_close(got, want, atol, rtol=0.0):
    for index, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f"tensor {index}: {m}")


# Thetas that stress the warp: zoom in (many outputs per source pixel), zoom out, rotation by 90 degrees, a shift
# outside the image, a singular map (a line), a constant map (every output reads one point).
SPECIAL_THETAS = {
    "zoom_in": [[0.3, 0.05, 0.1], [-0.04, 0.35, -0.2]],
    "zoom_out": [[2.5, 0.3, 0.0], [-0.2, 1.8, 0.1]],
    "rotate_90": [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]],
    "outside": [[1.0, 0.0, 2.5], [0.0, 1.0, -0.3]],
    "singular": [[0.7, 0.7, 0.1], [0.35, 0.35, -0.1]],
    "constant": [[0.0, 0.0, 0.23], [0.0, 0.0, -0.41]],
}


# C = 3 and C = 1 run the CPU's unrolled channel loops, other C the generic ones (C = 4: the alpha opens a second
# packet of 4 lanes in the CPU's interleaved layout; C = 17: five packets); H = 1 has no interior cell.
@pytest.mark.parametrize("shape", [(2, 1, 3, 8, 8), (2, 3, 3, 9, 7), (1, 4, 5, 6, 10), (2, 2, 17, 5, 6), (1, 2, 17, 6, 5),
                                   (3, 2, 1, 7, 8), (2, 1, 4, 6, 6), (2, 2, 3, 1, 5)])
@pytest.mark.parametrize("warp", [False, True])
@pytest.mark.parametrize("cotangents", ["both", "image_only", "warped_only"])
def test_kernel_matches_reference_fp64(shape, warp, cotangents, two_threads):
    layers, alphas, background, theta = make_inputs(*shape, warp=warp)
    g = torch.Generator().manual_seed(1)
    grad_image = torch.randn(background.shape, generator=g, dtype=torch.float64) if cotangents != "warped_only" else None
    grad_warped = torch.randn(alphas.shape, generator=g, dtype=torch.float64) if cotangents != "image_only" else None
    got = outputs_and_grads("ext", layers, alphas, background, theta, grad_image, grad_warped)
    want = outputs_and_grads("reference", layers, alphas, background, theta, grad_image, grad_warped)
    assert len(got) == (6 if warp else 5)
    assert_all_close(got, want, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SPECIAL_THETAS))
@pytest.mark.parametrize("batch", [1, 3])  # gather and scatter
def test_kernel_matches_reference_special_warps(name, batch, two_threads):
    layers, alphas, background, _ = make_inputs(batch, 2, 3, 9, 12)
    theta = torch.tensor(SPECIAL_THETAS[name], dtype=torch.float64).expand(batch, 2, 2, 3).clone()
    theta[:, 1] += 0.01  # a second, slightly different map
    g = torch.Generator().manual_seed(2)
    cotangents = torch.randn(background.shape, generator=g, dtype=torch.float64), torch.randn(alphas.shape, generator=g, dtype=torch.float64)
    got = outputs_and_grads("ext", layers, alphas, background, theta, *cotangents)
    want = outputs_and_grads("reference", layers, alphas, background, theta, *cotangents)
    assert_all_close(got, want, atol=1e-10)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_kernel_matches_reference_low_precision(dtype, tolerance):
    layers, alphas, background, theta = make_inputs(2, 2, 3, 16, 16, warp=True)
    g = torch.Generator().manual_seed(3)
    cotangents = torch.randn(background.shape, generator=g), torch.randn(alphas.shape, generator=g)
    low = [t.to(dtype) for t in (layers, alphas, background, theta, *cotangents)]
    got = outputs_and_grads("ext", *low)
    want = outputs_and_grads("reference", *[t.double() for t in low])  # the same inputs, computed in fp64
    assert all(t.dtype == dtype for t in got)
    # grad theta sums over the 256 pixels of a layer: allow that reduction's rounding
    assert_all_close([t.double() for t in got[:5]], want[:5], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got[5].double(), want[5], atol=16 * tolerance, rtol=tolerance)


def test_non_contiguous_inputs():
    layers, alphas, background, theta = make_inputs(2, 2, 3, 7, 9, warp=True)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (layers, alphas, background)]
    strided.append(theta.transpose(0, 1).contiguous().transpose(0, 1))
    assert not any(t.is_contiguous() for t in strided)
    cotangents = torch.randn(background.shape, dtype=torch.float64), torch.randn(alphas.shape, dtype=torch.float64)
    assert_all_close(outputs_and_grads("ext", *strided, *cotangents),
                     outputs_and_grads("reference", layers, alphas, background, theta, *cotangents), atol=1e-10)


@pytest.mark.parametrize("impl", ["ext", "reference"])
@pytest.mark.parametrize("warp", [False, True])
def test_gradcheck(impl, warp):  # theta = I + 0.1 randn keeps sample points off the pixel-centre kinks
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 2, 4, 5, warp=warp) if t is not None]
    assert torch.autograd.gradcheck(lambda *x: composite(*x, impl=impl), inputs)


@pytest.mark.parametrize("batch", [1, 3])  # gather and scatter
def test_backward_is_deterministic(batch, two_threads):
    layers, alphas, background, theta = make_inputs(batch, 2, 3, 12, 12, warp=True, dtype=torch.float32)
    cotangents = torch.randn(background.shape), torch.randn(alphas.shape)
    first = outputs_and_grads("ext", layers, alphas, background, theta, *cotangents)
    second = outputs_and_grads("ext", layers, alphas, background, theta, *cotangents)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


@pytest.mark.parametrize("warp", [False, True])
def test_opcheck(warp):
    layers, alphas, background, theta = make_inputs(2, 2, 3, 5, 6, warp=warp)
    args = [t.requires_grad_() if t is not None else None for t in (layers, alphas, background, theta)]
    torch.library.opcheck(torch.ops.minseg.composite.default, tuple(args))
    grads = torch.randn(background.shape, dtype=torch.float64), torch.randn(alphas.shape, dtype=torch.float64)
    saved = [t.detach() if t is not None else None for t in args]
    torch.library.opcheck(torch.ops.minseg.composite_backward.default, (*grads, *saved))
    torch.library.opcheck(torch.ops.minseg.composite_backward.default, (grads[0], None, *saved))


def test_double_backward_says_it_is_not_implemented():
    inputs = [t.requires_grad_() for t in make_inputs(1, 1, 2, 4, 4, warp=True)]
    image, _ = composite(*inputs, impl="ext")
    grads = torch.autograd.grad(image.square().sum(), inputs, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grads[0].sum().backward()


# ---- properties (the kernel under test; the reference is checked against it above) ----

shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(3, 9), st.integers(3, 9))


@PROPERTY
@given(shape=shapes, warp=st.booleans(), seed=st.integers(0, 2**16))
def test_alpha_one_gives_layer_alpha_zero_gives_background(shape, warp, seed):
    layers, alphas, background, theta = make_inputs(*shape, warp=warp, seed=seed)
    image, _ = composite(layers, torch.zeros_like(alphas), background, theta, impl="ext")
    assert torch.equal(image, background)
    opaque = alphas.clone()
    opaque[:, -1] = 1
    image, _ = composite(layers, opaque, background, None, impl="ext")
    torch.testing.assert_close(image, layers[:, -1], atol=1e-14, rtol=0)  # x + 1 (f - x) rounds to within an ulp of f


def warp_reference(planes, theta):  # (B, N, K, H, W) sampled independently with grid_sample
    B, N, K, H, W = planes.shape
    grid = F.affine_grid(theta.flatten(0, 1), [B * N, K, H, W], align_corners=False)
    return F.grid_sample(planes.flatten(0, 1), grid, align_corners=False).view(B, N, K, H, W)


@PROPERTY
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_output_inside_convex_hull_of_inputs(shape, seed):
    layers, alphas, background, theta = make_inputs(*shape, warp=True, seed=seed)
    image, _ = composite(layers, alphas, background, theta, impl="ext")
    candidates = torch.cat([background[:, None], warp_reference(layers, theta)], 1)  # (B, N + 1, C, H, W)
    assert (image >= candidates.amin(1) - 1e-12).all() and (image <= candidates.amax(1) + 1e-12).all()


@PROPERTY
@given(shape=shapes, dy=st.integers(-4, 4), dx=st.integers(-4, 4), seed=st.integers(0, 2**16))
def test_translating_all_inputs_translates_output(shape, dy, dx, seed):
    layers, alphas, background, _ = make_inputs(*shape, seed=seed)
    roll = lambda t: torch.roll(t, (dy, dx), (-2, -1))
    image, warped = composite(layers, alphas, background, impl="ext")
    rolled_image, rolled_warped = composite(roll(layers), roll(alphas), roll(background), impl="ext")
    assert torch.equal(rolled_image, roll(image)) and torch.equal(rolled_warped, roll(warped))


@PROPERTY
@given(shape=shapes, k=st.integers(1, 2), axis=st.sampled_from([-1, -2]), seed=st.integers(0, 2**16))
def test_whole_pixel_shift_of_theta_shifts_the_warped_layer(shape, k, axis, seed):
    layers, alphas, background, theta = make_inputs(*shape, warp=True, seed=seed)
    band = torch.ones_like(alphas)  # zero the layers near the border so that rolling them equals shifting them
    band.narrow(axis, 0, k + 1).zero_()
    band.narrow(axis, band.shape[axis] - k - 1, k + 1).zero_()
    layers, alphas = layers * band, alphas * band
    shifted = theta.clone()
    size = layers.shape[axis]
    shifted[..., 0 if axis == -1 else 1, 2] += 2 * k / size  # the sample points move k pixels along the axis
    image, warped = composite(layers, alphas, background, shifted, impl="ext")
    roll = lambda t: torch.roll(t, -k, axis)
    want_image, want_warped = composite(roll(layers), roll(alphas), background, theta, impl="ext")
    torch.testing.assert_close(image, want_image, atol=1e-10, rtol=0)
    torch.testing.assert_close(warped, want_warped, atol=1e-10, rtol=0)


@PROPERTY
@given(shape=shapes, warp=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_layers_equal_sequential_single_layer_calls(shape, warp, seed):
    layers, alphas, background, theta = make_inputs(*shape, warp=warp, seed=seed)
    image, warped = composite(layers, alphas, background, theta, impl="ext")
    step, steps = background, []
    for i in range(layers.shape[1]):
        step, warped_i = composite(layers[:, i:i + 1], alphas[:, i:i + 1], step,
                                   theta[:, i:i + 1] if warp else None, impl="ext")
        steps.append(warped_i)
    torch.testing.assert_close(image, step, atol=1e-12, rtol=0)
    torch.testing.assert_close(warped, torch.cat(steps, 1), atol=0, rtol=0)


# ---- perturbation ----

def test_perturbation_with_zero_ranges_is_identity():
    theta = perturbation(4, 16, log2_scale=(0, 0), rotation_deg=(0, 0), shift_px=(0, 0), dtype=torch.float64)
    assert theta.shape == (4, 1, 2, 3)
    assert torch.equal(theta, torch.eye(2, 3, dtype=torch.float64).expand(4, 1, 2, 3))
    layers, alphas, background, _ = make_inputs(4, 1, 3, 16, 16)
    image, warped = composite(layers, alphas, background, theta, impl="ext")
    want, _ = composite(layers, alphas, background, None, impl="ext")
    torch.testing.assert_close(image, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(warped, alphas, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [1, 3, -2])
def test_perturbation_shift_moves_a_lit_pixel_by_k(k):
    H = W = 16
    layers = torch.zeros(1, 1, 1, H, W, dtype=torch.float64)
    layers[..., 7, 5] = 1
    theta = perturbation(1, H, log2_scale=(0, 0), rotation_deg=(0, 0), shift_px=(k, k), dtype=torch.float64)
    image, _ = composite(layers, torch.ones_like(layers), torch.zeros(1, 1, H, W, dtype=torch.float64), theta, impl="ext")
    expected = torch.zeros(1, 1, H, W, dtype=torch.float64)
    expected[..., 7 + k, 5 + k] = 1
    torch.testing.assert_close(image, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("s, degrees, shift", [(-0.2, 15.0, 16.0), (0.0, -7.5, -3.0), (0.3, 90.0, 0.5)])
def test_perturbation_theta_inverts_the_forward_matrix(s, degrees, shift):
    size = 32
    theta = perturbation(2, size, log2_scale=(s, s), rotation_deg=(degrees, degrees), shift_px=(shift, shift),
                         dtype=torch.float64)
    a, t = math.radians(degrees), 2 * shift / size  # the shift in normalised units
    forward = torch.tensor([[2**s * math.cos(a), -(2**s) * math.sin(a), t],
                            [2**s * math.sin(a), 2**s * math.cos(a), t],
                            [0.0, 0.0, 1.0]], dtype=torch.float64)  # Translate @ Rotate @ Scale
    for sample in theta[:, 0]:
        inverse = torch.cat([sample, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
        torch.testing.assert_close(inverse @ forward, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)


# ---- errors ----

def test_errors_name_the_argument():
    layers, alphas, background, theta = make_inputs(2, 2, 3, 5, 5, warp=True)
    cases = [
        ((layers[0], alphas, background, theta), ValueError, "layers"),
        ((layers, alphas[:, :, :, :4], background, theta), ValueError, "alphas"),
        ((layers, alphas, background[:, :2], theta), ValueError, "background"),
        ((layers, alphas, background, theta[:, :1]), ValueError, "theta"),
        ((layers, alphas, background, theta * float("nan")), ValueError, "non-finite"),
        ((layers, alphas.float(), background, theta), TypeError, "alphas"),
        ((layers, alphas, background.to("meta"), theta), ValueError, "background"),
        ((layers, alphas.long(), background, theta), TypeError, "alphas"),
        ((layers, alphas, background, theta.tolist()), TypeError, "theta"),
    ]
    for args, error, name in cases:
        with pytest.raises(error, match=name):
            composite(*args)
    with pytest.raises(ValueError, match="impl"):
        composite(layers, alphas, background, theta, impl="cuda")


def test_direct_op_calls_check_their_inputs():
    layers, alphas, background, theta = make_inputs(2, 2, 3, 5, 5, warp=True)
    cases = [((layers[0], alphas, background, theta), "layers"), ((layers, alphas[:, :1], background, theta), "alphas"),
             ((layers, alphas, background.float(), theta), "background"), ((layers, alphas, background, theta[0]), "theta"),
             ((layers, alphas, background, theta * float("inf")), "non-finite")]
    for args, name in cases:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.minseg.composite(*args)
    with pytest.raises(RuntimeError, match="grad_image"):
        torch.ops.minseg.composite_backward(alphas, None, layers, alphas, background, theta)
