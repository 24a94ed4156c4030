"""Tests of cupyflash.bench.

Without a GPU: the grid, FLOP counts, the naive peer, the check (reference.py in pieces or in
rows, judged by tolerance.py; run with NumPy), the shared input generator, the tables, JSON
files, plot data and the environment record; the decode bench's grid, bytes, block tables,
memory plan, reference and bars. With a GPU (marked `gpu`): one tiny shape through run(), every
implementation that is installed; tiny batches through run_varlen() and tiny cells through
run_decode(). Neither PyTorch nor matplotlib is needed; the plot tests run only where
matplotlib is.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cupyflash import bench, build, reference, tolerance, validation
from cupyflash.bench import BenchShape, DecodeCell
from cupyflash.device import DeviceLimits, gpu_count
from cupyflash.problem import numpy_dtype

needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- grid and FLOPs


def test_grid_at_the_head_dims_models_use_between_the_papers() -> None:
    """Issue 15's extra head dims keep heads x head_dim near 2048 (heads = 2048 // head_dim)."""
    grid = bench.paper_grid(head_dims=(80, 96, 160, 192), seqlens=(4096,), causal=(False,), dtypes=("bfloat16",))
    assert [(s.head_dim, s.heads, s.batch) for s in grid] == [(80, 25, 4), (96, 21, 4), (160, 12, 4), (192, 10, 4)]
    assert all(1920 <= s.heads * s.head_dim <= 2048 for s in grid)


def test_paper_grid_follows_the_papers() -> None:
    grid = bench.paper_grid()
    assert len(grid) == 2 * 3 * 6 * 2
    assert len(set(grid)) == len(grid)
    for shape in grid:
        assert shape.batch * shape.seqlen == 16384
        assert shape.heads * shape.head_dim == 2048
    assert grid[0] == BenchShape("float16", 64, 512, False, 32, 32)
    assert grid[1] == BenchShape("float16", 64, 512, True, 32, 32)
    assert grid[-1] == BenchShape("bfloat16", 256, 16384, True, 1, 8)


def test_paper_grid_options_and_errors() -> None:
    grid = bench.paper_grid(dtypes=("bfloat16",), head_dims=(128,), seqlens=(1024,), causal=(True,),
                            tokens=4096, hidden=1024)
    assert grid == [BenchShape("bfloat16", 128, 1024, True, 4, 8)]
    with pytest.raises(ValueError, match="float32"):
        bench.paper_grid(dtypes=("float32",))
    with pytest.raises(ValueError, match="tokens"):
        bench.paper_grid(seqlens=(32768,))
    with pytest.raises(ValueError, match="hidden"):
        bench.paper_grid(head_dims=(4096,))


def test_quick_grid() -> None:
    grid = bench.quick_grid()
    assert {(s.dtype, s.head_dim, s.seqlen) for s in grid} == {
        ("float16", d, s) for d in (64, 128) for s in (1024, 4096)}
    assert {s.causal for s in grid} == {False, True}


def test_shape_id_names_every_field() -> None:
    shape = BenchShape("bfloat16", 128, 2048, True, 8, 16)
    assert shape.id == "bfloat16-d128-s2048-causal-b8h16"
    assert BenchShape("float16", 64, 512, False, 32, 32).id == "float16-d64-s512-full-b32h32"
    with pytest.raises(AttributeError):
        shape.seqlen = 1  # frozen


def test_flops() -> None:
    shape = BenchShape("float16", 3, 2, False, 5, 7)
    assert bench.flops(shape, "fwd") == 4 * 5 * 7 * 2 * 2 * 3
    assert bench.flops(shape, "bwd") == 2.5 * 4 * 5 * 7 * 2 * 2 * 3
    causal = BenchShape("float16", 3, 2, True, 5, 7)
    assert bench.flops(causal, "fwd") == bench.flops(shape, "fwd") / 2
    assert bench.flops(causal, "bwd") == bench.flops(shape, "bwd") / 2
    with pytest.raises(ValueError, match="pass_"):
        bench.flops(shape, "both")


def test_flops_of_the_grid_are_constant_per_seqlen() -> None:
    # B*S = 16384 and H*D = 2048, so fwd FLOPs = 4 * 16384 * 2048 * S whatever the head dim.
    for shape in bench.paper_grid(causal=(False,)):
        assert bench.flops(shape, "fwd") == 4 * 16384 * 2048 * shape.seqlen


def test_tflops() -> None:
    shape = BenchShape("float16", 128, 4096, False, 4, 16)
    ms = 2.0
    assert math.isclose(bench.tflops(shape, "fwd", ms), bench.flops(shape, "fwd") / 2e-3 / 1e12)


def test_naive_skip_reason() -> None:
    shape = BenchShape("float16", 64, 16384, False, 1, 32)
    assert bench.naive_score_bytes(shape) == 32 * 16384 * 16384 * 4
    assert bench.naive_skip_reason(shape, free_bytes=80 * 10**9) is not None
    assert "34.4 GB" in bench.naive_skip_reason(shape, free_bytes=80 * 10**9)
    assert bench.naive_skip_reason(shape, free_bytes=100 * 10**9) is None
    small = BenchShape("float16", 64, 8192, False, 2, 32)
    assert bench.naive_skip_reason(small, free_bytes=80 * 10**9) is None


# --------------------------------------------------------------------------- inputs


def _host_inputs(batch: int, seqlen_q: int, seqlen_k: int, heads: int, head_dim: int,
                 dtype: str = "float16", heads_kv: int | None = None) -> dict[str, np.ndarray]:
    kv = (batch, seqlen_k, heads if heads_kv is None else heads_kv, head_dim)
    return validation.random_inputs((batch, seqlen_q, heads, head_dim), kv, dtype, seed=1)


def test_random_inputs_are_make_inputs() -> None:
    """One generator: validation's cases draw exactly what random_inputs draws."""
    case = validation.Case("bfloat16", 40, True, 17, 33, group=4, q_scale=10.0)
    drawn = validation.random_inputs((2, 17, 8, 40), (2, 33, 2, 40), "bfloat16", seed=5, q_scale=10.0)
    made = validation.make_inputs(case, seed=5)
    assert drawn.keys() == made.keys() == {"q", "k", "v", "dout"}
    for name in made:
        assert drawn[name].dtype == made[name].dtype == numpy_dtype("bfloat16"), name
        assert np.array_equal(drawn[name].view(np.uint16), made[name].view(np.uint16)), name
    assert made["q"].shape == made["dout"].shape == (2, 17, 8, 40) and made["k"].shape == (2, 33, 2, 40)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_random_inputs_round_like_a_cast(dtype: str) -> None:
    """bfloat16 goes through its bits (CuPy has no bfloat16 cast) and still equals a cast."""
    scale = 1e30 if dtype == "bfloat16" else 100.0  # large values, within the dtype's range
    x = validation.random_inputs((1, 64, 4, 32), (1, 64, 4, 32), dtype, seed=2, q_scale=scale)
    rng = np.random.default_rng(2)
    q32 = rng.standard_normal((1, 64, 4, 32), dtype=np.float32) * scale
    assert np.array_equal(x["q"].view(np.uint16), q32.astype(numpy_dtype(dtype)).view(np.uint16))
    assert len({x[n].tobytes() for n in x}) == 4  # four different draws


def test_random_inputs_reject_other_dtypes() -> None:
    with pytest.raises(ValueError, match="dtype is 'float32'"):
        validation.random_inputs((1, 2, 1, 8), (1, 2, 1, 8), "float32")


# --------------------------------------------------------------------------- the naive peer


def _relative(ours: np.ndarray, ref: np.ndarray) -> float:
    """max|ours - ref| / max|ref|: how far the naive peer is (a test of the peer, not the judge)."""
    ours32 = bench.to_float32(ours).astype(np.float64)
    return float(np.max(np.abs(ours32 - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_naive_matches_float64_reference(causal: bool) -> None:
    x = _host_inputs(2, 37, 37, 3, 16)
    p, out = bench.naive_forward(x["q"], x["k"], x["v"], causal, np)
    assert p.dtype == np.float16 and out.dtype == np.float16 and out.shape == (2, 3, 37, 16)
    ref_out, _ = reference.attention_forward(x["q"], x["k"], x["v"], causal=causal)
    assert _relative(out.transpose(0, 2, 1, 3), ref_out) < 2e-3
    grads = bench.naive_backward(x["dout"], x["q"], x["k"], x["v"], p, out, np)
    ref_grads = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], causal=causal)
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert ours.dtype == np.float16, name
        assert _relative(ours.transpose(0, 2, 1, 3), ref) < 5e-3, name


def test_naive_bfloat16_runs_in_float32() -> None:
    x = _host_inputs(1, 24, 24, 2, 8, "bfloat16")
    p, out = bench.naive_forward(x["q"], x["k"], x["v"], True, np)
    assert p.dtype == out.dtype == np.float32
    ref_out, _ = reference.attention_forward(x["q"], x["k"], x["v"], causal=True)
    assert _relative(out.transpose(0, 2, 1, 3), ref_out) < 1e-5
    grads = bench.naive_backward(x["dout"], x["q"], x["k"], x["v"], p, out, np)
    ref_grads = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], causal=True)
    for ours, ref in zip(grads, ref_grads):
        assert _relative(ours.transpose(0, 2, 1, 3), ref) < 1e-5


def test_to_float32_reads_bfloat16_bits() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    assert np.array_equal(bench.to_float32(values.astype(numpy_dtype("bfloat16"))), values)
    assert bench.to_float32(values.astype(np.float16)).dtype == np.float32


# --------------------------------------------------------------------------- reference.py in rows


@pytest.mark.parametrize("options", [dict(causal=False), dict(causal=True), dict(window_size=(5, 2)),
                                     dict(causal=True, softcap=3.0)], ids=["full", "causal", "window", "softcap"])
@pytest.mark.parametrize("lengths", [(50, 50), (20, 45), (45, 20)], ids=["50x50", "20x45", "45x20"])
def test_reference_rows_equal_the_whole(options: dict, lengths: tuple[int, int]) -> None:
    """rows=(start, stop) gives those rows of the whole problem: out, lse, dq; dk and dv are the
    gradients of those rows alone, i.e. the whole backward with dout zero elsewhere."""
    seqlen_q, seqlen_k = lengths
    x = {n: a.astype(np.float64) for n, a in _host_inputs(2, seqlen_q, seqlen_k, 4, 8, heads_kv=2).items()}
    start, stop = seqlen_q // 3, seqlen_q - 2
    out, lse = reference.attention_forward(x["q"], x["k"], x["v"], **options)
    out_rows, lse_rows = reference.attention_forward(x["q"], x["k"], x["v"], rows=(start, stop), **options)
    np.testing.assert_allclose(out_rows, out[:, start:stop], rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.isinf(lse_rows), np.isinf(lse[:, :, start:stop]))
    np.testing.assert_allclose(lse_rows, lse[:, :, start:stop], rtol=0, atol=1e-13)
    masked = np.zeros_like(x["dout"])
    masked[:, start:stop] = x["dout"][:, start:stop]
    whole = reference.attention_backward(masked, x["q"], x["k"], x["v"], **options)
    rows = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], rows=(start, stop), **options)
    np.testing.assert_allclose(rows[0], whole[0][:, start:stop], rtol=0, atol=1e-12)
    for name, got, want in zip(("dk", "dv"), rows[1:], whole[1:]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=name)


