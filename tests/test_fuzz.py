"""Fuzzing the public entry points with hypothesis: random shapes, dtypes, strides and values thrown at the ops
(composite, part_heatmaps, positional_encoding, forward and backward, both implementations), random arguments and
folders of random / corrupt / odd-mode picture files thrown at the loaders (load_dataset on image folders and CUB
layouts). Every call must return well-formed results or raise a clean ValueError / TypeError / FileNotFoundError:
never another exception, a crash of the C++ kernels, or a hang (each example has a deadline).
MINSEG_FUZZ_EXAMPLES=2000 runs more examples per test; --hypothesis-show-statistics shows how many ran vs erred."""
import io
import math
import os
import random
import tempfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from PIL import Image

from cub_fixture import write_cub_layout
from minseg.data import SegmentationSet, load_dataset
from minseg.ops import composite, part_heatmaps, positional_encoding

CLEAN = (ValueError, TypeError, FileNotFoundError)
EXAMPLES = int(os.environ.get("MINSEG_FUZZ_EXAMPLES", 60))  # e.g. 2000 for a longer hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
          torch.complex64]
MAIN_DTYPES = st.sampled_from([torch.float32] * 4 + [torch.float64] * 2 + DTYPES)  # mostly what the kernels take
DIMS = st.sampled_from([1, 2, 3] * 6 + [0])  # sizes of tensor dimensions, sometimes empty
SPECIAL = [0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, -1e30, math.nan, math.inf, -math.inf]
NOT_TENSORS = [None, 3, 2.5, [1.0, 2.0], "tensor", np.zeros((2, 2), dtype=np.float32)]


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def tensors(draw, shape, dtype):
    """A tensor of `shape` and `dtype`: random or special values, contiguous, transposed, strided or expanded."""
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.randn(shape, generator=gen) * draw(st.sampled_from([1.0, 1e-3, 1e4]))
    if draw(st.sampled_from([False, False, False, True])):  # sprinkle special values
        special = torch.tensor(draw(st.sampled_from(SPECIAL)))
        values = torch.where(torch.rand(shape, generator=gen) < 0.3, special, values)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    if layout == "transposed" and len(shape) >= 2:
        values = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and len(shape) >= 1:
        values = torch.stack([values, values], -1)[..., 0]  # every other element of a wider buffer
    elif layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        values = values[:1].expand(shape)  # stride 0 along the batch
    return values.to(dtype)


@st.composite
def arguments(draw, shapes, dtype):
    """Tensors of the intended shapes and `dtype`; a third of the time one of them gets a wrong shape, another dtype, or
    is no tensor at all (so that many examples reach the kernels, the others the input checks)."""
    out = [draw(tensors(shape, dtype)) for shape in shapes]
    broken = draw(st.sampled_from([None] * 2 * len(shapes) + list(range(len(shapes)))))
    if broken is not None:
        how = draw(st.sampled_from(["shape", "dtype", "not a tensor"]))
        if how == "not a tensor":
            out[broken] = draw(st.sampled_from(NOT_TENSORS))
        elif how == "shape":
            out[broken] = draw(tensors(draw(st.lists(st.integers(0, 4), max_size=6)), dtype))
        else:
            out[broken] = draw(tensors(shapes[broken], draw(st.sampled_from(DTYPES))))
    return out


def run_clean(fn, *args, backward=False, **kwargs):
    """Call fn; a clean error is fine. Returns the outputs (backward run through them if asked), or None."""
    try:
        out = fn(*args, **kwargs)
    except CLEAN as err:
        event(f"clean {type(err).__name__}")  # `pytest --hypothesis-show-statistics` shows the mix
        return None
    event("ran")
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert isinstance(o, torch.Tensor)
    if backward and all(o.is_floating_point() for o in outs):
        total = sum(o.sum() for o in outs if o.requires_grad)
        if isinstance(total, torch.Tensor):
            total.backward()
    return outs


def grad_leaves(args, wanted):
    if not wanted:
        return args
    return [a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.float64)
            else a for a in args]


@FUZZ
@given(st.data())
def test_composite_fuzz(data):
    B, N, C, H, W = (data.draw(DIMS) for _ in range(5))
    dtype = data.draw(MAIN_DTYPES)
    with_theta = data.draw(st.booleans())
    shapes = [(B, N, C, H, W), (B, N, 1, H, W), (B, C, H, W)] + [(B, N, 2, 3)] * with_theta
    layers, alphas, background, *theta = data.draw(arguments(shapes, dtype))
    theta = theta[0] if theta else None
    backward = data.draw(st.booleans())
    impl = data.draw(st.sampled_from(["auto", "auto", "reference", "bogus"]))
    layers, alphas, background, theta = grad_leaves([layers, alphas, background, theta], backward)
    outs = run_clean(composite, layers, alphas, background, theta, impl=impl, backward=backward)
    if outs is not None:
        image, warped = outs
        assert image.shape == background.shape and warped.shape == alphas.shape
        inputs = [t.detach() if t is not None else t for t in (layers, alphas, background, theta)]
        moderate = all(t is None or bool((t.abs() < 1e4).all()) for t in inputs)  # finite, no overflow
        if impl == "auto" and layers.dtype in (torch.float32, torch.float64) and moderate:
            ref = composite(*inputs, impl="reference")  # the kernel agrees with the reference
            torch.testing.assert_close(image.detach(), ref[0], atol=1e-4, rtol=1e-4)


