"""cupyflash.tma: which tensors a TMA descriptor can describe (on any machine), and the driver's
encoding of one (on a GPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cupyflash import tma
from cupyflash.device import gpu_count

needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")


def fake_array(shape: tuple[int, ...], strides_elements: tuple[int, ...], address: int = 1 << 20,
               dtype: str = "bfloat16") -> SimpleNamespace:
    """What describe() reads of a CuPy array, without a GPU."""
    return SimpleNamespace(dtype=dtype, ndim=len(shape), shape=shape, itemsize=2,
                           strides=tuple(2 * s for s in strides_elements), data=SimpleNamespace(ptr=address))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))


def test_a_contiguous_qkv_array_is_described_innermost_first() -> None:
    shape = (2, 1000, 8, 128)  # (batch, seqlen, heads, head_dim)
    tmap = tma.describe(fake_array(shape, contiguous_strides(shape)), box=(1, 64, 1, 64), swizzle=128)
    assert isinstance(tmap, tma.TiledMap), tmap
    assert tmap.dims == (128, 8, 1000, 2)
    assert tmap.strides == (2 * 128, 2 * 128 * 8, 2 * 128 * 8 * 1000)
    assert tmap.box == (64, 1, 64, 1) and tmap.box_bytes() == 64 * 64 * 2


@pytest.mark.parametrize("shape,strides,box,swizzle,address,reason", [
    ((4, 100, 36), (3600, 36, 1), (1, 64, 32), 0, 1 << 20, "strides"),            # 72-byte rows
    ((4, 100, 64), (6400, 64, 2), (1, 64, 64), 0, 1 << 20, "not contiguous"),     # every other element
    ((4, 100, 64), (6400, 64, 1), (1, 64, 64), 0, (1 << 20) + 2, "address"),      # a view 1 element in
    ((4, 100, 128), (12800, 128, 1), (1, 64, 128), 128, 1 << 20, "swizzle span"),  # 256-byte rows, 128-byte swizzle
    ((4, 100, 64), (6400, 64, 1), (1, 512, 64), 0, 1 << 20, "box"),               # more than 256 rows a copy
    ((4, 100, 64), (6400, 64, 1), (1, 64, 4), 0, 1 << 20, "inner extent"),        # 8-byte inner box
    ((4, 100, 64), (6400, 64, 1), (1, 64), 0, 1 << 20, "extents for an array"),
])
def test_what_tma_cannot_describe_says_why(shape, strides, box, swizzle, address, reason) -> None:
    result = tma.describe(fake_array(shape, strides, address), box=box, swizzle=swizzle)
    assert isinstance(result, str) and reason in result, result


def test_limits_of_rank_dtype_and_swizzle() -> None:
    good = tma.TiledMap("bfloat16", (128, 1000), (256,), (64, 64), 128)
    assert tma.why_not(good, 1 << 20) is None
    assert "rank" in tma.why_not(tma.TiledMap("bfloat16", (8,) * 6, (16,) * 5, (8,) * 6), 1 << 20)
    assert "dtype" in tma.why_not(tma.TiledMap("float32", (128, 4), (512,), (64, 4)), 1 << 20)
    assert "swizzle" in tma.why_not(tma.TiledMap("float16", (128, 4), (256,), (64, 4), 16), 1 << 20)
    assert "dims" in tma.why_not(tma.TiledMap("float16", (128, 0), (256,), (64, 1)), 1 << 20)
    # a box may reach past the tensor's end (those elements read as 0): attention's last tile
    assert tma.why_not(tma.TiledMap("float16", (128, 40), (256,), (64, 64), 128), 1 << 20) is None


def test_encode_refuses_before_calling_the_driver() -> None:
    with pytest.raises(ValueError, match="not a multiple of 16"):
        tma.encode(tma.TiledMap("bfloat16", (128, 1000), (256,), (64, 64), 128), (1 << 20) + 8)


@pytest.mark.skipif(gpu_count() > 0, reason="checks the message without a CUDA driver")
def test_encode_without_a_driver_says_so() -> None:
    tma._encoder.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="driver"):
            tma.encode(tma.TiledMap("bfloat16", (128, 1000), (256,), (64, 64), 128), 1 << 20)
    except AssertionError:
        pytest.skip("a CUDA driver library is installed on this machine without a GPU")
    finally:
        tma._encoder.cache_clear()


@pytest.mark.gpu
@needs_gpu
def test_the_driver_encodes_a_descriptor_for_a_cupy_array() -> None:
    import cupy

    q = cupy.zeros((2, 1000, 8, 128), dtype=cupy.float16)
    tmap = tma.describe(q, box=(1, 64, 1, 64), swizzle=128)
    assert isinstance(tmap, tma.TiledMap), tmap
    major = cupy.cuda.Device().compute_capability[0]
    if int(major) < 9:
        pytest.skip("tensor maps need compute capability 9.0 or newer")
    descriptor = tma.encode(tmap, int(q.data.ptr))
    assert len(descriptor) == tma.DESCRIPTOR_BYTES and any(descriptor)
    assert tma.encode(tmap, int(q.data.ptr)) == descriptor  # the same map, the same bytes


def test_an_axis_of_extent_one_gets_a_stride_the_driver_takes() -> None:
    # One head, whose stride CuPy may give as anything (here 0): it is only read at index 0.
    tmap = tma.describe(fake_array((2, 300, 1, 64), (300 * 64, 64, 0, 1)), box=(1, 128, 1, 64), swizzle=128)
    assert isinstance(tmap, tma.TiledMap), tmap
    assert tmap.dims == (64, 1, 300, 2)
    assert tmap.strides == (2 * 64, 2 * 64, 2 * 300 * 64)
    # a single batch entry with an odd stride, and a head dim of 8 with one row
    tmap = tma.describe(fake_array((1, 1, 4, 8), (7, 3, 8, 1)), box=(1, 1, 1, 8))
    assert isinstance(tmap, tma.TiledMap), tmap
    assert tmap.strides == (16, 64, 64)


def test_tensor_map_params_reencode_only_the_maps_whose_array_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupyflash import launch

    encoded = []

    def fake_encode(tmap: tma.TiledMap, address: int) -> bytes:
        encoded.append(address)
        return address.to_bytes(8, "little") * 16

    monkeypatch.setattr(tma, "encode", fake_encode)
    block = launch.ParamBlock("FwdParams", {}, [("q", "q"), ("k", "k")])
    tmap = tma.TiledMap("bfloat16", (64, 4), (128,), (64, 4), 128)
    params = launch.TensorMapParams(block, [("q", tmap), ("k", tmap)])
    assert params.address[1] % 64 == 0 and params.address[0] == block.record.ctypes.data
    arrays = {"q": SimpleNamespace(data=SimpleNamespace(ptr=1 << 20)), "k": SimpleNamespace(data=SimpleNamespace(ptr=2 << 20))}
    params.write_pointers(arrays)
    params.write_pointers(arrays)  # same arrays: nothing re-encoded
    assert encoded == [1 << 20, 2 << 20]
    arrays["k"] = SimpleNamespace(data=SimpleNamespace(ptr=3 << 20))
    params.write_pointers(arrays)
    assert encoded == [1 << 20, 2 << 20, 3 << 20]
    descriptors = params.descriptors.reshape(-1).view(np.uint64)
    assert descriptors[0] == 1 << 20 and descriptors[16] == 3 << 20
    assert block.words[block.array_slots[1][0]] == 3 << 20  # the block's own pointers follow too
    arrays["k"] = SimpleNamespace(data=SimpleNamespace(ptr=2 << 20))  # back to an address seen before
    params.write_pointers(arrays)
    assert encoded == [1 << 20, 2 << 20, 3 << 20] and descriptors[16] == 2 << 20  # remembered, not re-encoded
    for i in range(4, 4 + launch.TensorMapParams.REMEMBERED):  # more addresses than it remembers
        arrays["k"] = SimpleNamespace(data=SimpleNamespace(ptr=i << 20))
        params.write_pointers(arrays)
        assert descriptors[16] == i << 20