def test_reference_rows_checks_its_range() -> None:
    x = _host_inputs(1, 10, 10, 1, 8)
    with pytest.raises(ValueError, match=r"rows is \(4, 11\); .* seqlen_q = 10"):
        reference.attention_forward(x["q"], x["k"], x["v"], rows=(4, 11))
    empty, lse = reference.attention_forward(x["q"], x["k"], x["v"], rows=(3, 3))
    assert empty.shape == (1, 0, 1, 8) and lse.shape == (1, 1, 0)


# --------------------------------------------------------------------------- the check


def test_tolerance_compare_in_an_array_module_equals_the_host() -> None:
    """compare(xp=...) is the same rule as the host's, computed where the arrays are."""
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((2, 5, 3))
    base = ref + rng.standard_normal(ref.shape) * 1e-3
    ours = (ref + rng.standard_normal(ref.shape) * 3e-3).astype(np.float32)
    ours[1, 2, 0] = np.nan
    for candidate in (base, ours):  # (repr: a NaN error is not == itself)
        assert repr(tolerance.compare("t", candidate, ref, base, "float16", xp=np)) == \
            repr(tolerance.compare("t", candidate, ref, base, "float16"))


@pytest.mark.parametrize("budget_heads", [0.5, 1, 3, 8, 100], ids=["none", "1", "3", "8", "all"])
def test_pieces_cover_the_problem_once(budget_heads: float) -> None:
    batch, heads_kv, group = 3, 8, 2
    per_head = bench.check.head_bytes(40, 30, group)
    parts = bench.check.pieces(batch, heads_kv, 40, 30, group, budget_heads * per_head)
    if budget_heads < 1:
        assert parts == []
        return
    seen = np.zeros((batch, heads_kv), int)
    for b, h in parts:
        seen[b, h] += 1
        assert (b.stop - b.start) * (h.stop - h.start) * per_head <= budget_heads * per_head
    assert (seen == 1).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("heads_per_piece", [1, 2, 100], ids=["head", "two-heads", "batches"])
def test_full_reference_in_pieces_equals_reference_py(dtype: str, heads_per_piece: int) -> None:
    data = _host_inputs(3, 33, 33, 4, 16, dtype, heads_kv=2)  # GQA: two q heads per kv head
    budget = heads_per_piece * bench.check.head_bytes(33, 33, 2) / bench.REFERENCE_MEMORY_FRACTION
    ref = bench.reference_for(data, True, dtype, ("fwd", "bwd"), int(budget), np)
    assert ref.kind == "full" and ref.note is None
    wide = {n: bench.to_float32(a) for n, a in data.items()}
    out, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=True)
    base_out, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=True, compute_dtype=dtype)
    grads = reference.attention_backward(wide["dout"], wide["q"], wide["k"], wide["v"], causal=True)
    np.testing.assert_allclose(ref.ref64["out"], out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ref.baseline["out"], base_out, rtol=0, atol=1e-6)
    for name, want in zip(("dq", "dk", "dv"), grads):
        assert ref.ref64[name].dtype == np.float64 and ref.ref64[name].shape == want.shape, name
        np.testing.assert_allclose(ref.ref64[name], want, rtol=0, atol=1e-12, err_msg=name)
        assert not np.isnan(ref.baseline[name]).any(), name


def _check_data(dtype: str = "float16", causal: bool = False) -> tuple[dict, dict, dict]:
    """Inputs, and the baseline's own results (out; dq, dk, dv), which the rule passes."""
    data = _host_inputs(2, 40, 40, 2, 16, dtype)
    wide = {n: bench.to_float32(a) for n, a in data.items()}
    out, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=causal, compute_dtype=dtype)
    grads = reference.attention_backward(wide["dout"], wide["q"], wide["k"], wide["v"], causal=causal,
                                         compute_dtype=dtype)
    return data, {"fwd": (out,), "bwd": grads}, wide


def test_judge_full() -> None:
    data, results, _ = _check_data()
    ref = bench.reference_for(data, False, "float16", ("fwd", "bwd"), 10**9, np)
    row = bench.judge(ref, "bwd", results["bwd"], "float16", np)
    assert row["valid"] is True and row["check"] == "full" and set(row["errors"]) == set(row["allowed"]) == {
        "dq", "dk", "dv"}
    assert 0 <= row["error"] <= 1 and "note" not in row and "mismatches" not in row
    broken = results["bwd"][1].copy()
    broken[1, 7, 0, 3] += 0.5
    row = bench.judge(ref, "bwd", (results["bwd"][0], broken, results["bwd"][2]), "float16", np)
    assert row["valid"] is False and row["error"] > 1
    assert row["mismatches"] == [next(m for m in row["mismatches"] if m.startswith("dk: "))]
    assert "at (1, 7, 0, 3)" in row["mismatches"][0]  # the worst coordinate
    nan_out = results["fwd"][0].copy()
    nan_out[0, 0, 0, 0] = np.nan
    row = bench.judge(ref, "fwd", (nan_out,), "float16", np)
    assert row["valid"] is False and math.isnan(row["error"])


def test_judge_slice_when_a_head_does_not_fit() -> None:
    data, results, _ = _check_data("bfloat16", causal=True)
    ref = bench.reference_for(data, True, "bfloat16", ("fwd", "bwd"), 1000, np)
    assert ref.kind == "slice" and ref.start == 40 - min(40, bench.CHECK_ROWS)
    assert set(ref.ref64) == {"out", "dq"} and "one head of the full reference would need" in ref.note
    row = bench.judge(ref, "bwd", results["bwd"], "bfloat16", np)
    assert row["valid"] is True and row["check"] == "slice" and set(row["errors"]) == {"dq"}
    assert row["note"].startswith(f"checked dq of the last {40 - ref.start} query rows of batch 0 only (one head")
    row = bench.judge(ref, "fwd", results["fwd"], "bfloat16", np)
    assert row["valid"] is True and set(row["errors"]) == {"out"}


def test_slice_reference_is_the_last_rows() -> None:
    data, _, wide = _check_data(causal=True)
    ref = bench.slice_reference(data, True, "float16", ("out", "dq", "dk"), 16, np)
    assert ref.kind == "slice" and ref.start == 24 and set(ref.ref64) == {"out", "dq"}
    out, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=True)
    dq = reference.attention_backward(wide["dout"], wide["q"], wide["k"], wide["v"], causal=True)[0]
    np.testing.assert_allclose(ref.ref64["out"], out[:1, 24:], rtol=0, atol=1e-13)
    np.testing.assert_allclose(ref.ref64["dq"], dq[:1, 24:], rtol=0, atol=1e-12)


def test_no_reference_means_not_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise MemoryError("out of memory allocating 4 GB")

    monkeypatch.setattr(bench.check, "slice_reference", fail)
    data, results, _ = _check_data()
    ref = bench.reference_for(data, False, "float16", ("fwd",), 0, np)
    assert ref.kind is None and "slice reference failed: MemoryError: out of memory" in ref.note
    row = bench.judge(ref, "fwd", results["fwd"], "float16", np)
    assert row["valid"] is None and row["note"].startswith("not validated: one head")


def test_progress_line() -> None:
    shape = BenchShape("float16", 64, 1024, True, 16, 32)
    row = {**bench.measure._row("cupyflash", "fwd", shape), "ms": 1.5, "tflops": 300.0, "valid": True,
           "error": 0.25}
    assert bench.measure.describe(row) == ("float16-d64-s1024-causal-b16h32 cupyflash fwd: 1.500 ms, "
                                           "300.0 TFLOP/s, valid (error 0.25 of allowed)")
    skipped = {**bench.measure._row("naive-cupy", "fwd", shape), "note": "skipped: would need 9 GB"}
    assert bench.measure.describe(skipped).endswith("naive-cupy fwd: skipped: would need 9 GB")


# --------------------------------------------------------------------------- environment


def test_environment_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    env = bench.environment()
    for key in ("gpu", "compute_capability", "driver_version", "runtime_version", "nvrtc_version", "cupy_version",
                "torch_version", "cupyflash_version", "source_hash", "git_commit", "date"):
        assert key in env, key
    assert env["torch_version"] is None
    assert env["source_hash"] == build.source_hash()
    assert env["git_commit"] == "unknown" or len(env["git_commit"]) == 40
    assert env["date"].endswith("+00:00")
    if gpu_count() == 0:
        assert env["gpu"] is None
    json.dumps(env)  # plain values only
    assert "not installed" in bench.describe_environment(env)
    assert bench.available_impls() == ("cupyflash", "cupyflash-det", "naive-cupy")


def test_flash_attn_4_is_a_peer_only_where_it_and_torch_are_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    installed: set[str] = set()
    monkeypatch.setattr(bench.peers, "_installed", lambda module: module in installed)
    assert "flash-attn-4" not in bench.available_impls()
    installed.add("flash_attn.cute")  # without torch it cannot run
    assert "flash-attn-4" not in bench.available_impls() and "torch-cudnn" not in bench.available_impls()
    installed.add("torch")
    assert bench.available_impls()[-2:] == ("torch-efficient", "flash-attn-4")
    installed.discard("flash_attn.cute")
    assert "flash-attn-4" not in bench.available_impls() and "torch-cudnn" in bench.available_impls()


def test_flash_attn_4_setup_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = BenchShape("bfloat16", 128, 256, True, 1, 2)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(RuntimeError, match="PyTorch does not import"):
        bench.peers.setup("flash-attn-4", "fwd", shape, {})
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `from flash_attn.cute import ...` raise
    with pytest.raises(RuntimeError, match="flash_attn.cute does not import.*flash-attn-4"):
        bench.peers._import_fa4()


def test_format_table_has_a_flash_attn_4_ratio_where_it_ran() -> None:
    shape = BenchShape("bfloat16", 128, 8192, True, 2, 16)
    rows = [_fake_row("cupyflash", "fwd", shape, 480.0), _fake_row("torch-cudnn", "fwd", shape, 600.0),
            _fake_row("flash-attn-4", "fwd", shape, 640.0)]
    text = bench.format_table({"environment": ENV, "rows": rows}, "fwd")
    columns = [line for line in text.splitlines() if line.startswith("| dtype")][0]
    assert [c.strip() for c in columns.strip("|").split("|")][-3:] == [
        "flash-attn-4", "cupyflash / torch-cudnn", "cupyflash / flash-attn-4"]
    assert _table_rows(text) == [["bfloat16", "128", "8192", "1", "480", "600", "640", "0.80", "0.75"]]


def test_default_stem() -> None:
    report = {"environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-24T10:00:00+00:00"}}
    assert bench.default_stem(report) == "bench-nvidia-h100-80gb-hbm3-2026-11-24"
    assert bench.default_stem({"environment": {"gpu": None, "date": None}}) == "bench-cpu-undated"


@pytest.mark.skipif(gpu_count() > 0, reason="checks the no-GPU error")
def test_run_needs_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="GPU"):
        bench.run([BenchShape("float16", 64, 128, False, 1, 1)], impls=["cupyflash"])


def test_run_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="flash3"):
        bench.run([], impls=["flash3"])
    with pytest.raises(ValueError, match="sideways"):
        bench.run([], passes=["sideways"], impls=["cupyflash"])


