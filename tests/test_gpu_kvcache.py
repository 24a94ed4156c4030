"""attention_with_kvcache on the GPU (kvcache_cases.py): every sequence against float64 attention
over the keys it owns, the cache after the appends bit for bit; q tokens 1 to 17, batches of 1 to
32, cache lengths 0 to 65536 (different per sequence), contiguous, slotted and paged caches (page
sizes 1 to 256, pages shuffled), MHA, GQA and MQA, windows, both dtypes, head dims 64 to 256 and
72 (run padded on 96), forced split counts and the heuristic; split_size's batch invariance,
bitwise; a captured CUDA graph replayed with new lengths. Outputs land in NaN-poisoned pool
blocks. Skipped without a GPU (conftest.py)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from cupyflash.kvcache_cases import DecodeCase, compare_case, run_case

pytestmark = pytest.mark.gpu

_rng = np.random.default_rng(14)
BATCH32 = tuple(int(n) for n in _rng.integers(0, 5000, 32))

CASES = [
    DecodeCase("bfloat16", 128, 1, (0, 1, 255, 4097)),
    DecodeCase("float16", 64, 1, (65536,), heads_kv=1, group=8),  # MQA, one long sequence: many splits
    DecodeCase("bfloat16", 256, 2, (255, 4097, 1), heads_kv=4, group=1, num_splits=2),
    DecodeCase("float16", 128, 4, (1000, 3000, 17), page_size=16, seqlen_new=4),
    DecodeCase("float16", 128, 8, (4097, 4097, 4097), page_size=1, seqlen_new=1, num_splits=7),
    DecodeCase("bfloat16", 128, 16, BATCH32, page_size=64, seqlen_new=16),
    DecodeCase("bfloat16", 64, 17, (300, 2000, 0), page_size=256, seqlen_new=17, num_splits=64),
    DecodeCase("float16", 128, 1, (10, 20, 30), seqlen_new=1, slots=True),
    DecodeCase("bfloat16", 128, 4, (4097, 700), window=(128, 0)),
    DecodeCase("float16", 128, 4, (4097, 1), causal=False),
    DecodeCase("bfloat16", 128, 8, (3000, 100), causal=False, window=(64, 8), seqlen_new=3),
    DecodeCase("bfloat16", 128, 1, (4097, 65536), split_size=256),
    DecodeCase("float16", 128, 2, (1000, 1000), seqlen_new=2, host_length=True, capacity=3000),
    DecodeCase("bfloat16", 72, 3, (500, 33), group=2, seqlen_new=1),
    DecodeCase("float16", 192, 1, (4097,), group=8),
    DecodeCase("bfloat16", 128, 1, (65536,), num_splits=1),
    DecodeCase("float16", 128, 1, (0, 0)),  # no key anywhere: out 0, lse -inf
    DecodeCase("bfloat16", 128, 16, (4097, 1), group=8),  # 128 packed rows: two 64-row blocks
    DecodeCase("float16", 128, 2, (4097, 129), group=16, heads_kv=1, page_size=16),  # 32 packed rows
    DecodeCase("bfloat16", 256, 8, (2000, 50), group=4, page_size=64, seqlen_new=8),
    DecodeCase("float16", 128, 16, (5000, 64), group=1, heads_kv=8, seqlen_new=5, capacity=8192),  # append mid-slot
    # Each copy path of flash_decode.cu: full tiles over 2 pages (32 keys) and over one page
    # part (128 keys), at head dims whose last warp copies nothing (80 runs on 96, 192), and a
    # page size that is no power of two (48: the per-step lookup) on full tiles.
    DecodeCase("bfloat16", 80, 1, (4097, 1000, 31), page_size=32, seqlen_new=1),
    DecodeCase("float16", 192, 4, (3000, 129), group=2, page_size=128, seqlen_new=4),
    DecodeCase("bfloat16", 128, 1, (2000, 4097), page_size=48, num_splits=3),
    # Splits merged inside a cluster (2, 4, 8 on sm_90 and up): sequences of 0 and 1 keys (splits
    # that see nothing), 64 packed rows in 4 query tiles at head dim 256, MQA at 80 with a window.
    DecodeCase("bfloat16", 128, 1, (0, 1, 255, 4097), num_splits=8),
    DecodeCase("float16", 256, 16, (5000, 33), group=4, heads_kv=1, page_size=16, seqlen_new=16, num_splits=4),
    DecodeCase("bfloat16", 80, 8, (3000, 100), group=8, heads_kv=1, causal=False, window=(64, 8), num_splits=8),
    DecodeCase("float16", 128, 4, (4097, 700), window=(128, 0), seqlen_new=4, num_splits=4, slots=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_matches_the_reference(case: DecodeCase) -> None:
    host = case.inputs(seed=3)
    failures = [f"{case.id} {c.message()}" for c in compare_case(case, host, run_case(case, host, seed=3)) if not c.ok]
    assert not failures, "\n".join(failures)


def test_check_true_accepts_good_values_and_names_bad_ones() -> None:
    import cupy

    case = DecodeCase("float16", 64, 1, (10, 20), page_size=16, seqlen_new=1)
    host = case.inputs()
    results = run_case(case, host, check=True)
    assert all(c.ok for c in compare_case(case, host, results))
    from cupyflash import attention_with_kvcache

    q = cupy.asarray(host["q"])
    table = cupy.asarray(host["block_table"])
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] is 99"):
        attention_with_kvcache(q, results["k_cache"], results["v_cache"], cache_seqlens=cupy.asarray(
            np.array([3, 99], np.int32)), block_table=table, check=True)
    table[0, 0] = 1000
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] is 1000"):
        attention_with_kvcache(q, results["k_cache"], results["v_cache"], cache_seqlens=5, block_table=table,
                               check=True)


def test_split_size_gives_a_sequence_the_same_bits_in_any_batch() -> None:
    """split_size fixes where the keys are cut, so one sequence's result does not depend on the
    rest of the batch (whose size would change the heuristic's split count)."""
    import cupy

    batch = DecodeCase("bfloat16", 128, 1, (20000, 3, 65536), group=4, split_size=1024)
    alone = DecodeCase("bfloat16", 128, 1, (20000,), group=4, split_size=1024)
    host_batch = batch.inputs(seed=6)
    host_alone = {"q": host_batch["q"][:1], "k_logical": host_batch["k_logical"][:1, :alone.slot_keys],
                  "v_logical": host_batch["v_logical"][:1, :alone.slot_keys], "k_new": host_batch["k_new"][:1],
                  "v_new": host_batch["v_new"][:1], "lengths": host_batch["lengths"][:1]}
    one, many = run_case(alone, host_alone), run_case(batch, host_batch)
    a, b = cupy.asnumpy(one["out"][0]), cupy.asnumpy(many["out"][0])
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), "split_size: the batch changed the bits"
    assert np.array_equal(cupy.asnumpy(one["lse"][0]), cupy.asnumpy(many["lse"][0]))
    failures = [c.message() for c in compare_case(batch, host_batch, many) if not c.ok]
    assert not failures, "\n".join(failures)