SIZES = st.sampled_from([(1, 1), (2, 3), (4, 4), (5, 2), (6, 6), [3, 4]] * 3
                        + [(0, 3), (-1, 2), (2.5, 3), "ab", (3,), None, (3, 4, 5)])
MARGINS = st.sampled_from([0, 0, 1, 2, 3] * 3 + [-1, 1.5, None, "2"])


@FUZZ
@given(st.data())
def test_part_heatmaps_fuzz(data):
    B, K, D = (data.draw(DIMS) for _ in range(3))
    dtype = data.draw(MAIN_DTYPES)
    backward = data.draw(st.booleans())
    args = grad_leaves(data.draw(arguments([(B, K, 2), (B, K), (B, K, D)], dtype)), backward)
    size, margin = data.draw(SIZES), data.draw(MARGINS)
    outs = run_clean(part_heatmaps, *args, size, margin, impl=data.draw(st.sampled_from(["auto", "reference"])),
                     backward=backward)
    if outs is not None:
        (B, K, _), D = args[0].shape, args[2].shape[-1]
        heat, embedding_map = outs
        H, W = size
        assert heat.shape == (B, K, H + 2 * margin, W + 2 * margin) and embedding_map.shape[:2] == (B, D)


@FUZZ
@given(st.data())
def test_positional_encoding_fuzz(data):
    B, P, F = (data.draw(DIMS) for _ in range(3))
    dtype = data.draw(MAIN_DTYPES)
    backward = data.draw(st.booleans())
    args = grad_leaves(data.draw(arguments([(B, P, 2), (F, 2 * P), (F,)], dtype)), backward)
    size, margin = data.draw(SIZES), data.draw(MARGINS)
    outs = run_clean(positional_encoding, *args, size, margin, impl=data.draw(st.sampled_from(["auto", "reference"])),
                     backward=backward)
    if outs is not None:
        B, F, (H, W) = args[0].shape[0], args[1].shape[0], size
        assert outs[0].shape == (B, 2 * F, H + 2 * margin, W + 2 * margin)


# ------------------------------------------------------------------------------------------------- loaders

MODES = ["RGB", "L", "RGBA", "P", "1", "LA", "I;16", "I", "F", "CMYK"]


def picture_bytes(rng, mode, width, height):
    """A picture in `mode`, encoded in a format that can hold it."""
    array = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert("RGB" if mode in ("I;16", "I", "F") else mode)
    if mode in ("I;16", "I", "F"):
        image = image.convert("L").convert(mode)
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, rng.choice(["PNG", "BMP", "WEBP"]) if mode == "RGB"
                                                          else "PNG")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def random_file(rng, width, height):
    kind = rng.choice(["picture"] * 4 + ["garbage", "empty", "truncated"])
    if kind == "garbage":
        return rng.bytes(int(rng.integers(1, 300)))
    if kind == "empty":
        return b""
    data = picture_bytes(rng, str(rng.choice(MODES)), width, height)
    return data[:int(rng.integers(8, max(9, len(data) - 1)))] if kind == "truncated" else data


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), masks=st.sampled_from(["none", "some", "all"]),
       size=st.sampled_from([8, 16] * 8 + [3, 0, -1, 7.5, "16", None, True]),
       protocol=st.sampled_from([None, "P2", "P4", "P5", "box"] * 3 + ["P9", 3]),
       split=st.sampled_from(["all", "train", "fold0-train", "fold4-test"] * 3 + ["fold5-test", "", None]),
       limit=st.sampled_from([None, None, 0, 1, 3, 3.0] * 2 + [-1, 2.5]))