# --------------------------------------------------------------------------- tables and files


ENV = {"gpu": "Test GPU 80GB", "compute_capability": "9.0", "driver_version": "13.0", "runtime_version": "13.0",
       "nvrtc_version": "13.0", "cupy_version": "14.2.0", "torch_version": "2.11.0", "cupyflash_version": "0.1.0",
       "source_hash": "0123456789abcdef", "git_commit": "a" * 40, "git_dirty": False,
       "date": "2026-11-24T10:00:00+00:00"}


def _fake_row(impl: str, pass_: str, shape: BenchShape, tflops: float | None, valid: bool | None = True,
              **extra: object) -> dict:
    row = {"impl": impl, "pass": pass_, "dtype": shape.dtype, "head_dim": shape.head_dim, "seqlen": shape.seqlen,
           "causal": shape.causal, "batch": shape.batch, "heads": shape.heads,
           "ms": None if tflops is None else bench.flops(shape, pass_) / (tflops * 1e12) * 1e3,
           "tflops": tflops, "valid": valid, "error": 0.5 if valid is not None else None, "check": "full"}
    row.update(extra)
    return row


def _fake_report() -> dict:
    a = BenchShape("float16", 64, 1024, False, 16, 32)
    b = BenchShape("float16", 64, 4096, True, 4, 32)
    rows = [
        _fake_row("cupyflash", "fwd", a, 300.0, peak_extra_mb=128.25, output_mb=64.0, first_call_ms=950.0,
                  new_cubins=1),
        _fake_row("naive-cupy", "fwd", a, 80.0),
        _fake_row("torch-flash", "fwd", a, 250.0),
        _fake_row("torch-cudnn", "fwd", a, 400.0),
        _fake_row("cupyflash", "fwd", b, 310.0, valid=False, error=float("nan"), first_call_ms=5.0, new_cubins=0),
        _fake_row("torch-flash", "fwd", b, 290.0),
        _fake_row("torch-cudnn", "fwd", b, None, valid=None, failure="RuntimeError: No available kernel"),
        _fake_row("cupyflash", "bwd", a, 200.0, peak_extra_mb=300.0, output_mb=192.0, first_call_ms=2000.0,
                  new_cubins=3),
        _fake_row("cupyflash-det", "bwd", a, 150.0),
    ]
    return {"environment": ENV, "settings": {"runs": 20}, "rows": rows,
            "compile_times": [{"dtype": "float16", "head_dim": 64, "pass": "fwd", "entry": "flash_fwd",
                               "arch": "sm_90", "seconds": 1.25, "registers": 224, "spill_bytes": 0},
                              {"dtype": "float16", "head_dim": 64, "pass": "bwd", "entry": "flash_bwd_convert_dq",
                               "arch": "sm_90", "seconds": 0.0, "registers": 17, "spill_bytes": 0,
                               "memoized": True}]}


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| dtype")]


def test_format_table_forward() -> None:
    text = bench.format_table(_fake_report(), "fwd")
    header = text.splitlines()[0]
    for fact in ("Forward", "Test GPU 80GB", "2026-11-24", "a" * 12, "0123456789abcdef", "14.2.0", "median of 20"):
        assert fact in header, fact
    columns = [line for line in text.splitlines() if line.startswith("| dtype")][0]
    assert [c.strip() for c in columns.strip("|").split("|")] == [
        "dtype", "D", "S", "causal", "cupyflash", "naive-cupy", "torch-flash", "torch-cudnn",
        "cupyflash / torch-flash", "cupyflash / torch-cudnn"]
    first, second = _table_rows(text)
    assert first == ["float16", "64", "1024", "0", "300", "80", "250", "400", "1.20", "0.75"]
    assert second == ["float16", "64", "4096", "1", "310 ✗", "-", "290", "-", "✗", "-"]


def test_format_table_backward_and_empty() -> None:
    text = bench.format_table(_fake_report(), "bwd")
    assert "Backward" in text.splitlines()[0]
    assert _table_rows(text) == [["float16", "64", "1024", "0", "200", "150"]]
    empty = {"environment": {}, "rows": []}
    assert "(no results)" in bench.format_table(empty, "fwd")
    with pytest.raises(ValueError):
        bench.format_table(empty, "fwd+bwd")


def test_unvalidated_results_are_marked() -> None:
    shape = BenchShape("bfloat16", 128, 2048, False, 8, 16)
    report = {"environment": ENV, "rows": [_fake_row("cupyflash", "bwd", shape, 123.4, valid=None, check=None),
                                           _fake_row("naive-cupy", "bwd", shape, 7.25, valid=False)]}
    assert _table_rows(bench.format_table(report, "bwd")) == [["bfloat16", "128", "2048", "0", "123 ?", "7.2 ✗"]]


def test_reports_checked_against_naive_cupy_still_print() -> None:
    """Reports from before the check used cupyflash.reference: the naive-cupy row was the
    reference itself (reference: true, valid: null) and carries no mark."""
    shape = BenchShape("float16", 64, 1024, False, 16, 32)
    report = {"environment": ENV, "rows": [_fake_row("cupyflash", "fwd", shape, 300.0, check="naive"),
                                           _fake_row("naive-cupy", "fwd", shape, 80.0, valid=None, check=None,
                                                     reference=True)]}
    assert _table_rows(bench.format_table(report, "fwd")) == [["float16", "64", "1024", "0", "300", "80"]]


def test_memory_and_compile_tables() -> None:
    report = _fake_report()
    memory = bench.format_memory_table(report)
    assert "| cupyflash | fwd | float16 | 64 | 1024 | 0 | 128.2 | 64.0 | 64.2 |" in memory
    assert "| cupyflash | bwd | float16 | 64 | 1024 | 0 | 300.0 | 192.0 | 108.0 |" in memory
    firsts = bench.first_calls(report)
    assert [(f["impl"], f["pass"], f["causal"], f["first_call_ms"]) for f in firsts] == [
        ("cupyflash", "fwd", False, 950.0), ("cupyflash", "fwd", True, 5.0), ("cupyflash", "bwd", False, 2000.0)]
    compile_table = bench.format_compile_table(report)
    assert "| float16 | 64 | fwd | flash_fwd | sm_90 | 1.25 | 224 | 0 |" in compile_table
    assert "| float16 | 64 | bwd | flash_bwd_convert_dq | sm_90 | (shared) | 17 | 0 |" in compile_table
    full = bench.format_report(report)
    assert "9 results: 1 failed validation, 1 raised." in full
    assert full.index("Forward") < full.index("Backward") < full.index("Device memory")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    report = _fake_report()
    paths = bench.save(report, tmp_path / "results", "test-gpu")
    assert [p.name for p in paths] == ["test-gpu.json", "test-gpu.md"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["test-gpu.json", "test-gpu.md"]
    loaded = bench.load(paths[0])
    assert loaded["environment"] == ENV
    assert loaded["rows"][4]["error"] == "nan"  # strict JSON: non-finite numbers become strings
    assert loaded["rows"][0] == report["rows"][0]
    assert paths[1].read_text() == bench.format_report(report)
    assert bench.format_table(loaded, "fwd") == bench.format_table(report, "fwd")
    bench.save(loaded, tmp_path / "results", "test-gpu")  # overwrites in place
    assert len(list((tmp_path / "results").iterdir())) == 2


def test_save_writes_numpy_scalars(tmp_path: Path) -> None:
    report = {"environment": ENV, "rows": [], "extra": {"x": np.float32(1.5), "n": np.int64(3), "t": (1, 2)}}
    loaded = bench.load(bench.save(report, tmp_path, "np")[0])
    assert loaded["extra"] == {"x": 1.5, "n": 3, "t": [1, 2]}


def test_plot_series() -> None:
    report = _fake_report()
    a = BenchShape("float16", 64, 512, False, 32, 32)
    report["rows"].append(_fake_row("cupyflash", "fwd", a, 280.0))
    series = bench.plot_series(report, "float16", causal=False)
    assert set(series) == {("fwd", 64), ("bwd", 64)}
    assert series[("fwd", 64)]["cupyflash"] == [(512, 280.0), (1024, 300.0)]
    assert "naive-cupy" in series[("fwd", 64)]
    causal = bench.plot_series(report, "float16", causal=True)
    assert causal == {("fwd", 64): {"torch-flash": [(4096, 290.0)]}}  # invalid and failed left out
    assert bench.plot_series(report, "bfloat16") == {}


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeError, match="matplotlib"):
        bench.plot(_fake_report(), tmp_path / "x.png")


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = bench.plot(_fake_report(), tmp_path / "plots" / "fwd.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = bench.save_plots(_fake_report(), tmp_path, "stem")
    assert sorted(p.name for p in paths) == ["stem-float16-causal.png", "stem-float16-full.png"]
    with pytest.raises(ValueError, match="bfloat16"):
        bench.plot(_fake_report(), tmp_path / "none.png", dtype="bfloat16")


def test_plot_picks_what_the_report_has() -> None:
    report = _fake_report()
    assert bench.plots._plot_choice(report, None, None) == ("float16", False)
    assert bench.plots._plot_choice(report, None, True) == ("float16", True)
    for row in report["rows"]:
        row["dtype"], row["causal"] = "bfloat16", True
    assert bench.plots._plot_choice(report, None, None) == ("bfloat16", True)
    assert bench.plots._plot_choice(report, "float16", None) == ("float16", False)  # absent: plot() then says so


# --------------------------------------------------------------------------- compile times


def _nvrtc_available() -> bool:
    try:
        build.nvrtc_version()
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _nvrtc_available(), reason="needs CuPy with NVRTC")
def test_measure_compile_times_without_gpu() -> None:
    h100 = DeviceLimits("H100 (made up)", (9, 0), 132, 232448, 233472)
    rows = bench.measure_compile_times(["float16"], [64], limits=h100)
    entries = [(r["pass"], r["entry"]) for r in rows]
    # Hopper's forward and dK/dV kernels are the wgmma ones (sm_90a); head_dim 64's default
    # backward makes dQ with atomics (in the sm90 kernel's own accumulator layout), so the
    # deterministic one has its own two kernels, the dQ pass on wgmma too
    assert entries == [("fwd", "flash_fwd_tma"), ("bwd", "flash_bwd_delta"), ("bwd", "flash_bwd_dkdv_sm90"),
                       ("bwd", "flash_bwd_convert_dq_tiled"), ("bwd-det", "flash_bwd_dkdv_sm90"),
                       ("bwd-det", "flash_bwd_dq_sm90")]
    for r in rows:
        assert r["seconds"] >= 0 and r["arch"] == ("sm_90a" if r["entry"].endswith(("_sm90", "_tma")) else "sm_90")
        assert "failure" not in r, r  # every default kernel compiles
        # (registers is None only when NVRTC served the program from its own cache, with no log)
        assert r["registers"] is None or (r["registers"] > 0 and r["spill_bytes"] == 0), r
    convert = next(r for r in rows if r["entry"] == "flash_bwd_convert_dq_tiled")
    assert convert["memoized"] is True  # one program with flash_bwd_delta, compiled just before


# --------------------------------------------------------------------------- variable-length batches


