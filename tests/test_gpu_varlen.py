"""attention_varlen and attention_varlen_backward on the GPU: packed batches of 1, 3 and 17
sequences whose lengths mix 0, 1, 17, 113, 1023 and 4097 (queries and keys of one sequence
differing), causal and not, sliding windows, GQA 1 and 4, fp16 and bf16, head dims 40, 64, 72,
128 and 256, seqused_k and keys that no sequence owns.

- Each sequence's part of the results is compared with the float64 reference on that sequence
  alone (the tolerance rule), and with the dense call on that sequence alone: the same kernels on
  the same data, so the two must agree to two units in the last place.
- Outputs come from NaN-poisoned memory: a poisoned pool (validation.poison_pool) for the
  comparisons, and the guard allocator (guarded_memory.py: every allocation fresh, 0xFF-filled,
  with guard bytes on both sides) for the tests that every row of every sequence is written, that
  dk and dv are exactly 0 at keys no sequence uses, and that nothing is written outside the buffers.
- The deterministic backward is bitwise repeatable; a forward and a backward captured in a CUDA
  graph replay to what a fresh call gives, after the inputs (and the sequence lengths) change in place.

The cases and the per-sequence references are cupyflash.packed_cases' PackedCase helpers, which
the memory-safety sweep (test_gpu_guard.py, scripts/sanitize.py) and `cupyflash validate` run too.
Skipped without a GPU (conftest.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest

from cupyflash import plan
from cupyflash.packed_cases import (GRADIENTS, PackedCase, compare_varlen, varlen_arguments, varlen_calls,
                                    varlen_inputs, varlen_references, varlen_to_device)
from cupyflash.tolerance import FLOOR_EPS

from .guarded_memory import GuardedAllocator

pytestmark = pytest.mark.gpu

# 17 sequences: every length of the issue, one 4097 x 4097; causal rows that see nothing
# (113 queries x 0 keys, 17 queries x 1 key), sequences with no query or no key.
Q17 = (1, 17, 0, 113, 1023, 17, 1, 4097, 113, 0, 17, 1, 1023, 113, 1, 17, 0)
K17 = (1, 113, 17, 0, 1023, 1, 17, 4097, 1023, 113, 17, 0, 113, 1023, 1, 113, 0)
# 17 sequences without 4097, with seqused_k (0 of 1, 1 of 113, ...) and 37 spare keys.
Q17_USED = (113, 0, 1, 17, 1023, 1, 113, 17, 0, 1, 113, 17, 1, 0, 1023, 17, 113)
K17_USED = (17, 113, 1023, 1, 113, 0, 113, 1023, 17, 1, 1023, 113, 17, 0, 1023, 1, 113)
U17_USED = (17, 100, 1023, 0, 113, 0, 1, 1000, 17, 1, 512, 113, 16, 0, 1023, 1, 112)
Q17_SMALL = (17, 113, 1, 0, 113, 17, 1023, 1, 17, 113, 0, 1, 17, 113, 1, 17, 113)
K17_SMALL = (113, 17, 17, 1, 1023, 113, 1023, 1, 0, 113, 17, 113, 1, 17, 0, 17, 1023)

ONE_LONG = PackedCase("float16", 128, True, (4097,), (4097,), group=4, heads_kv=1)
ONE_QUERY = PackedCase("bfloat16", 64, False, (1,), (1023,), max_slack=100)
THREE_CAUSAL = PackedCase("bfloat16", 256, True, (113, 0, 1023), (17, 1023, 1023))
THREE_ODD_DIM = PackedCase("float16", 40, False, (17, 1, 113), (113, 0, 17), group=4)
THREE_WINDOW = PackedCase("float16", 72, False, (1023, 113, 1), (113, 1023, 17), window=(17, 5))
THREE_USED = PackedCase("bfloat16", 128, True, (17, 1023, 113), (1023, 1023, 113), seqused_k=(1, 1000, 113),
                        group=4, window=(64, -1))
SEVENTEEN_LONG = PackedCase("bfloat16", 128, True, Q17, K17, group=4, heads_kv=1)
SEVENTEEN_USED = PackedCase("float16", 64, False, Q17_USED, K17_USED, seqused_k=U17_USED, spare_k=37)
SEVENTEEN_WINDOW = PackedCase("float16", 256, False, Q17_SMALL, K17_SMALL, group=4, heads_kv=1, window=(113, 17))

CASES = (ONE_LONG, ONE_QUERY, THREE_CAUSAL, THREE_ODD_DIM, THREE_WINDOW, THREE_USED, SEVENTEEN_LONG,
         SEVENTEEN_USED, SEVENTEEN_WINDOW)
DETERMINISTIC_CASES = (THREE_CAUSAL, THREE_USED, SEVENTEEN_USED)
GUARDED = ((THREE_CAUSAL, False), (THREE_ODD_DIM, False), (THREE_USED, True), (SEVENTEEN_USED, False),
           (SEVENTEEN_USED, True), (SEVENTEEN_WINDOW, False))

# A different summation order (another tile, atomics in another order) can move a rounded result
# by one unit in the last place; FLOOR_EPS is half of one, relative to the largest value.
AGREE_ULPS = 2


def _case_id(case: PackedCase) -> str:
    return case.id


def _on_host(results: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: array.get() for name, array in results.items()}


def _check_shapes(case: PackedCase, host: dict[str, np.ndarray], results: dict[str, np.ndarray]) -> None:
    expected = {"out": host["q"], "lse": np.empty((host["q"].shape[1], case.total_q), np.float32),
                "dq": host["q"], "dk": host["k"], "dv": host["v"]}
    for name, array in results.items():
        want = expected[name]
        assert (array.shape, array.dtype) == (want.shape, want.dtype), \
            f"{name} is {array.dtype} {array.shape}; it must be {want.dtype} {want.shape}"


def _dense_results(case: PackedCase, dev: dict[str, Any], deterministic: bool = False) -> dict[str, np.ndarray]:
    """cupyflash.attention and attention_backward on each sequence alone (batch 1), put together in
    the packed layout; dk and dv are 0 at the keys no sequence uses."""
    import cupyflash

    heads_q = dev["q"].shape[1]
    packed = {"out": np.zeros(dev["q"].shape, dev["q"].dtype), "lse": np.zeros((heads_q, case.total_q), np.float32),
              "dq": np.zeros(dev["q"].shape, dev["q"].dtype), "dk": np.zeros(dev["k"].shape, dev["k"].dtype),
              "dv": np.zeros(dev["v"].shape, dev["v"].dtype)}
    options = dict(causal=case.causal, window_size=case.window)
    for b in range(case.batch):
        rows, keys = case.query_rows(b), case.key_rows(b)
        q, dout, k, v = dev["q"][rows][None], dev["dout"][rows][None], dev["k"][keys][None], dev["v"][keys][None]
        out, lse = cupyflash.attention(q, k, v, return_lse=True, **options)
        grads = cupyflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
        for name, value in zip(("out", "lse", *GRADIENTS), (out, lse, *grads)):
            packed[name][case.packed_index(b)[name]] = value.get()[0]
    return packed


def _disagreement(name: str, ours: np.ndarray, dense: np.ndarray, kind: str) -> str | None:
    """None when ours and dense agree to AGREE_ULPS units in the last place of the largest dense
    value (equal infinities agree; a NaN never does), else the message."""
    a, d = np.asarray(ours, np.float64), np.asarray(dense, np.float64)
    if a.size == 0:
        return None
    with np.errstate(invalid="ignore"):
        difference = np.abs(a - d)
    difference[a == d] = 0.0
    difference[np.isnan(a) | np.isnan(d)] = np.nan
    finite = np.abs(d[np.isfinite(d)])
    bound = AGREE_ULPS * 2 * FLOOR_EPS[kind] * max(1.0, float(finite.max()) if finite.size else 1.0)
    bad = np.isnan(difference)
    worst = np.unravel_index(int(np.argmax(bad)) if bad.any() else int(np.argmax(difference)), a.shape)
    if difference[worst] <= bound:
        return None
    return (f"{name}: varlen and the dense call on the sequence alone differ by {difference[worst]:.3e} at "
            f"{tuple(int(i) for i in worst)} (varlen {float(a[worst])!r}, dense {float(d[worst])!r}); "
            f"allowed {bound:.3e}, {AGREE_ULPS} units in the last place of the largest dense value")


def _disagreements(case: PackedCase, ours: dict[str, np.ndarray], dense: dict[str, np.ndarray]) -> list[str]:
    found = []
    for b in range(case.batch):
        for name, index in case.packed_index(b).items():
            kind = "lse" if name == "lse" else case.dtype
            found.append(_disagreement(f"{name}[seq {b}]", ours[name][index], dense[name][index], kind))
    return [message for message in found if message is not None]


def _bits(array: Any) -> np.ndarray:
    return np.ascontiguousarray(array.get() if hasattr(array, "get") else array).view(np.uint8)


def _bitwise_differences(first: dict[str, Any], second: dict[str, Any], what: str) -> list[str]:
    found = []
    for name in first:
        a, b = _bits(first[name]), _bits(second[name])
        if a.shape != b.shape:
            found.append(f"{name}: {what} differ in shape, {a.shape} and {b.shape} bytes")
        elif not np.array_equal(a, b):
            found.append(f"{name}: {what} are not bitwise equal ({np.count_nonzero(a != b)} of {a.size} bytes differ)")
    return found


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_varlen_matches_the_reference_and_the_dense_call(case: PackedCase) -> None:
    """Every sequence against the float64 reference on it alone (tolerance rule), and against
    the dense call on it alone (two units in the last place); check=True changes nothing."""
    import cupyflash

    host = varlen_inputs(case)
    dev = varlen_to_device(case, host)
    ours = _on_host(varlen_calls(case, dev, poison=True))
    _check_shapes(case, host, ours)
    dense = _dense_results(case, dev)
    references = varlen_references(case, host)
    failures = [r.message() for r in compare_varlen(case, ours, references) if not r.ok]
    failures += [r.message() for r in compare_varlen(case, dense, references, label="dense ") if not r.ok]
    failures += _disagreements(case, ours, dense)
    lengths, options = varlen_arguments(case, dev)
    checked = cupyflash.attention_varlen(dev["q"], dev["k"], dev["v"], *lengths, check=True, **options)
    failures += _bitwise_differences({"out": ours["out"]}, {"out": checked}, "check=False and check=True results")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", DETERMINISTIC_CASES, ids=_case_id)
def test_varlen_deterministic_backward_is_right_and_bitwise_repeatable(case: PackedCase) -> None:
    import cupyflash

    host = varlen_inputs(case)
    dev = varlen_to_device(case, host)
    first = varlen_calls(case, dev, deterministic=True, poison=True)
    lengths, options = varlen_arguments(case, dev)
    again = cupyflash.attention_varlen_backward(dev["dout"], dev["q"], dev["k"], dev["v"], first["out"], first["lse"],
                                                *lengths, deterministic=True, **options)
    ours = _on_host(first)
    failures = [r.message() for r in compare_varlen(case, ours, varlen_references(case, host)) if not r.ok]
    failures += _bitwise_differences({name: ours[name] for name in GRADIENTS}, dict(zip(GRADIENTS, again)),
                                     "two deterministic backward calls")
    assert not failures, "\n".join(failures)


def _unwritten(case: PackedCase, results: dict[str, np.ndarray]) -> list[str]:
    """Rows of a sequence left NaN (unwritten, in memory filled with NaN), rows that see no key
    (lse -inf) whose out or dq is not exactly 0, and dk, dv not exactly 0 at keys no sequence uses."""
    found = []
    as64 = {name: np.asarray(array, np.float64) for name, array in results.items()}
    for b in range(case.batch):
        index = case.packed_index(b)
        for name, array in as64.items():
            part = array[index[name]]
            rows_axis = 1 if name == "lse" else 0
            nan_rows = np.flatnonzero(np.isnan(part).any(axis=tuple(a for a in range(part.ndim) if a != rows_axis)))
            if nan_rows.size:
                found.append(f"{name}[seq {b}]: rows {nan_rows[:8].tolist()} ({nan_rows.size} of "
                             f"{part.shape[rows_axis]}) hold NaN: left unwritten")
        sees_nothing = (as64["lse"][index["lse"]] == -np.inf).T  # (len_q, heads_q): rows that see no key
        for name in ("out", "dq"):
            if name in as64 and np.any(as64[name][index[name]][sees_nothing] != 0):
                found.append(f"{name}[seq {b}]: a row that sees no key (lse -inf) is not 0")
    unused = case.unused_keys()
    for name in ("dk", "dv"):
        if name in as64 and np.any(as64[name][unused] != 0):
            rows = unused[np.any(as64[name][unused] != 0, axis=(1, 2))]
            found.append(f"{name}: keys no sequence uses must be exactly 0; rows {rows[:8].tolist()} are not")
    return found


@pytest.mark.parametrize("case,deterministic", GUARDED,
                         ids=lambda x: _case_id(x) if isinstance(x, PackedCase) else ("det" if x else "atomic"))
def test_varlen_writes_every_row_and_nothing_outside(case: PackedCase, deterministic: bool) -> None:
    """Inside the guard allocator every allocation (inputs, outputs, workspaces) is fresh,
    0xFF-filled (NaN) and surrounded by guard bytes: a row left unwritten shows as NaN, a write
    past any buffer (or into an input) is reported."""
    plan.clear()  # the plan's first call, and its repeat
    host = varlen_inputs(case)
    with GuardedAllocator() as guard:
        dev = varlen_to_device(case, host)
        first = _on_host(varlen_calls(case, dev, deterministic=deterministic))
        again = _on_host(varlen_calls(case, dev, deterministic=deterministic))
        inputs = {name: array.get() for name, array in dev.items() if array is not None}
    guard.assert_intact()
    failures = _unwritten(case, first) + _unwritten(case, again)
    expected_inputs = dict(host, cu_seqlens_q=np.array(case.cu_seqlens_q, np.int32),
                           cu_seqlens_k=np.array(case.cu_seqlens_k, np.int32))
    if case.seqused_k is not None:
        expected_inputs["seqused_k"] = np.array(case.seqused_k, np.int32)
    failures += _bitwise_differences(inputs, expected_inputs, "the inputs after the calls and before them")
    if deterministic:
        failures += _bitwise_differences(first, again, "two deterministic calls")
    assert not failures, "\n".join(failures)


# Graph capture: four sequences, GQA, causal, seqused_k and spare keys. RESPLIT has the same
# totals and longest lengths (what the captured launches were sized by), the sequences reversed.
GRAPH_CASE = PackedCase("float16", 128, True, (113, 0, 1023, 17), (1023, 17, 1023, 113),
                        seqused_k=(1000, 17, 1023, 100), group=4, heads_kv=1, spare_k=5)
RESPLIT = PackedCase("float16", 128, True, (17, 1023, 0, 113), (113, 1023, 17, 1023),
                     seqused_k=(100, 1023, 17, 1000), group=4, heads_kv=1, spare_k=5)


def _graph_calls(case: PackedCase, dev: dict[str, Any]) -> dict[str, Any]:
    """The forward and the deterministic backward (so that a fresh call is bitwise comparable),
    through the public names."""
    import cupyflash

    lengths, options = varlen_arguments(case, dev)
    out, lse = cupyflash.attention_varlen(dev["q"], dev["k"], dev["v"], *lengths, return_lse=True, **options)
    grads = cupyflash.attention_varlen_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse, *lengths,
                                                deterministic=True, **options)
    return dict(zip(("out", "lse", *GRADIENTS), (out, lse, *grads)))


def _capture(stream: Any, case: PackedCase, dev: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(graph, its output arrays): the calls captured on `stream`, allocating from a pool of
    their own (kept alive by the caller), so that no memory the graph writes is handed out again."""
    stream.begin_capture()
    try:
        outputs = _graph_calls(case, dev)
    except BaseException:
        with contextlib.suppress(Exception):
            stream.end_capture()  # leave the stream usable; the error above is what the test reports
        raise
    return stream.end_capture(), outputs