def test_graph_replay_with_new_lengths_on_a_side_stream() -> None:
    """A decode step (append one token, attend) captured in a CUDA graph on a non-default stream
    and replayed after cache_seqlens and the new token change in place on the device: each replay
    equals a fresh call bit for bit, and the float64 reference."""
    import cupy

    from cupyflash import attention_with_kvcache

    case = DecodeCase("bfloat16", 128, 1, (3000, 17, 64), group=4, page_size=16, seqlen_new=1, capacity=4096)
    host = case.inputs(seed=9)
    k_cache = cupy.asarray(case.physical_cache(host["k_logical"], host, 9))
    v_cache = cupy.asarray(case.physical_cache(host["v_logical"], host, 10))
    q, k_new, v_new = (cupy.asarray(host[n]) for n in ("q", "k_new", "v_new"))
    lengths, table = cupy.asarray(host["lengths"]), cupy.asarray(host["block_table"])

    def step() -> tuple:
        return attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lengths, block_table=table,
                                      return_lse=True)

    stream = cupy.cuda.Stream(non_blocking=True)
    graph_pool = cupy.cuda.MemoryPool()
    with stream:
        step()  # compiles and makes the plan the capture runs
        stream.synchronize()
        with cupy.cuda.using_allocator(graph_pool.malloc):
            stream.begin_capture()
            try:
                captured = step()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.end_capture()
                raise
            graph = stream.end_capture()
        failures = []
        for n, new_lengths in enumerate(((3001, 18, 65), (4000, 0, 1000))):
            lengths[...] = cupy.asarray(np.array(new_lengths, np.int32))
            q[...] = cupy.asarray(case.inputs(seed=20 + n)["q"])
            graph.launch(stream)
            stream.synchronize()
            replayed = tuple(cupy.asnumpy(x) for x in captured)
            fresh = tuple(cupy.asnumpy(x) for x in step())  # writes the same new token again: same cache
            stream.synchronize()
            for name, a, b in zip(("out", "lse"), replayed, fresh):
                if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                    failures.append(f"replay {n}: {name} differs from a fresh call")
            moved = DecodeCase(case.dtype, case.head_dim, 1, new_lengths, group=4, page_size=16, seqlen_new=1,
                               capacity=4096)
            failures += [c.message() for c in compare_case(moved, _after(moved, cupy.asnumpy(q), k_cache, v_cache,
                                                                         host["block_table"]),
                                                           {"out": replayed[0], "lse": replayed[1]},
                                                           caches=False) if not c.ok]
    assert not failures, "\n".join(failures)