def test_cu_seqlens() -> None:
    cu = bench.cu_seqlens((0, 1, 203, 5))
    assert cu.dtype == np.int32 and cu.tolist() == [0, 0, 1, 204, 209]
    assert bench.cu_seqlens([]).tolist() == [0]
    assert bench.cu_seqlens(np.array([3, 4], dtype=np.int64)).tolist() == [0, 3, 7]
    with pytest.raises(ValueError, match="non-negative integer"):
        bench.cu_seqlens((3, -1))
    with pytest.raises(ValueError, match="non-negative integer"):
        bench.cu_seqlens((1.5,))
    with pytest.raises(ValueError, match="2\\^31 - 1"):
        bench.cu_seqlens((2**30, 2**30))


def test_varlen_flops_count_each_sequence() -> None:
    lengths = (1, 2, 300)
    forward = 4.0 * (1 + 4 + 90000) * 128 * 16
    assert bench.varlen_flops(lengths, 16, 128, False, "fwd") == forward
    assert bench.varlen_flops(lengths, 16, 128, False, "bwd") == 2.5 * forward
    assert bench.varlen_flops(lengths, 16, 128, True, "fwd") == forward / 2
    assert bench.varlen_flops(lengths, 16, 128, True, "bwd") == 2.5 * forward / 2
    assert bench.varlen_flops((2, 3), 1, 1, False, "fwd", lengths_k=(5, 7)) == 4.0 * (2 * 5 + 3 * 7)
    assert bench.varlen_flops((), 16, 128, False, "fwd") == 0
    with pytest.raises(ValueError, match="pass_"):
        bench.varlen_flops(lengths, 16, 128, False, "both")
    with pytest.raises(ValueError, match="one of each per sequence"):
        bench.varlen_flops((1, 2), 1, 1, False, "fwd", lengths_k=(1,))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_equal_batches_count_what_the_dense_call_counts(causal: bool) -> None:
    for sequences, length in bench.EQUAL_BATCHES:
        batch = bench.equal_batch("float16", 128, sequences, length, causal)
        assert batch.tokens == 16384 and batch.heads == 16
        assert batch.dense_shape == BenchShape("float16", 128, length, causal, sequences, 16)
        for pass_ in ("fwd", "bwd"):
            assert bench.batch_flops(batch, pass_) == bench.flops(batch.dense_shape, pass_)


def test_mixed_lengths_are_deterministic_and_sum_right() -> None:
    lengths = bench.mixed_lengths()
    assert lengths == bench.mixed_lengths(64, 128, 8192, 0)  # the defaults
    assert lengths == bench.mixed_lengths()  # same seed, same lengths
    assert len(lengths) == 64 and all(128 <= n <= 8192 for n in lengths)
    assert sum(lengths) % 64 == 0 and len(set(lengths)) > 32
    raw = np.random.default_rng(0).integers(128, 8192, endpoint=True, size=64)
    assert np.abs(np.array(lengths) - raw).max() <= 1 and np.abs(np.array(lengths) - raw).sum() == sum(raw) % 64
    assert bench.mixed_lengths(seed=1) != lengths
    assert 3000 < sum(lengths) / 64 < 5300  # uniform in 128..8192: mean about 4160


def test_mixed_lengths_nudges_within_the_bounds() -> None:
    for seed in range(50):  # narrow ranges hit both branches: the longest lose one, or the shortest gain one
        for count, low, high in ((4, 1, 2), (5, 3, 4), (7, 1, 3), (3, 10, 10)):
            lengths = bench.mixed_lengths(count, low, high, seed)
            assert len(lengths) == count and sum(lengths) % count == 0, (seed, count, lengths)
            assert all(low <= n <= high for n in lengths), (seed, count, lengths)
    with pytest.raises(ValueError, match="1 <= low <= high"):
        bench.mixed_lengths(4, 10, 5)
    with pytest.raises(ValueError, match="count >= 1"):
        bench.mixed_lengths(0)


def test_varlen_batches() -> None:
    batches = bench.varlen_batches()
    assert len(batches) == 2 * (2 * 3 + 1) and len({b.id for b in batches}) == len(batches)
    assert batches[0] == bench.equal_batch("float16", 128, 16, 1024, False)
    assert [(b.kind, b.spec, b.causal) for b in batches[:7]] == [
        ("equal", "16x1024", False), ("equal", "4x4096", False), ("equal", "2x8192", False),
        ("equal", "16x1024", True), ("equal", "4x4096", True), ("equal", "2x8192", True),
        ("mixed", "64x[128,8192]s0", True)]
    mixed = batches[6]
    assert mixed.lengths == bench.mixed_lengths() and mixed.bar == bench.MIXED_BAR == 0.9
    assert mixed.dense_shape == BenchShape("float16", 128, mixed.tokens // 64, True, 64, 16)
    assert mixed.dense_shape.batch * mixed.dense_shape.seqlen == mixed.tokens  # the same total tokens
    assert batches[0].bar == bench.EQUAL_BAR == 0.97
    assert mixed.max_seqlen == max(mixed.lengths) and mixed.cu_seqlens[-1] == mixed.tokens
    assert mixed.id == "mixed-float16-d128-causal-64x[128,8192]s0-h16"
    only = bench.varlen_batches(("bfloat16",), (64,), (True,))
    assert [(b.dtype, b.head_dim, b.heads, b.causal, b.kind) for b in only] == [
        ("bfloat16", 64, 32, True, "equal")] * 3 + [("bfloat16", 64, 32, True, "mixed")]
    with pytest.raises(ValueError, match="float32"):
        bench.varlen_batches(("float32",))
    with pytest.raises(ValueError, match="hidden"):
        bench.varlen_batches(head_dims=(4096,))


def test_varlen_batch_rules() -> None:
    with pytest.raises(ValueError, match="whole mean length"):
        bench.VarlenBatch("mixed", "float16", 64, 2, True, (3, 4), "x")
    with pytest.raises(ValueError, match="one length"):
        bench.VarlenBatch("equal", "float16", 64, 2, True, (3, 5), "x")
    with pytest.raises(ValueError, match="at least one sequence"):
        bench.VarlenBatch("mixed", "float16", 64, 2, True, (0, 4), "x")
    with pytest.raises(ValueError, match="kind"):
        bench.VarlenBatch("ragged", "float16", 64, 2, True, (4, 4), "x")


def test_segments() -> None:
    assert bench.segments((1024,) * 16) == [(0, 16384, 16, 1024)]
    assert bench.segments((5, 5, 9, 5)) == [(0, 10, 2, 5), (10, 19, 1, 9), (19, 24, 1, 5)]
    assert bench.segments(()) == []
    runs = bench.segments(bench.mixed_lengths())
    assert sum(r[2] for r in runs) == 64 and runs[-1][1] == sum(bench.mixed_lengths())
    assert all(stop - start == count * length for start, stop, count, length in runs)


# ---------------------------------------------------- varlen: the check, per run of equal lengths


def _varlen_check(monkeypatch: pytest.MonkeyPatch, batch: bench.VarlenBatch, dtype: str = "float16") -> tuple:
    """Packed inputs, references (NumPy, on the host) and outputs that pass: the float64
    reference of each sequence alone, rounded to the dtype."""
    from cupyflash.bench import varlen_run

    monkeypatch.setattr(varlen_run, "require_cupy", lambda: np)
    monkeypatch.setattr(varlen_run, "free_device_bytes", lambda: 10**9)
    dims = (1, batch.tokens, batch.heads, batch.head_dim)
    data = {n: a[0] for n, a in validation.random_inputs(dims, dims, dtype, seed=3).items()}
    refs = varlen_run.packed_references(batch, data, ("fwd", "bwd"))
    as64 = {n: bench.to_float32(a).astype(np.float64) for n, a in data.items()}
    exact = validation.stitched_reference(as64, batch.lengths, batch.lengths, causal=batch.causal)
    outputs = {n: exact[n].astype(numpy_dtype(dtype)) for n in ("out", "dq", "dk", "dv")}
    return varlen_run, refs, outputs


def test_judge_packed_per_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = bench.VarlenBatch("mixed", "float16", 16, 2, True, (5, 5, 9, 5), "t")
    varlen_run, refs, outputs = _varlen_check(monkeypatch, batch)
    assert [run for run, _ in refs] == bench.segments(batch.lengths) and all(r.kind == "full" for _, r in refs)
    grads = (outputs["dq"], outputs["dk"], outputs["dv"])
    row = varlen_run.judge_packed(refs, "bwd", grads, "float16")
    assert row["valid"] is True and row["check"] == "full" and 0 <= row["error"] <= 1
    assert set(row["errors"]) == {"dq", "dk", "dv"} and "mismatches" not in row
    assert varlen_run.judge_packed(refs, "fwd", (outputs["out"],), "float16")["valid"] is True
    broken = outputs["dk"].copy()
    broken[12, 1, 3] += 1.0  # packed row 12: sequence 2 (rows 10..18), the run of one 9-long sequence
    row = varlen_run.judge_packed(refs, "bwd", (outputs["dq"], broken, outputs["dv"]), "float16")
    assert row["valid"] is False and row["worst_sequences"] == [2, 2] and row["failing_runs"] == 1
    assert row["mismatches"][0].startswith("sequence 2: dk: ") and "at (0, 2, 1, 3)" in row["mismatches"][0]


def test_judge_packed_of_an_equal_batch_is_the_dense_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """One run: the reference is the dense call's own, so varlen and dense are judged alike."""
    batch = bench.equal_batch("bfloat16", 16, 3, 8, False, hidden=32)
    varlen_run, refs, outputs = _varlen_check(monkeypatch, batch, "bfloat16")
    assert len(refs) == 1 and refs[0][1].ref64["out"].shape == batch.dense_shape.dims
    out = outputs["out"].copy()
    out[-1, 0, 0] = np.nan  # the last sequence's last row
    row = varlen_run.judge_packed(refs, "fwd", (out,), "bfloat16")
    assert row["valid"] is False and math.isnan(row["error"]) and row["worst_sequences"] == [0, 2]
    assert row["mismatches"][0].startswith("sequences 0..2 (the coordinate's first index counts from sequence 0): ")
    assert "at (2, 7, 0, 0)" in row["mismatches"][0]


def test_merge_verdicts() -> None:
    from cupyflash.bench.varlen_run import MAX_MISMATCHES, merge_verdicts

    ok = {"valid": True, "error": 0.5, "errors": {"out": 1e-3}, "allowed": {"out": 2e-3}, "check": "full"}
    worse = {**ok, "error": 0.75, "errors": {"out": 1.5e-3}}
    assert merge_verdicts([ok, worse, ok], [(0, 4), (4, 5), (9, 1)]) == {**worse, "worst_sequences": [4, 8]}
    bad = {**ok, "valid": False, "error": 3.0, "mismatches": ["out: max|ours - ref64| = ..."]}
    merged = merge_verdicts([ok, bad] * 4, [(n, 1) for n in range(8)])
    assert merged["valid"] is False and merged["error"] == 3.0 and merged["worst_sequences"] == [1, 1]
    assert merged["failing_runs"] == 4 and merged["mismatches"][0] == "sequence 1: out: max|ours - ref64| = ..."
    assert len(merge_verdicts([bad] * 9, [(n, 1) for n in range(9)])["mismatches"]) == MAX_MISMATCHES
    sliced = {**ok, "check": "slice", "note": "checked out of the last 64 query rows of batch 0 only (...)"}
    merged = merge_verdicts([ok, sliced, {**sliced, "note": "other"}], [(0, 1), (1, 1), (2, 1)])
    assert merged["check"] == "slice" and merged["note"].endswith("(and 1 other notes)")
    unchecked = {"valid": None, "note": "not validated: no memory"}
    assert merge_verdicts([ok, unchecked], [(0, 1), (1, 1)])["valid"] is None
    assert merge_verdicts([unchecked], [(0, 3)]) == {"valid": None, "note": "not validated: no memory"}
    nan = {**ok, "valid": False, "error": float("nan")}
    assert math.isnan(merge_verdicts([worse, nan], [(0, 1), (1, 1)])["error"])


def test_torch_peer_choice() -> None:
    from types import SimpleNamespace

    from cupyflash.bench.varlen_run import choose_peer, varlen_mask_options

    assert choose_peer(None) == "torch-flash-seq"
    assert choose_peer(SimpleNamespace()) == "torch-flash-seq"
    assert choose_peer(SimpleNamespace(varlen_attn=lambda *a, **k: None)) == "torch-varlen"

    def torch_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):  # noqa
        return None

    def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,  # noqa
                   window_size=(-1, -1)):
        return None

    assert varlen_mask_options(torch_2_9, True) == {"is_causal": True}
    assert varlen_mask_options(torch_2_9, False) == {"is_causal": False}
    assert varlen_mask_options(torch_2_10, True) == {"window_size": (-1, 0)}
    assert varlen_mask_options(torch_2_10, False) == {"window_size": (-1, -1)}