def _overwrite(target: Any, values: np.ndarray) -> None:
    """Copy values into target in place, bit for bit (as unsigned integers: no bf16 arithmetic)."""
    import cupy

    bits = np.dtype(f"uint{8 * values.dtype.itemsize}")
    target.view(bits)[...] = cupy.asarray(np.ascontiguousarray(values).view(bits))


@pytest.mark.parametrize("change", ["values", "values-and-lengths"])
def test_varlen_graph_replay_matches_a_fresh_call(change: str) -> None:
    """A forward and a backward captured in one CUDA graph (fixed input buffers), replayed: first
    as captured, then after new q, k, v, dout (and, with lengths, a new split of the same totals:
    cu_seqlens_q, cu_seqlens_k and seqused_k) are written into those buffers in place. Each
    replay equals a fresh call bit for bit, and the second one the float64 reference too."""
    import cupy

    case, new_case = GRAPH_CASE, (RESPLIT if change == "values-and-lengths" else GRAPH_CASE)
    dev = varlen_to_device(case, varlen_inputs(case))
    stream = cupy.cuda.Stream(non_blocking=True)
    graph_pool = cupy.cuda.MemoryPool()
    with stream:
        eager = _on_host(_graph_calls(case, dev))  # compiles, and makes the plans the capture runs
        stream.synchronize()
        with cupy.cuda.using_allocator(graph_pool.malloc):
            graph, replayed = _capture(stream, case, dev)
        graph.launch(stream)
        stream.synchronize()
        failures = _bitwise_differences(eager, _on_host(replayed), "a fresh call and the replay")
        new_host = varlen_inputs(new_case, seed=1)
        for name in ("q", "k", "v", "dout"):
            _overwrite(dev[name], new_host[name])
        for name in ("cu_seqlens_q", "cu_seqlens_k", "seqused_k"):  # the same values unless the lengths change
            _overwrite(dev[name], np.array(getattr(new_case, name), np.int32))
        graph.launch(stream)
        stream.synchronize()
        second = _on_host(replayed)
        fresh = _on_host(_graph_calls(case, dev))  # the same arrays, now holding new_case's values
        stream.synchronize()
    failures += _bitwise_differences(fresh, second, "a fresh call and the replay after the change")
    failures += [r.message() for r in compare_varlen(new_case, second, varlen_references(new_case, new_host))
                 if not r.ok]
    if np.array_equal(_bits(second["out"]), _bits(eager["out"])):
        failures.append("out did not change when the inputs did: the replay did not recompute")
    assert not failures, "\n".join(failures)
