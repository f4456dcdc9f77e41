"""Op B (minseg/ops/heatmaps.py, csrc/heatmaps.*): GANSeg's part heatmaps and positional encoding.

The C++ kernels against the pure-PyTorch reference (fp64, outputs and every gradient), gradcheck and opcheck,
the pixel-centre convention and both maps written out by hand on a 3x3 grid, and hypothesis properties:
integer-shift equivariance (GANSeg appendix E) and the Gaussian's mass. Kernel tests skip only when the
extension failed to build and MINSEG_EXT_REQUIRED is unset.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minseg.ops import _build, heatmaps
from minseg.ops.heatmaps import (part_heatmaps, part_heatmaps_reference, pixel_grid, positional_encoding,
                                 positional_encoding_reference)

BOTH = ["reference", "ext"]


@pytest.fixture(scope="module")
def extension():
    if not _build.load_extension():
        reason = f"minseg ops extension not available: {_build.extension_status()['error']}"
        if _build._flag(_build.ENV_REQUIRED):
            pytest.fail(reason + f" ({_build.ENV_REQUIRED} is set)")
        pytest.skip(reason)
    heatmaps._register_ops()


@pytest.fixture(params=BOTH)
def impl(request):
    if request.param == "ext":
        request.getfixturevalue("extension")
    return request.param


def heat_inputs(B=2, K=3, D=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.rand(B, K, 2, generator=gen, dtype=dtype) * 2.4 - 1.2  # some outside the image
    sigmas = 0.15 + 0.5 * torch.rand(B, K, generator=gen, dtype=dtype)
    embeddings = torch.randn(B, K, D, generator=gen, dtype=dtype)
    return centers, sigmas, embeddings


def encoding_inputs(B=2, P=3, F=5, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(B, P, 2, generator=gen, dtype=dtype) * 2 - 1
    weight = torch.randn(F, 2 * P, generator=gen, dtype=dtype)
    bias = torch.randn(F, generator=gen, dtype=dtype)
    return points, weight, bias


def overlap(maps, t_x, t_y):
    """The part of maps (..., H, W) that a shift by (t_x, t_y) pixels keeps on the grid, at shifted positions."""
    H, W = maps.shape[-2:]
    return maps[..., max(t_y, 0):H + min(t_y, 0), max(t_x, 0):W + min(t_x, 0)]


def unshifted(maps, t_x, t_y):
    return overlap(maps, -t_x, -t_y)


# ------------------------------------------------------------------------------------------- convention by hand

def test_pixel_grid_3x3_margin_1_by_hand():
    grid = pixel_grid((3, 3), margin=1, dtype=torch.float64)  # (5, 5, 2)
    expected = torch.tensor([-4 / 3, -2 / 3, 0, 2 / 3, 4 / 3], dtype=torch.float64)
    assert grid.shape == (5, 5, 2)
    torch.testing.assert_close(grid[2, :, 0], expected)  # x varies along the width
    torch.testing.assert_close(grid[:, 2, 1], expected)  # y along the height
    assert bool((grid[:, :, 0] == grid[0, :, 0]).all()) and bool((grid[:, :, 1] == grid[:, :1, 1]).all())


def test_pixel_grid_non_square_by_hand():
    grid = pixel_grid((2, 4), margin=0, dtype=torch.float64)  # H = 2, W = 4
    torch.testing.assert_close(grid[0, :, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(grid[:, 0, 1], torch.tensor([-0.5, 0.5], dtype=torch.float64))


def test_heatmap_3x3_margin_1_by_hand(impl):
    centers = torch.tensor([[[0.0, 2 / 3]]], dtype=torch.float64)  # on pixel (row 3, col 2) of the 5x5 grid
    sigmas = torch.tensor([[0.5]], dtype=torch.float64)
    embeddings = torch.tensor([[[2.0, -1.0]]], dtype=torch.float64)
    heat, embedding_map = part_heatmaps(centers, sigmas, embeddings, (3, 3), margin=1, impl=impl)
    assert heat.shape == (1, 1, 5, 5) and embedding_map.shape == (1, 2, 5, 5)
    # (row, col) -> (x, y) = (-4/3 + 2/3 col, -4/3 + 2/3 row); heat = exp(-|p - c|^2 / 0.25)
    by_hand = {(3, 2): 1.0,                                     # p = (0, 2/3): on the centre
               (2, 3): math.exp(-(4 / 9 + 4 / 9) / 0.25),       # p = (2/3, 0)
               (0, 0): math.exp(-(16 / 9 + 4) / 0.25)}          # p = (-4/3, -4/3), in the margin
    for (row, col), value in by_hand.items():
        assert heat[0, 0, row, col].item() == pytest.approx(value, rel=1e-12)
        assert embedding_map[0, :, row, col].tolist() == pytest.approx([2 * value, -value], rel=1e-12)


def test_encoding_single_point_one_hot_by_hand(impl):
    point = torch.tensor([[[0.3, -0.2]]], dtype=torch.float64)  # P = 1
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # row 0 picks p_x - x_1, row 1 p_y - y_1
    bias = torch.tensor([0.25, -0.5], dtype=torch.float64)
    pe = positional_encoding(point, weight, bias, (3, 3), margin=1, impl=impl)  # (1, 4, 5, 5): sin 0, 1, cos 0, 1
    coords = [-4 / 3, -2 / 3, 0.0, 2 / 3, 4 / 3]
    for row, col in [(0, 4), (2, 1), (3, 3)]:
        x, y = coords[col], coords[row]
        phase_x, phase_y = math.pi * (x - 0.3 + 0.25), math.pi * (y + 0.2 - 0.5)
        expected = [math.sin(phase_x), math.sin(phase_y), math.cos(phase_x), math.cos(phase_y)]
        assert pe[0, :, row, col].tolist() == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------ kernel == reference

SHAPES = [dict(B=2, K=3, D=4, size=(5, 7), margin=2), dict(B=1, K=1, D=1, size=(1, 1), margin=0),
          dict(B=3, K=2, D=5, size=(6, 4), margin=0)]


@pytest.mark.parametrize("shape", SHAPES)
def test_heatmaps_kernel_matches_reference_fp64(extension, shape):
    inputs = [t.requires_grad_() for t in heat_inputs(shape["B"], shape["K"], shape["D"])]
    args = (shape["size"], shape["margin"])
    ref = part_heatmaps_reference(*inputs, *args)
    ext = part_heatmaps(*inputs, *args, impl="ext")
    cotangents = [torch.randn_like(t) for t in ref]
    for r, e in zip(ref, ext):
        torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-10)
    grads_ref = torch.autograd.grad(ref, inputs, cotangents)
    grads_ext = torch.autograd.grad(ext, inputs, cotangents)
    for name, r, e in zip(("centers", "sigmas", "embeddings"), grads_ref, grads_ext):
        torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("used", ["heat", "embedding_map"])
def test_heatmaps_gradients_with_one_output_unused(extension, used):
    inputs = [t.requires_grad_() for t in heat_inputs()]
    pick = 0 if used == "heat" else 1
    ref = part_heatmaps_reference(*inputs, (5, 6), 1)[pick]
    ext = part_heatmaps(*inputs, (5, 6), 1, impl="ext")[pick]
    cotangent = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, cotangent, allow_unused=True)
    grads_ext = torch.autograd.grad(ext, inputs, cotangent, allow_unused=True)
    for r, e in zip(grads_ref, grads_ext):
        torch.testing.assert_close(e, torch.zeros_like(e) if r is None else r, rtol=1e-10, atol=1e-10)


ENCODING_SHAPES = [dict(B=2, P=3, F=5, size=(5, 7), margin=2), dict(B=1, P=1, F=1, size=(1, 1), margin=0),
                   dict(B=3, P=2, F=4, size=(6, 4), margin=1)]


@pytest.mark.parametrize("shape", ENCODING_SHAPES)
def test_encoding_kernel_matches_reference_fp64(extension, shape):
    inputs = [t.requires_grad_() for t in encoding_inputs(shape["B"], shape["P"], shape["F"])]
    args = (shape["size"], shape["margin"])
    ref = positional_encoding_reference(*inputs, *args)
    ext = positional_encoding(*inputs, *args, impl="ext")
    torch.testing.assert_close(ext, ref, rtol=1e-10, atol=1e-10)
    cotangent = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, cotangent)
    grads_ext = torch.autograd.grad(ext, inputs, cotangent)
    for name, r, e in zip(("points", "weight", "bias"), grads_ref, grads_ext):
        torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_non_contiguous_inputs(extension):
    centers, sigmas, embeddings = heat_inputs(B=2, K=3, D=4)
    centers_t = centers.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (6, 1, 3)
    embeddings_t = embeddings.transpose(0, 1).contiguous().transpose(0, 1)
    for r, e in zip(part_heatmaps_reference(centers, sigmas, embeddings, (4, 5), 1),
                    part_heatmaps(centers_t, sigmas[:, :], embeddings_t, (4, 5), 1, impl="ext")):
        torch.testing.assert_close(e, r, rtol=1e-10, atol=1e-10)
    points, weight, bias = encoding_inputs()
    weight_t = weight.t().contiguous().t()
    torch.testing.assert_close(positional_encoding(points, weight_t, bias, (4, 5), 1, impl="ext"),
                               positional_encoding_reference(points, weight, bias, (4, 5), 1), rtol=1e-10, atol=1e-10)


def test_float32_close_to_reference(extension):
    centers, sigmas, embeddings = (t.float() for t in heat_inputs(B=2, K=4, D=8))
    for r, e in zip(part_heatmaps_reference(centers, sigmas, embeddings, (16, 16), 2),
                    part_heatmaps(centers, sigmas, embeddings, (16, 16), 2, impl="ext")):
        torch.testing.assert_close(e, r, rtol=1e-5, atol=1e-5)
    points, weight, bias = (t.float() for t in encoding_inputs(P=4, F=8))
    # phases reach ~10 pi here, and sin/cos inherit their fp32 rounding (~1e-6 each, differently summed)
    torch.testing.assert_close(positional_encoding(points, weight, bias, (16, 16), 2, impl="ext"),
                               positional_encoding_reference(points, weight, bias, (16, 16), 2), rtol=0, atol=1e-4)


def test_bfloat16_computes_in_float(extension):
    centers, sigmas, embeddings = (t.bfloat16() for t in heat_inputs(B=2, K=4, D=8))
    for r, e in zip(part_heatmaps_reference(centers.float(), sigmas.float(), embeddings.float(), (8, 8), 1),
                    part_heatmaps(centers, sigmas, embeddings, (8, 8), 1, impl="ext")):
        assert e.dtype == torch.bfloat16
        torch.testing.assert_close(e.float(), r, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the result


def test_backward_deterministic(extension):
    inputs = [t.float().requires_grad_() for t in heat_inputs(B=2, K=3, D=6)]
    heat, embedding_map = part_heatmaps(*inputs, (20, 24), 3, impl="ext")
    cotangents = (torch.randn_like(heat), torch.randn_like(embedding_map))
    first = torch.autograd.grad((heat, embedding_map), inputs, cotangents, retain_graph=True)
    second = torch.autograd.grad((heat, embedding_map), inputs, cotangents)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gradcheck_heatmaps(extension):
    inputs = [t.requires_grad_() for t in heat_inputs(B=2, K=2, D=3)]
    assert torch.autograd.gradcheck(lambda c, s, e: part_heatmaps(c, s, e, (3, 4), 1, impl="ext"), inputs)


def test_gradcheck_encoding(extension):
    inputs = [t.requires_grad_() for t in encoding_inputs(B=2, P=2, F=3)]
    assert torch.autograd.gradcheck(lambda p, w, b: positional_encoding(p, w, b, (3, 4), 1, impl="ext"), inputs)


def test_opcheck(extension):
    heat_args = [t.requires_grad_() for t in heat_inputs(B=2, K=2, D=3)]
    torch.library.opcheck(torch.ops.minseg.part_heatmaps.default, (*heat_args, 3, 4, 1))
    encoding_args = [t.requires_grad_() for t in encoding_inputs(B=2, P=2, F=3)]
    torch.library.opcheck(torch.ops.minseg.positional_encoding.default, (*encoding_args, 3, 4, 1))


def test_opcheck_backward_ops(extension):
    centers, sigmas, embeddings = heat_inputs(B=2, K=2, D=3)
    heat, embedding_map = part_heatmaps_reference(centers, sigmas, embeddings, (3, 4), 1)
    for grad_heat, grad_map in ((torch.randn_like(heat), torch.randn_like(embedding_map)),
                                (torch.randn_like(heat), None), (None, torch.randn_like(embedding_map))):
        torch.library.opcheck(torch.ops.minseg.part_heatmaps_backward.default,
                              (grad_heat, grad_map, heat, centers, sigmas, embeddings, 3, 4, 1))
    points, weight, bias = encoding_inputs(B=2, P=2, F=3)
    grad = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.minseg.positional_encoding_backward.default, (grad, points, weight, bias, 3, 4, 1))


# ---------------------------------------------------------------------------------------------------- properties

@settings(max_examples=15, deadline=None)
@given(H=st.integers(2, 7), W=st.integers(2, 7), margin=st.integers(1, 3), data=st.data())
def test_integer_shift_equivariance(extension, H, W, margin, data):
    t_x = data.draw(st.integers(-margin, margin), label="t_x")
    t_y = data.draw(st.integers(-margin, margin), label="t_y")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    shift = torch.tensor([2 * t_x / W, 2 * t_y / H], dtype=torch.float64)  # t pixels in [-1, 1] units
    centers, sigmas, embeddings = heat_inputs(B=2, K=3, D=2, seed=seed)
    points, weight, bias = encoding_inputs(B=2, P=2, F=3, seed=seed)
    heat, embedding_map = part_heatmaps(centers, sigmas, embeddings, (H, W), margin, impl="ext")
    heat_s, embedding_map_s = part_heatmaps(centers + shift, sigmas, embeddings, (H, W), margin, impl="ext")
    pe = positional_encoding(points, weight, bias, (H, W), margin, impl="ext")
    pe_s = positional_encoding(points + shift, weight, bias, (H, W), margin, impl="ext")
    for before, after in ((heat, heat_s), (embedding_map, embedding_map_s), (pe, pe_s)):
        torch.testing.assert_close(overlap(after, t_x, t_y), unshifted(before, t_x, t_y), rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(sigma_px=st.floats(1.5, 3.5), margin=st.integers(0, 3), data=st.data())
def test_heat_mass_is_pi_sigma_squared(extension, sigma_px, margin, data):
    H, W = 40, 48
    clearance = 5 * sigma_px  # pixels between the centre and the grid's border
    cx_px = data.draw(st.floats(clearance - margin, W + margin - clearance), label="centre x (pixels)")
    cy_px = data.draw(st.floats(clearance - margin, H + margin - clearance), label="centre y (pixels)")
    centers = torch.tensor([[[2 * cx_px / W - 1, 2 * cy_px / H - 1]]], dtype=torch.float64)
    sigmas = torch.tensor([[2 * sigma_px / W]], dtype=torch.float64)  # normalised along x, W > H: anisotropic in px
    heat, _ = part_heatmaps(centers, sigmas, torch.ones(1, 1, 1, dtype=torch.float64), (H, W), margin, impl="ext")
    sigma = sigmas.item()
    assert heat.sum().item() == pytest.approx(math.pi * sigma ** 2 * W * H / 4, rel=1e-6)


# --------------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("change, message", [
    (dict(centers=torch.zeros(2, 3)), "centers must be"),
    (dict(sigmas=torch.ones(2, 4)), "sigmas must be"),
    (dict(embeddings=torch.ones(2, 4, 5)), "embeddings must be"),
    (dict(sigmas=torch.ones(2, 3, dtype=torch.float64)), "sigmas must share"),
    (dict(embeddings=torch.ones(2, 3, 5, device="meta")), "embeddings must share"),  # another device
    (dict(size=(0, 4)), "size must be"),
    (dict(margin=-1), "margin must be"),
])
def test_heatmap_errors_name_the_argument(impl, change, message):
    args = dict(centers=torch.zeros(2, 3, 2), sigmas=torch.ones(2, 3), embeddings=torch.ones(2, 3, 5), size=(4, 4),
                margin=0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        part_heatmaps(**args, impl=impl)


@pytest.mark.parametrize("change, message", [
    (dict(points=torch.zeros(2, 3)), "points must be"),
    (dict(weight=torch.ones(4, 5)), "weight must be"),
    (dict(bias=torch.ones(3)), "bias must be"),
    (dict(points=torch.zeros(2, 3, 2, dtype=torch.int64)), "points must be a floating-point"),
    (dict(bias=torch.ones(4, device="meta")), "bias must share"),  # another device
    (dict(weight=torch.ones(4, 6, dtype=torch.float64)), "weight must share"),
])
def test_encoding_errors_name_the_argument(impl, change, message):
    args = dict(points=torch.zeros(2, 3, 2), weight=torch.ones(4, 6), bias=torch.ones(4), size=(4, 4), margin=0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        positional_encoding(**args, impl=impl)


def test_direct_op_calls_check_their_arguments(extension):
    ops = torch.ops.minseg
    with pytest.raises(RuntimeError, match="sigmas must be"):
        ops.part_heatmaps(torch.zeros(2, 3, 2), torch.ones(3), torch.ones(2, 3, 4), 4, 4, 0)
    with pytest.raises(RuntimeError, match="embeddings has dtype .* but centers"):
        ops.part_heatmaps(torch.zeros(2, 3, 2), torch.ones(2, 3), torch.ones(2, 3, 4, dtype=torch.float64), 4, 4, 0)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.positional_encoding(torch.zeros(2, 3, 2), torch.ones(4, 5), torch.ones(4), 4, 4, 0)
    with pytest.raises(RuntimeError, match="margin must be"):
        ops.positional_encoding(torch.zeros(2, 3, 2), torch.ones(4, 6), torch.ones(4), 4, 4, -1)
    with pytest.raises(RuntimeError, match="grad must be"):
        ops.positional_encoding_backward(torch.ones(2, 6, 4, 4), torch.zeros(2, 3, 2), torch.ones(4, 6), torch.ones(4),
                                         4, 4, 0)