def test_torch_peer_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupyflash.bench import varlen_run

    monkeypatch.setattr(varlen_run.importlib.util, "find_spec", lambda name: None)
    assert varlen_run.torch_peer() == (None, "PyTorch not installed: no peer")


# ---------------------------------------------------- varlen: summary, tables, files


def _varlen_row(impl: str, pass_: str, batch: bench.VarlenBatch, tflops: float | None, valid: bool | None = True,
                **extra: object) -> dict:
    from cupyflash.bench import varlen_run

    row = {**varlen_run._row(impl, pass_, batch), "tflops": tflops, "valid": valid}
    row["ms"] = None if tflops is None else row["flops"] / (tflops * 1e12) * 1e3
    row.update(extra)
    return row


def _varlen_report() -> dict:
    equal = bench.equal_batch("float16", 128, 16, 1024, True)
    mixed = bench.mixed_batch("float16", 128)
    rows = [_varlen_row("cupyflash-varlen", "fwd", equal, 297.0, first_call_ms=900.0, new_cubins=2,
                        peak_extra_mb=64.0, output_mb=64.0),
            _varlen_row("torch-varlen", "fwd", equal, 250.0),
            _varlen_row("cupyflash-dense", "fwd", equal, 300.0),
            _varlen_row("cupyflash-varlen", "bwd", equal, 200.0, valid=False, error=float("nan"),
                        mismatches=["sequence 3: dq: max|ours - ref64| = nan at (0, 1, 2, 3)"]),
            _varlen_row("torch-varlen", "bwd", equal, None, valid=None, failure="RuntimeError: no kernel"),
            _varlen_row("cupyflash-dense", "bwd", equal, 210.0),
            _varlen_row("cupyflash-varlen", "fwd", mixed, 350.0),
            _varlen_row("torch-varlen", "fwd", mixed, 300.0),
            _varlen_row("cupyflash-dense", "fwd", mixed, 400.0)]
    return {"kind": "varlen", "environment": ENV, "settings": {"runs": 20, "peer_note": "torch 2.11.0: varlen_attn"},
            "rows": rows, "summary": bench.summarize(rows)}


def test_varlen_summary() -> None:
    report = _varlen_report()
    fwd, bwd, mixed = report["summary"]
    assert (fwd["id"], fwd["pass"], fwd["dense"], fwd["bar"]) == (report["rows"][0]["id"], "fwd", "16x1024", 0.97)
    assert math.isclose(fwd["ratio"], 0.99) and fwd["meets"] is True
    assert fwd["peer"] == "torch-varlen" and math.isclose(fwd["peer_ratio"], 297 / 250)
    assert fwd["tflops"] == {"cupyflash-varlen": 297.0, "torch-varlen": 250.0, "cupyflash-dense": 300.0}
    assert math.isclose(bwd["ratio"], 200 / 210) and bwd["meets"] is False  # fails validation: never meets
    assert bwd["peer_ratio"] is None
    dense_tokens = mixed["dense"].split("x")
    assert int(dense_tokens[0]) * int(dense_tokens[1]) == mixed["tokens"]
    assert math.isclose(mixed["ratio"], 350 / 400) and mixed["meets"] is False and mixed["bar"] == 0.9
    lonely = bench.summarize([_varlen_row("cupyflash-varlen", "fwd", bench.mixed_batch("float16", 64), 1.0)])
    assert lonely[0]["ratio"] is None and lonely[0]["meets"] is None and "peer" not in lonely[0]


def test_format_varlen_table() -> None:
    text = bench.format_varlen_table(_varlen_report())
    lines = text.splitlines()
    assert lines[0].startswith("**Variable-length TFLOP/s** (median of 20 runs, varlen and dense in alternation; FLOPs of the real tokens only) — ")
    assert "Test GPU 80GB" in lines[0] and "commit aaaaaaaaaaaa" in lines[0]
    header, *rows = _table_rows(text)
    assert header == ["batch", "dtype", "D", "H", "causal", "pass", "dense BxS", "cupyflash-varlen",
                      "cupyflash-dense", "torch-varlen", "varlen / dense", "bar", "met", "varlen / torch-varlen"]
    assert rows[0] == ["equal 16x1024", "float16", "128", "16", "1", "fwd", "16x1024", "297", "300", "250", "0.99",
                       "0.97", "yes", "1.19"]
    assert rows[1][7:] == ["200 ✗", "210", "-", "✗", "0.97", "NO", "-"]
    assert rows[2][0] == "mixed 64x[128,8192]s0" and rows[2][10:13] == ["0.88", "0.90", "NO"]
    assert "peer: torch 2.11.0: varlen_attn" in text and "mixed lengths >= 0.90 x" in text


def test_varlen_report_files(tmp_path: Path) -> None:
    report = _varlen_report()
    assert bench.default_stem(report) == "bench-varlen-test-gpu-80gb-2026-11-24"
    assert bench.default_stem({**report, "kind": None}).startswith("bench-test-gpu")
    paths = bench.save(report, tmp_path, bench.default_stem(report))
    markdown = paths[1].read_text()
    assert markdown == bench.format_report(report) == bench.format_varlen_report(report)
    assert markdown.startswith(bench.format_varlen_table(report))
    assert "9 results: 1 failed validation, 1 raised; bar missed by 2 of 3" in markdown
    assert "torch-varlen bwd raised: RuntimeError: no kernel" in markdown
    assert "sequence 3: dq: max|ours - ref64| = nan" in markdown and "first call 900 ms, 2 new cubins" in markdown
    loaded = bench.load(paths[0])
    assert loaded["kind"] == "varlen" and loaded["environment"] == ENV and loaded["rows"][3]["error"] == "nan"
    assert bench.format_varlen_table(loaded) == bench.format_varlen_table(report)


# --------------------------------------------------------------------------- decode: grid, bytes, layouts


def test_decode_grid_is_the_issue_grid() -> None:
    cells = bench.decode_grid()
    assert len(cells) == 5 * 3 * 3 * 2 == len({c.id for c in cells})
    assert {c.seqlen_q for c in cells} == {1, 2, 4, 8, 16} and {c.batch for c in cells} == {1, 16, 64}
    assert {c.cache for c in cells} == {4096, 32768, 131072}
    assert {(c.heads_q, c.heads_kv) for c in cells} == {(32, 8), (8, 1)}
    assert {(c.dtype, c.head_dim) for c in cells} == {("bfloat16", 128)}
    paged = [c for c in cells if c.page_sizes]
    assert len(paged) == 2 * 3 * 3 * 2 and {c.seqlen_q for c in paged} == {1, 16}
    assert {c.page_sizes for c in paged} == {(16, 256)}
    assert cells[0] == DecodeCell("bfloat16", 128, 32, 8, 1, 1, 4096, (16, 256))
    assert cells[0].id == "bfloat16-d128-q1-b1-c4096-h32x8"


def test_decode_grid_quick_and_options() -> None:
    quick = bench.decode_grid(quick=True)
    assert len(quick) == 16 and {c.seqlen_q for c in quick} == {1, 8} and {c.batch for c in quick} == {1, 64}
    assert {c.cache for c in quick} == {4096, 32768} and {(c.heads_q, c.heads_kv) for c in quick} == set(
        bench.decode.HEADS)
    assert all(c.page_sizes == ((16, 256) if c.seqlen_q == 1 else ()) for c in quick)
    assert any(c.has_copy_bar for c in quick) and any(c.cudnn_bar == 2.0 for c in quick)  # every bar is exercised
    custom = bench.decode_grid(("float16",), (64,), (8,), query_tokens=(3,), batches=(2,), caches=(512,),
                               heads=((4, 2),), paged_query_tokens=(3,))
    assert custom == [DecodeCell("float16", 64, 4, 2, 3, 2, 512, (8,))]
    assert not any(c.page_sizes for c in bench.decode_grid(page_sizes=()))
    with pytest.raises(ValueError, match="page size 100 does not divide the cache length 4096"):
        bench.decode_grid(page_sizes=(100,))


@pytest.mark.parametrize("fields, message", [
    ({"heads_kv": 3}, "heads_kv must divide heads_q"),
    ({"seqlen_q": 5000}, "seqlen_q <= cache"),
    ({"page_sizes": (16, 48)}, "page size 48 does not divide"),
    ({"dtype": "float32"}, "is not benchmarked"),
    ({"batch": 0, "cache": 0}, "batch = 0, cache = 0: every size"),
], ids=["heads", "seqlen", "page", "dtype", "sizes"])
def test_decode_cell_rules(fields: dict, message: str) -> None:
    base = dict(dtype="bfloat16", head_dim=128, heads_q=32, heads_kv=8, seqlen_q=1, batch=1, cache=4096)
    with pytest.raises(ValueError, match=message):
        DecodeCell(**{**base, **fields})


@pytest.mark.parametrize("seqlen_q, cache", [(1, 1), (1, 4096), (3, 5), (16, 16), (16, 40)])
def test_visible_pairs_count_the_reference_mask(seqlen_q: int, cache: int) -> None:
    assert bench.visible_pairs(seqlen_q, cache) == int(reference.visible_mask(seqlen_q, cache, causal=True).sum())


def test_decode_bytes_and_flops() -> None:
    big = DecodeCell("bfloat16", 128, 32, 8, 1, 64, 131072)
    assert big.kv_bytes == 64 * 131072 * 8 * 128 * 2 * 2 == 34_359_738_368 and big.tokens == 64 * 131072
    assert bench.kv_bytes(2, 10, 3, 4, 2) == 960 and DecodeCell("float16", 4, 3, 3, 1, 2, 10).kv_bytes == 960
    small = DecodeCell("float16", 8, 4, 2, 3, 2, 5)
    assert small.flops == 4 * 8 * 4 * 2 * (3 + 4 + 5) and small.group == 2
    assert bench.decode.tbps(2e9, 1.0) == 2.0
    assert (small.cudnn_bar, DecodeCell("float16", 8, 4, 2, 8, 2, 8).cudnn_bar) == (1.0, 2.0)
    assert DecodeCell("bfloat16", 128, 8, 1, 1, 64, 4096).has_copy_bar  # 64 x 4k = 256k tokens
    assert not DecodeCell("bfloat16", 128, 8, 1, 1, 63, 4096).has_copy_bar
    assert not DecodeCell("bfloat16", 128, 8, 1, 2, 64, 4096).has_copy_bar  # the bar is for one query token