def _after(case: DecodeCase, q: np.ndarray, k_cache: object, v_cache: object, table: np.ndarray) -> dict:
    """The reference's inputs after a step: the caches read back in logical order, the token just
    appended at key lengths[b] taken as that sequence's new key."""
    import cupy

    host = {"q": q, "lengths": np.asarray(case.lengths, np.int32), "block_table": table}
    for name, cache in (("k", k_cache), ("v", v_cache)):
        physical = cupy.asnumpy(cache)
        logical = physical[table].reshape(case.batch, -1, *physical.shape[2:])
        host[f"{name}_logical"] = logical
        host[f"{name}_new"] = np.stack([logical[b, n:n + 1] for b, n in enumerate(case.lengths)])
    return host


# The K/V copies of flash_decode: by bulk tensor copies (opt-in, flash_decode.bulk_copies_enabled;
# sm_90, head dims 64 and 128, contiguous caches and pages of a power of two from 16 keys) and by
# cp.async (every other call, and every GPU before sm_90). Contiguous, slotted, pages of 16, 32, 64 and 256; a last tile cut short; a
# window; appends; 8 splits in a cluster; MQA with 16 query tokens (4 row warps).
COPY_CASES = [
    DecodeCase("bfloat16", 128, 1, (4097, 100, 1, 0)),
    DecodeCase("float16", 64, 2, (3000, 65), page_size=16, seqlen_new=2),
    DecodeCase("bfloat16", 128, 4, (1000, 31), page_size=32, group=2, num_splits=3),
    DecodeCase("float16", 128, 1, (4000, 130), page_size=64, seqlen_new=1, num_splits=8),
    DecodeCase("bfloat16", 64, 8, (2000, 300), page_size=256, causal=False, window=(100, 4)),
    DecodeCase("float16", 128, 3, (500, 5000, 64), seqlen_new=3, slots=True),
    DecodeCase("bfloat16", 128, 16, (4097, 77), group=4, heads_kv=1),
]


@pytest.fixture(params=[True, False], ids=["bulk", "cp_async"])
def copies(request):
    """flash_decode's K/V copies by bulk tensor copies where they can be (True) or by cp.async."""
    from cupyflash.kvcache import decode_copies

    with decode_copies(request.param):
        yield request.param


@pytest.mark.parametrize("case", COPY_CASES, ids=lambda c: c.id)
def test_nan_past_the_lengths_never_reaches_the_output(case: DecodeCase, copies: bool) -> None:
    """Every cache row past a sequence's keys holds NaN (a reused cache's stale rows might): the
    last tile's rows past seqlen_k must weigh exactly nothing, through either kind of copy."""
    host = case.inputs(seed=5)
    for name in ("k_logical", "v_logical"):
        for b, length in enumerate(case.lengths):
            host[name][b, length + case.seqlen_new:] = np.nan
    failures = [f"{case.id} {c.message()}" for c in compare_case(case, host, run_case(case, host, seed=5)) if not c.ok]
    assert not failures, "\n".join(failures)


def test_bulk_copies_run_where_they_can_and_give_the_cp_async_bits(monkeypatch) -> None:
    """On sm_90 the bulk-copy kernel runs each COPY_CASES call (its tensor maps are built), and
    its out and lse equal the cp.async kernel's bit for bit: the same products in the same order."""
    import cupy

    from cupyflash.device import device_limits
    from cupyflash.kernels import flash_decode
    from cupyflash.kvcache import decode_copies

    if device_limits(cupy.cuda.runtime.getDevice()).compute_capability < (9, 0):
        pytest.skip("bulk tensor copies need sm_90")
    built = []
    tensor_maps = flash_decode.tensor_maps
    monkeypatch.setattr(flash_decode, "tensor_maps", lambda *a: built.append(a[2]) or tensor_maps(*a))
    failures = []
    for case in COPY_CASES:
        host = case.inputs(seed=8)
        results = {}
        for bulk in (True, False):
            built.clear()
            with decode_copies(bulk):
                got = run_case(case, host, seed=8)
            results[bulk] = [cupy.asnumpy(got[n]).view(np.uint8) for n in ("out", "lse")]
            if bulk != bool(built):
                failures.append(f"{case.id}: bulk copies {'not ' if bulk else ''}built with bulk_copies_enabled={bulk}")
        for name, a, b in zip(("out", "lse"), results[True], results[False]):
            if not np.array_equal(a, b):
                failures.append(f"{case.id}: {name} differs between bulk and cp.async copies")
    assert not failures, "\n".join(failures)