def test_folder_loader_fuzz(seed, n, masks, size, protocol, split, limit):
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        if masks != "none":
            (root / "masks").mkdir()
        for i in range(n):
            width, height = (int(v) for v in rng.integers(1, 24, 2))
            ext = rng.choice([".png", ".jpg", ".jpeg", ".bmp", ".webp", ".PNG", ".txt"])
            (root / "images" / f"p{i}{ext}").write_bytes(random_file(rng, width, height))
            if masks == "all" or (masks == "some" and rng.random() < 0.7):
                if rng.random() < 0.7:  # a proper mask of the same size, in some mode
                    mask = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
                    mask = mask.convert(str(rng.choice(["L", "1", "RGB", "I;16", "P"])))
                    buffer = io.BytesIO()
                    mask.save(buffer, "PNG")
                    (root / "masks" / f"p{i}.png").write_bytes(buffer.getvalue())
                else:  # another size, corrupt, empty, truncated
                    (root / "masks" / f"p{i}.png").write_bytes(random_file(rng, width + 1, height))
        try:
            ds = load_dataset("folder", split=split, size=size, root=str(root), protocol=protocol, limit=limit)
        except CLEAN as err:
            event(f"clean {type(err).__name__}")
            return
        event(f"loaded, {len(ds.skipped)} skipped")
        assert isinstance(ds, SegmentationSet) and len(ds) + len(ds.skipped) <= n
        assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, size, size)
        if ds.masks is not None:
            assert ds.masks.shape == (len(ds), 1, size, size) and (len(ds) == 0 or int(ds.masks.max()) <= 1)


CUB_FILES = ["images.txt", "bounding_boxes.txt", "image_class_labels.txt", "train_val_test_split.txt",
             "parts/part_locs.txt"]
GARBAGE_LINES = ["1", "1 2", "x y z", "1 nan nan nan nan", "1 1e300 1e300 1e300 1e300", "-5 1 2 3 4",
                 "99999999999 1 1 1 1", "1 -1 -1 -1 -1", "2 0 0 0 0", "1 1 1 1 1 1", "\x00\x01", "1 a/b.jpg",
                 "3 sub/../x.jpg", "1 inf 0 0 0", "0 0", "1 3"]


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), target=st.sampled_from(CUB_FILES + ["delete"]),
       lines=st.lists(st.sampled_from(GARBAGE_LINES), min_size=0, max_size=4),
       split=st.sampled_from(["train", "test", "val", "all", "nope"]), protocol=st.sampled_from([None, "P4", "box"]))
def test_cub_loader_fuzz(seed, target, lines, split, protocol):
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i in range(3):
            image = Image.new("RGB", (20, 16), (rng.randrange(256), 0, 0))
            mask = Image.new("L", (20, 16), 255)
            entries.append(dict(path=f"001.Bird/b{i}.jpg", box=(2, 2, 10, 8), label=1, split=i, image=image,
                                mask=mask if rng.random() < 0.8 else None))
        root = write_cub_layout(tmp, entries)
        path = root / "CUB_200_2011" / (CUB_FILES[rng.randrange(len(CUB_FILES))] if target == "delete" else target)
        if target == "delete":
            path.unlink()
        else:
            text = path.read_text().splitlines()
            for line in lines:
                text.insert(rng.randrange(len(text) + 1), line)
            path.write_text("\n".join(text) + "\n")
        try:
            ds = load_dataset("cub", split=split, size=16, root=tmp, protocol=protocol)
        except CLEAN as err:
            event(f"clean {type(err).__name__}")
            return
        event("loaded")
        assert isinstance(ds, SegmentationSet) and ds.images.shape[1:] == (3, 16, 16)
        assert ds.keypoints.shape == (len(ds), 15, 3)


def test_loader_argument_and_content_errors(tmp_path):
    """The explicit messages behind the fuzzing: bad arguments, a folder of nothing readable, a corrupt CUB id."""
    for kwargs, message in [(dict(size=4), "size must be an int >= 8"), (dict(size="64"), "size must be"),
                            (dict(limit=-1), "limit must be"), (dict(limit=1.5), "limit must be"),
                            (dict(split=None), "split must be"), (dict(protocol="P9"), "unknown protocol")]:
        with pytest.raises(ValueError, match=message):
            load_dataset("shapes", **{"split": "test", **kwargs})
    with pytest.raises(TypeError, match="root must be a folder path"):
        load_dataset("folder", root=3)
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"not a picture")
    with pytest.raises(ValueError, match="none of the 2 picture"):
        load_dataset("folder", root=tmp_path)
    root = write_cub_layout(tmp_path / "cub", [dict(path="001.B/a.jpg", box=(1, 1, 4, 4), label=1, split=0,
                                                     image=Image.new("RGB", (8, 8)), mask=Image.new("L", (8, 8)))])
    (root / "CUB_200_2011" / "parts" / "part_locs.txt").write_text("99999999999 1 1 1 1\n")
    with pytest.raises(ValueError, match=r"part_locs.txt line 1: expected '<id>' \(an integer 1..10000000\)"):
        load_dataset("cub", root=root, size=16)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(load_dataset("shapes", "test", size=16, limit=2).sampler(0))