def test_impl_names() -> None:
    from cupyflash.bench import decode

    assert decode.paged_impl(16) == "cupyflash-paged16" and decode.page_size_of("cupyflash-paged256") == 256
    assert decode.page_size_of("cupyflash") is None and decode.page_size_of("torch-cudnn") is None
    cell = DecodeCell("bfloat16", 128, 8, 1, 1, 1, 4096, (16, 256))
    assert decode.cell_impls(cell, ("torch-cudnn",)) == ["cupyflash", "cupyflash-paged16", "cupyflash-paged256",
                                                        "torch-cudnn"]


def test_block_table_is_a_shuffled_permutation() -> None:
    table = bench.block_table(4, 8, seed=3)
    assert table.dtype == np.int32 and table.shape == (4, 8)
    assert sorted(table.ravel().tolist()) == list(range(32))
    assert not np.array_equal(table.ravel(), np.arange(32))  # physical order differs from logical
    assert np.array_equal(table, bench.block_table(4, 8, seed=3))
    assert not np.array_equal(table, bench.block_table(4, 8, seed=4))
    with pytest.raises(ValueError, match="at least one"):
        bench.block_table(0, 8)


def test_paged_cache_holds_the_same_keys() -> None:
    from cupyflash.bench import decode_run

    cache = validation.random_inputs((1, 1, 1, 4), (3, 32, 2, 4), "bfloat16")["k"]
    table = bench.block_table(3, 4, seed=1)
    pages = decode_run.paged_cache(cache, 8, table, np)
    assert pages.shape == (12, 8, 2, 4) and pages.dtype == cache.dtype
    bits, pages_bits = cache.view(np.int16), pages.view(np.int16)
    assert np.array_equal(pages_bits[table[1, 2]], bits[1, 16:24])  # sequence 1's third page
    assert np.array_equal(pages_bits[table.reshape(-1)].reshape(cache.shape), bits)
    with pytest.raises(ValueError, match=r"must be \(batch, seqlen // page_size\)"):
        decode_run.paged_cache(cache, 8, table[:, :3], np)


def test_memory_plan() -> None:
    cell = DecodeCell("bfloat16", 128, 32, 8, 1, 64, 131072, (16, 256))  # 34.4 GB per cache
    assert bench.memory_plan(cell, 140e9) == (True, (16, 256), None)  # 3 caches in 80% of 140 GB
    fits, pages, note = bench.memory_plan(cell, 100e9)  # 80 GB: the cache and one paged copy
    assert fits and pages == (16,)
    assert note == ("skipped: memory: a paged copy (page size 256) would make 3 caches of 34.4 GB (allowed: 80% of "
                    "100.0 GB free)")
    fits, pages, note = bench.memory_plan(cell, 40e9)
    assert (fits, pages) == (False, ()) and note == (
        "skipped: memory: the K and V cache needs 34.4 GB (allowed: 80% of 40.0 GB free)")
    assert bench.memory_plan(DecodeCell("bfloat16", 128, 8, 1, 1, 1, 4096), 1e9) == (True, (), None)


def test_reference_parts_count_the_cache_copies() -> None:
    from cupyflash.bench import decode_run

    cell = DecodeCell("bfloat16", 128, 32, 8, 1, 4, 131072)
    per_head = decode_run.reference_head_bytes(cell)
    assert per_head > 2 * 131072 * 128 * 8 * cell.group  # float64 copies of K and V for each query head
    assert per_head > 10 * bench.check.head_bytes(1, 131072, cell.group)  # far more than the scores
    for heads in (1, 3, 8, 20):
        parts = decode_run.reference_parts(cell, heads * per_head)
        covered = [(b, h) for batch, kv in parts for b in range(*batch.indices(4)) for h in range(*kv.indices(8))]
        assert sorted(covered) == [(b, h) for b in range(4) for h in range(8)]  # each (sequence, kv head) once
        assert max((p[0].stop - p[0].start) * (p[1].stop - p[1].start) for p in parts) <= heads
    assert decode_run.reference_parts(cell, per_head / 2) == []


def _decode_data(cell: DecodeCell) -> dict:
    drawn = validation.random_inputs(cell.q_dims, cell.cache_dims, cell.dtype, seed=5)
    return {n: drawn[n] for n in ("q", "k", "v")}


def test_decode_reference_judges_out() -> None:
    from cupyflash.bench import decode_run

    cell = DecodeCell("bfloat16", 16, 4, 2, 3, 2, 40)
    data = _decode_data(cell)
    ref = decode_run.decode_reference(cell, data, 10**9, np)
    assert ref.kind == "full" and set(ref.ref64) == {"out"}
    wide = {n: bench.to_float32(a) for n, a in data.items()}
    out64, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=True)
    np.testing.assert_allclose(ref.ref64["out"], out64, rtol=0, atol=1e-13)
    baseline, _ = reference.attention_forward(wide["q"], wide["k"], wide["v"], causal=True, compute_dtype="bfloat16")
    row = bench.judge(ref, "fwd", (baseline,), "bfloat16", np)
    assert row["valid"] is True and row["check"] == "full"
    # A top-left causal mask (query t sees keys <= t) is not decoding's: it must fail.
    top_left, _ = reference.attention_forward(wide["q"], wide["k"][:, :3], wide["v"][:, :3], causal=True)
    assert bench.judge(ref, "fwd", (top_left,), "bfloat16", np)["valid"] is False
    tight = decode_run.decode_reference(cell, data, 1000, np)  # not one kv head fits: batch element 0
    assert tight.kind == "slice" and tight.ref64["out"].shape == (1, 3, 4, 16)
    assert tight.note.startswith("one kv head of the reference would need")
    assert bench.judge(tight, "fwd", (baseline,), "bfloat16", np)["valid"] is True


def test_torch_peer_modes() -> None:
    from cupyflash.bench import decode_run

    assert decode_run.mask_mode("torch-cudnn", 1) == decode_run.mask_mode("torch-flash", 1) == "none"
    assert decode_run.mask_mode("torch-cudnn", 8) == "boolean" and decode_run.mask_mode("torch-flash", 2) == "flash-op"
    assert decode_run.gqa_modes("boolean", 4) == decode_run.gqa_modes("none", 8) == ("enable_gqa", "repeat_interleave")
    assert decode_run.gqa_modes("flash-op", 4) == ("native", "repeat_interleave")
    assert decode_run.gqa_modes("flash-op", 1) == ("equal heads",)
    assert set(decode_run.MASKS) == {"none", "boolean", "flash-op"}


def test_torch_peers_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from cupyflash.bench import decode_run

    monkeypatch.setattr(decode_run.importlib.util, "find_spec", lambda name: None)
    assert decode_run.torch_peers() == ((), "PyTorch not installed: no peers")


def test_decode_bandwidth_and_progress_line() -> None:
    from cupyflash.bench import decode_run

    cell = DecodeCell("bfloat16", 128, 8, 1, 1, 16, 32768)
    row = {**decode_run._row("cupyflash", cell), "ms": 0.25, "tflops": 1.0, "valid": True, "error": 0.5}
    decode_run.add_bandwidth(row, 4.0)
    assert math.isclose(row["tbps"], cell.kv_bytes / 0.25e-3 / 1e12)
    assert math.isclose(row["copy_fraction"], row["tbps"] / 4.0)
    assert decode_run.describe(row) == (f"{cell.id} cupyflash: 0.250 ms, 1.0 TFLOP/s, valid (error 0.50 of allowed), "
                                        f"{row['tbps']:.2f} TB/s ({row['copy_fraction']:.0%} of copy)")
    skipped = decode_run.add_bandwidth({**decode_run._row("torch-cudnn", cell), "note": "skipped: memory: x"}, 4.0)
    assert skipped["tbps"] is None and decode_run.describe(skipped) == f"{cell.id} torch-cudnn: skipped: memory: x"
    paged = decode_run._row("cupyflash-paged16", cell)
    assert (paged["layout"], paged["page_size"]) == ("paged", 16) and row["layout"] == "contiguous"


def _numpy_kvcache(ignore_table: bool = False):
    """attention_with_kvcache in NumPy: reference.py's same-dtype baseline over the keys the
    block table names (or, ignore_table, over the pages in their physical order: wrong)."""
    def attention_with_kvcache(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, *, cache_seqlens: np.ndarray,
                               block_table: np.ndarray | None = None, causal: bool = True, num_splits: int = 1
                               ) -> np.ndarray:
        assert causal and num_splits == 0 and cache_seqlens.dtype == np.int32
        if block_table is not None:
            order = np.sort(block_table, axis=None) if ignore_table else block_table.reshape(-1)
            k_cache, v_cache = (c.view(np.int16)[order].view(c.dtype).reshape(q.shape[0], -1, *c.shape[2:])
                                for c in (k_cache, v_cache))
        assert (cache_seqlens == k_cache.shape[1]).all()
        wide = [bench.to_float32(a) for a in (q, k_cache, v_cache)]
        dtype = q.dtype.name
        return reference.attention_forward(*wide, causal=True, compute_dtype=dtype)[0].astype(numpy_dtype(dtype))

    return attention_with_kvcache


@pytest.mark.parametrize("ignore_table", [False, True], ids=["paged", "table-ignored"])
def test_run_decode_on_stand_ins(monkeypatch: pytest.MonkeyPatch, ignore_table: bool) -> None:
    """run_decode's whole path without a GPU: NumPy for CuPy, a NumPy attention_with_kvcache,
    stand-in timings. Every row checked, paged rows judged against the contiguous keys (so a
    call that ignores the block table fails), memory skips, bandwidth, summary, progress."""
    import cupyflash
    from cupyflash import timing
    from cupyflash.bench import decode_run

    monkeypatch.setattr(decode_run, "require_cupy", lambda: np)
    monkeypatch.setattr(decode_run, "free_device_bytes", lambda: 10**8)
    monkeypatch.setattr(decode_run, "free_memory", lambda: None)
    monkeypatch.setattr(decode_run, "first_call", lambda fn: (fn(), 5.0, 0))
    monkeypatch.setattr(decode_run, "peak_extra_bytes", lambda fn: (fn(), 0))
    monkeypatch.setattr(decode_run, "torch_peers", lambda: ((), "PyTorch not installed: no peers"))
    monkeypatch.setattr(decode_run, "copy_bandwidth", lambda runs, warmup: {"bytes": 2**30, "tbps": 4.0})
    monkeypatch.setattr(bench.measure, "gpu_count", lambda: 1)
    timed: list[object] = []  # each call timed on its own: stand-in medians 0.01, 0.02, 0.03 ms in order

    def stand_in_bench(fn, warmup, runs):
        timed.append(fn)
        return timing.Timing(0.01 * len(timed), 0.01, 0.1, runs)

    monkeypatch.setattr(bench.measure, "do_bench", stand_in_bench)
    monkeypatch.setattr(bench.measure, "do_bench_interleaved", None)  # not used: a call would fail the test
    monkeypatch.setattr(cupyflash, "attention_with_kvcache", _numpy_kvcache(ignore_table), raising=False)
    cells = [DecodeCell("bfloat16", 16, 4, 2, 3, 2, 64, (8, 16)),
             DecodeCell("float16", 8, 2, 2, 1, 1, 2**22, (16,))]  # 2**22 keys: 67 MB of K and V, over 80 MB free
    messages: list[str] = []
    report = bench.run_decode(cells, runs=2, warmup=1, progress=messages.append)
    rows = {(r["id"], r["impl"]): r for r in report["rows"]}
    assert messages[0].startswith("copy bandwidth: 4.00 TB/s") and len(messages) == 1 + len(rows) == 6
    assert rows[(cells[0].id, "cupyflash")]["valid"] is True and rows[(cells[0].id, "cupyflash")]["check"] == "full"
    for impl in ("cupyflash-paged8", "cupyflash-paged16"):
        row = rows[(cells[0].id, impl)]
        assert row["valid"] is (not ignore_table) and "timed" not in row and row["page_size"] > 0, row
    first = rows[(cells[0].id, "cupyflash")]
    assert math.isclose(first["tbps"], cells[0].kv_bytes / 0.01e-3 / 1e12) and first["copy_fraction"] > 0
    assert messages[1] == f"[1/5] {bench.decode_run.describe(first)}"
    assert all(rows[(cells[1].id, i)]["note"].startswith("skipped: memory") for i in ("cupyflash", "cupyflash-paged16"))
    paged = report["summary"][0]["paged_ratio"]
    assert paged == {"8": pytest.approx(0.5), "16": pytest.approx(1 / 3)}  # stand-in times 0.01, 0.02, 0.03 ms
    assert len(timed) == 3  # the first cell's three layouts; the second was skipped
    assert report["summary"][0]["meets"]["paged"] is False and report["kind"] == "decode"


@pytest.mark.skipif(gpu_count() > 0, reason="checks the no-GPU error")
def test_run_decode_needs_a_gpu() -> None:
    with pytest.raises(RuntimeError, match="GPU"):
        bench.run_decode([DecodeCell("bfloat16", 128, 8, 1, 1, 1, 4096)])


# ---------------------------------------------------- decode: summary, tables, files


def _decode_row(impl: str, cell: DecodeCell, tbps: float | None, valid: bool | None = True, **extra: object) -> dict:
    """A row as run_decode makes it, timed so that it reads `tbps` TB/s, against a 4 TB/s copy."""
    from cupyflash.bench import decode_run

    row = {**decode_run._row(impl, cell), "valid": valid, "error": 0.5 if valid else None}
    if tbps is not None:
        row["ms"] = cell.kv_bytes / (tbps * 1e12) * 1e3
    row.update(extra)
    return decode_run.add_bandwidth(row, 4.0)


DECODE_CELLS = (DecodeCell("bfloat16", 128, 32, 8, 1, 64, 4096, (16, 256)),  # 256k tokens: the copy bar applies
                DecodeCell("bfloat16", 128, 8, 1, 8, 1, 4096),  # 8 query tokens: 2x cuDNN
                DecodeCell("bfloat16", 128, 8, 1, 16, 64, 131072, (16,)),  # skipped for memory
                DecodeCell("bfloat16", 128, 8, 1, 1, 1, 4096, (16,)))  # ours invalid


def _decode_report() -> dict:
    a, b, c, d = DECODE_CELLS
    skipped = "skipped: memory: the K and V cache needs 4.3 GB (allowed: 80% of 2.0 GB free)"
    rows = [_decode_row("cupyflash", a, 3.6, first_call_ms=700.0, new_cubins=2, peak_extra_mb=9.0, output_mb=1.0),
            _decode_row("cupyflash-paged16", a, 3.3), _decode_row("cupyflash-paged256", a, 3.5),
            _decode_row("torch-cudnn", a, 3.0, gqa="enable_gqa", mask=bench.decode_run.MASKS["none"]),
            _decode_row("torch-flash", a, 2.0, gqa="repeat_interleave", mask=bench.decode_run.MASKS["none"]),
            _decode_row("cupyflash", b, 1.0), _decode_row("torch-cudnn", b, 0.6, gqa="enable_gqa",
                                                          mask=bench.decode_run.MASKS["boolean"]),
            _decode_row("torch-flash", b, None, valid=None, failure="RuntimeError: torch-flash declined every way tried"),
            *(_decode_row(impl, c, None, valid=None, note=skipped) for impl in ("cupyflash", "cupyflash-paged16",
                                                                               "torch-cudnn")),
            _decode_row("cupyflash", d, 2.0, valid=False, error=float("nan"),
                        mismatches=["out: max|ours - ref64| = nan at (0, 0, 3, 7)"]),
            _decode_row("cupyflash-paged16", d, 2.0), _decode_row("torch-cudnn", d, 1.0, gqa="enable_gqa",
                                                                  mask=bench.decode_run.MASKS["none"])]
    return {"kind": "decode", "environment": ENV, "copy": {"bytes": 2**31, "ms": 1.0, "tbps": 4.0},
            "settings": {"runs": 10, "peer_note": "torch 2.11.0: SDPA's cuDNN and flash backends",
                         "timing": "ours together; peers alone"},
            "rows": rows, "summary": bench.summarize_decode(rows)}


def test_decode_summary_and_bars() -> None:
    a, b, c, d = _decode_report()["summary"]
    assert a["id"] == DECODE_CELLS[0].id and math.isclose(a["copy_fraction"], 0.9)
    assert math.isclose(a["cudnn_ratio"], 1.2) and math.isclose(a["flash_ratio"], 1.8) and a["cudnn_bar"] == 1.0
    assert set(a["paged_ratio"]) == {"16", "256"} and math.isclose(a["paged_ratio"]["16"], 3.3 / 3.6)
    assert a["meets"] == {"copy": True, "cudnn": True, "paged": True}
    assert a["tbps"]["torch-cudnn"] == pytest.approx(3.0) and a["valid"]["cupyflash"] is True
    assert math.isclose(b["cudnn_ratio"], 1 / 0.6) and b["cudnn_bar"] == 2.0 and b["flash_ratio"] is None
    assert b["meets"] == {"copy": None, "cudnn": False, "paged": None}  # 4k tokens: no copy bar; 1.67 < 2
    assert c["ms"] is None and c["meets"] == {"copy": None, "cudnn": None, "paged": None}
    assert d["meets"] == {"copy": None, "cudnn": False, "paged": False}  # an invalid result meets no bar
    assert bench.decode_report.bar_counts([a, b, c, d]) == {"copy": (0, 1), "cudnn": (2, 3), "paged": (1, 2)}


@pytest.mark.parametrize("change, bar, expected", [
    ({"cupyflash": 3.3}, "copy", False),  # 0.825 of the copy bandwidth
    ({"torch-cudnn": 3.7}, "cudnn", False),
    ({"cupyflash-paged256": 3.2}, "paged", False),  # 0.89 of contiguous
    ({"cupyflash-paged16": None}, "paged", True),  # a paged layout without a number is not judged
    ({"torch-cudnn": None}, "cudnn", None),
], ids=["copy", "cudnn", "paged", "paged-missing", "cudnn-missing"])
def test_decode_bars_can_fail(change: dict, bar: str, expected: bool | None) -> None:
    cell = DECODE_CELLS[0]
    rates = {"cupyflash": 3.6, "cupyflash-paged16": 3.3, "cupyflash-paged256": 3.5, "torch-cudnn": 3.0, **change}
    rows = [_decode_row(impl, cell, rate) for impl, rate in rates.items()]
    assert bench.summarize_decode(rows)[0]["meets"][bar] is expected


def test_decode_bars_with_an_invalid_peer() -> None:
    cell = DECODE_CELLS[0]
    rows = [_decode_row("cupyflash", cell, 3.6), _decode_row("torch-cudnn", cell, 1.0, valid=False)]
    entry = bench.summarize_decode(rows)[0]
    assert entry["meets"]["cudnn"] is None and math.isclose(entry["cudnn_ratio"], 3.6)  # a wrong peer is no yardstick


def test_format_decode_table() -> None:
    text = bench.format_decode_table(_decode_report())
    lines = text.splitlines()
    assert lines[0].startswith("**Decode TB/s** (K and V bytes read once over the median of 10 runs; copy bandwidth "
                               "4.00 TB/s, read + written) — ")
    assert "Test GPU 80GB" in lines[0] and "commit aaaaaaaaaaaa" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["dtype", "D", "Sq", "B", "cache", "Hq/Hkv", "cupyflash", "cupyflash-paged16",
                      "cupyflash-paged256", "torch-cudnn", "torch-flash", "cupyflash µs", "of copy", "/ cuDNN", "needed",
                      "paged / contiguous", "copy bar", "cuDNN bar", "paged bar"]
    a, b, c, d = _table_rows(text)
    assert a == ["bfloat16", "128", "1", "64", "4k", "32/8", "3.60", "3.30", "3.50", "3.00", "2.00", "298",
                 "90%", "1.20", "1.0", "16: 0.92 · 256: 0.97", "yes", "yes", "yes"]
    assert b[6:] == ["1.00", "-", "-", "0.60", "-", "2.1", "25%", "1.67",
                     "2.0", "-", "-", "NO", "-"]
    assert c[4] == "128k" and c[6:11] == ["-"] * 5 and c[-3:] == ["-", "-", "-"]
    assert d[6:8] == ["2.00 ✗", "2.00"] and d[13] == "✗" and d[-3:] == ["-", "NO", "NO"]
    assert "- torch-cudnn: enable_gqa; no mask: one query token sees every key (2 cells) | enable_gqa; boolean" in text
    assert "bottom-right causal (SDPA's is_causal is top-left) (1 cell)" in text
    assert "- torch-flash: repeat_interleave; no mask" in text and "peers: torch 2.11.0" in text
    assert ">= 0.85 x the copy bandwidth" in text and ">= 2.0x at 8 and 16 query tokens" in text


def test_decode_report_files(tmp_path: Path) -> None:
    report = _decode_report()
    assert bench.decode_stem(report) == "bench-decode-test-gpu-80gb-2026-11-24"
    paths = bench.save_decode(report, tmp_path)
    assert [p.name for p in paths] == ["bench-decode-test-gpu-80gb-2026-11-24.json",
                                       "bench-decode-test-gpu-80gb-2026-11-24.md"]
    markdown = paths[1].read_text()
    assert markdown == bench.format_decode_report(report) and markdown.startswith(bench.format_decode_table(report))
    assert ("14 results: 1 failed validation, 1 raised, 3 skipped for memory; bars missed: copy 0 of 1, cudnn 2 of 3, "
            "paged 1 of 2.") in markdown
    assert f"- {DECODE_CELLS[1].id} torch-flash raised: RuntimeError: torch-flash declined every way tried" in markdown
    assert f"- {DECODE_CELLS[3].id} cupyflash: out: max|ours - ref64| = nan" in markdown
    assert f"- {DECODE_CELLS[2].id} cupyflash: skipped: memory" in markdown
    assert "first call 700 ms, 2 new cubins" in markdown
    loaded = bench.load(paths[0])
    assert loaded["kind"] == "decode" and loaded["rows"][11]["error"] == "nan" and loaded["copy"]["tbps"] == 4.0
    assert bench.format_decode_table(loaded) == bench.format_decode_table(report)


def test_plot_decode_series() -> None:
    report = _decode_report()
    series = bench.plot_decode_series(report)
    a, b, _, _ = DECODE_CELLS
    assert set(series) == {("32/8", 1), ("8/1", 8), ("8/1", 1)}
    assert series[("32/8", 1)]["cupyflash"] == [(a.tokens, pytest.approx(3.6))]
    assert "torch-flash" not in series[("8/1", 8)] and "cupyflash" not in series[("8/1", 1)]  # failed, invalid
    assert bench.plot_decode_series(report, dtype="float16") == {}


def test_plot_decode_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(RuntimeError, match="matplotlib"):
        bench.plot_decode(_decode_report(), tmp_path / "x.png")


def test_plot_decode_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = bench.plot_decode(_decode_report(), tmp_path / "plots" / "decode.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="float16"):
        bench.plot_decode(_decode_report(), tmp_path / "none.png", dtype="float16")


# --------------------------------------------------------------------------- varlen validation cases


def test_varlen_validation_cases() -> None:
    for quick in (False, True):
        cases = validation.varlen_matrix(quick)
        assert len({c.id for c in cases}) == len(cases)
        assert {c.dtype for c in cases} == {"float16", "bfloat16"} and {c.causal for c in cases} == {False, True}
        assert {c.group for c in cases} == {1, 4} and any(c.head_dim % 2 for c in cases)  # GQA, an odd head dim
        for case in cases:
            assert len(case.lengths_q) == len(case.lengths_k) == 3
            lengths = case.lengths_q + case.lengths_k
            assert 0 in lengths and 1 in lengths and max(case.lengths_q) > 128
    assert len(validation.varlen_matrix(quick=True)) < len(validation.varlen_matrix())
    assert validation.VarlenCase("float16", 37, True, (0, 1, 203), (0, 1, 203), 4).id == \
        "varlen-float16-d37-causal-q0,1,203-k0,1,203-g4"
    assert max(len(c.id) for c in validation.varlen_matrix()) <= validate_report_width()
    cpu = validation.cpu_varlen_matrix(quick=True)
    assert {c.causal for c in cpu} == {False, True} and {(c.lengths_q, c.lengths_k) for c in cpu} == set(
        validation.VARLEN_LENGTHS)


def validate_report_width() -> int:
    from cupyflash import validate_report

    return validate_report.CASE_WIDTH


def test_block_diagonal_mask_is_bottom_right_per_sequence() -> None:
    mask = validation.block_diagonal_mask((2, 0, 3), (4, 2, 1), causal=True)
    expected = np.zeros((5, 7), dtype=bool)
    expected[0, 0:3] = True  # sequence 0: query 0 of 2 sits at key 2 of 4
    expected[1, 0:4] = True
    expected[4, 6] = True  # sequence 2: 3 queries, 1 key: only the last query sees it
    assert np.array_equal(mask, expected)


def test_masked_attention_of_one_sequence_is_the_reference() -> None:
    data = {n: a[0].astype(np.float64) for n, a in _host_inputs(1, 9, 13, 4, 8, heads_kv=2).items()}
    mask = validation.block_diagonal_mask((9,), (13,), causal=True)
    ours = validation.masked_attention(data["q"], data["k"], data["v"], data["dout"], mask)
    batched = {n: a[None] for n, a in data.items()}
    out, lse = reference.attention_forward(batched["q"], batched["k"], batched["v"], causal=True)
    grads = reference.attention_backward(batched["dout"], batched["q"], batched["k"], batched["v"], causal=True)
    for name, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        np.testing.assert_allclose(ours[name], ref[0], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("case", validation.cpu_varlen_matrix(quick=True), ids=lambda c: c.id)
def test_cpu_varlen_cases_pass(case: validation.VarlenCpuCase) -> None:
    errors = validation.run_cpu_varlen_case(case)
    assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
    assert all(error <= validation.CPU_TOLERANCE for error in errors.values()), errors


def test_cpu_varlen_check_catches_a_wrong_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-sequence reference aligned top-left instead of bottom-right fails the check."""
    real = validation.sequence_reference

    def top_left(packed: dict, rows: slice, keys: slice, **options: object) -> dict:
        q_len, k_len = rows.stop - rows.start, keys.stop - keys.start
        shift = min(q_len, k_len)  # top-left causal = bottom-right causal of the first min(Sq, Sk) keys
        result = real(packed, rows, slice(keys.start, keys.start + shift), **options)
        for name in ("dk", "dv"):
            result[name] = np.concatenate([result[name], np.zeros((k_len - shift, *result[name].shape[1:]))])
        return result

    monkeypatch.setattr(validation, "sequence_reference", top_left)
    errors = validation.run_cpu_varlen_case(validation.VarlenCpuCase((150, 0, 1), (333, 5, 64), 16, 32, True))
    assert errors["out"] > 1e-3


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif("flash-attn-4" not in bench.available_impls(), reason="flash-attn-4 (an optional peer) not installed")
def test_flash_attn_4_peer_is_checked_like_the_others() -> None:
    """Where the optional peer is installed (a Hopper or Blackwell GPU), its results pass the
    same check as ours, forward and backward, or the row says why it did not run."""
    shape = BenchShape("bfloat16", 128, 256, True, 2, 4)
    report = bench.run([shape], impls=["cupyflash", "flash-attn-4"], runs=2, warmup=1)
    rows = {(r["impl"], r["pass"]): r for r in report["rows"]}
    for pass_ in ("fwd", "bwd"):
        row = rows[("flash-attn-4", pass_)]
        assert row.get("failure") or (row["valid"] is True and row["ms"] > 0), row
    assert report["environment"]["flash_attn_4_version"]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_run_tiny_shape(dtype: str) -> None:
    shapes = [BenchShape(dtype, 64, 256, True, 2, 4)]
    messages: list[str] = []
    report = bench.run(shapes, runs=2, warmup=1, progress=messages.append)
    rows = {(r["impl"], r["pass"]): r for r in report["rows"]}
    assert len(messages) == len(report["rows"])
    for key in (("cupyflash", "fwd"), ("cupyflash", "bwd"), ("cupyflash-det", "bwd")):
        row = rows[key]
        assert row.get("failure") is None, row
        assert row["valid"] is True and row["check"] == "full" and row["error"] <= 1, row
        assert row["ms"] > 0 and row["tflops"] > 0
        assert row["peak_extra_mb"] >= row["output_mb"] > 0
    naive = rows[("naive-cupy", "fwd")]
    # a peer judged like the others (it rounds S and dP to the dtype, so it may fail the rule)
    assert naive["ms"] > 0 and naive["valid"] in (True, False) and naive["check"] == "full" and naive["runs"] == 2
    assert naive["peak_extra_mb"] - naive["output_mb"] >= bench.naive_score_bytes(shapes[0]) / bench.MIB  # S x S
    for impl in ("torch-flash", "torch-cudnn", "torch-efficient"):
        if (impl, "fwd") in rows and rows[(impl, "fwd")].get("failure") is None:
            assert rows[(impl, "fwd")]["valid"] is True, rows[(impl, "fwd")]
    assert "cupyflash" in bench.format_table(report, "fwd")


@pytest.mark.gpu
@needs_gpu
def test_reference_falls_back_to_the_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.check, "REFERENCE_MEMORY_FRACTION", 0.0)  # no head of the reference fits
    monkeypatch.setattr(bench.peers, "NAIVE_MEMORY_FRACTION", 0.0)  # nor does naive-cupy
    shape = BenchShape("float16", 128, 512, False, 2, 4)
    report = bench.run([shape], impls=["cupyflash", "naive-cupy"], runs=2, warmup=1)
    rows = {(r["impl"], r["pass"]): r for r in report["rows"]}
    assert rows[("naive-cupy", "fwd")]["note"].startswith("skipped")
    assert rows[("cupyflash", "fwd")]["check"] == "slice" and rows[("cupyflash", "fwd")]["valid"] is True
    assert rows[("cupyflash", "bwd")]["check"] == "slice" and set(rows[("cupyflash", "bwd")]["errors"]) == {"dq"}


@pytest.mark.gpu
@needs_gpu
def test_run_varlen_tiny_batches() -> None:
    """run_varlen end to end on two small batches: every row checked, the ratios summarized."""
    batches = [bench.equal_batch("float16", 64, 2, 256, True, hidden=256),
               bench.mixed_batch("bfloat16", 64, count=4, low=17, high=300, hidden=256)]
    messages: list[str] = []
    report = bench.run_varlen(batches, runs=2, warmup=1, progress=messages.append)
    assert report["kind"] == "varlen" and len(messages) == len(report["rows"])
    rows = {(r["id"], r["impl"], r["pass"]): r for r in report["rows"]}
    for batch in batches:
        for impl in ("cupyflash-varlen", "cupyflash-dense"):
            for pass_ in ("fwd", "bwd"):
                row = rows[(batch.id, impl, pass_)]
                assert row.get("failure") is None, row
                assert row["valid"] is True and row["check"] == "full" and row["error"] <= 1, row
                assert row["ms"] > 0 and row["tflops"] > 0
    peer = report["settings"]["peer"]
    if peer is not None:
        for batch in batches:
            row = rows[(batch.id, peer, "fwd")]
            assert row.get("failure") is not None or row["valid"] is True, row
    assert [(s["id"], s["pass"]) for s in report["summary"]] == [(b.id, p) for b in batches for p in ("fwd", "bwd")]
    assert all(isinstance(s["ratio"], float) for s in report["summary"])
    assert "Variable-length TFLOP/s" in bench.format_varlen_table(report)


@pytest.mark.gpu
@needs_gpu
def test_run_decode_tiny_cells() -> None:
    """run_decode end to end on two small cells: the copy bandwidth measured, every cupyflash
    row (contiguous and paged) checked and timed, the peers valid or failed, the bars summarized."""
    cells = [DecodeCell("bfloat16", 128, 8, 2, 1, 2, 1024, (16, 256)),
             DecodeCell("float16", 128, 4, 1, 4, 3, 512, (16,))]
    messages: list[str] = []
    report = bench.run_decode(cells, runs=2, warmup=1, progress=messages.append)
    assert report["kind"] == "decode" and report["copy"]["tbps"] > 0
    assert len(messages) == len(report["rows"]) + 1  # the copy bandwidth's line first
    rows = {(r["id"], r["impl"]): r for r in report["rows"]}
    for cell in cells:
        for impl in bench.decode.cell_impls(cell, ()):
            row = rows[(cell.id, impl)]
            assert row.get("failure") is None, row
            assert row["valid"] is True and row["check"] == "full" and row["error"] <= 1, row
            assert row["ms"] > 0 and row["tbps"] > 0 and row["copy_fraction"] > 0 and row["timed"] == "interleaved"
        for impl in report["settings"]["peers"]:
            row = rows[(cell.id, impl)]
            assert row.get("failure") is not None or row["valid"] is True, row
    assert [s["id"] for s in report["summary"]] == [c.id for c in cells]
    assert [set(s["paged_ratio"]) for s in report["summary"]] == [{"16", "256"}, {"16"}]
    assert "Decode TB/s" in bench.format_decode_table(report)
