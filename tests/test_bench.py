"""Tests of cupyflash.bench.

Without a GPU: the grid, FLOP counts, the naive and slice references (run with NumPy against
the float64 reference), the tables, JSON files, plot data and the environment record. With a
GPU (marked `gpu`): one tiny shape through run(), every implementation that is installed.
Neither PyTorch nor matplotlib is needed; the plot test runs only where matplotlib is.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cupyflash import bench, build, reference
from cupyflash.bench import BenchShape
from cupyflash.device import DeviceLimits, gpu_count

needs_gpu = pytest.mark.skipif(gpu_count() == 0, reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- grid and FLOPs


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


# --------------------------------------------------------------------------- references in NumPy


def _host_inputs(batch: int, seqlen_q: int, seqlen_k: int, heads: int, head_dim: int,
                 dtype: str = "float16") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((batch, seqlen_q, heads, head_dim), np.float32)
    k, v = (rng.standard_normal((batch, seqlen_k, heads, head_dim), np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape, np.float32)
    return {n: a.astype(bench.numpy_dtype(dtype)) for n, a in (("q", q), ("k", k), ("v", v), ("dout", dout))}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_naive_matches_float64_reference(causal: bool) -> None:
    x = _host_inputs(2, 37, 37, 3, 16)
    p, out = bench.naive_forward(x["q"], x["k"], x["v"], causal, np)
    assert p.dtype == np.float16 and out.dtype == np.float16 and out.shape == (2, 3, 37, 16)
    ref_out, _ = reference.attention_forward(x["q"], x["k"], x["v"], causal=causal)
    assert bench.relative_error(out.transpose(0, 2, 1, 3), ref_out) < 2e-3
    grads = bench.naive_backward(x["dout"], x["q"], x["k"], x["v"], p, out, np)
    ref_grads = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], causal=causal)
    for name, ours, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert ours.dtype == np.float16, name
        assert bench.relative_error(ours.transpose(0, 2, 1, 3), ref) < 5e-3, name


def test_naive_bfloat16_runs_in_float32() -> None:
    x = _host_inputs(1, 24, 24, 2, 8, "bfloat16")
    p, out = bench.naive_forward(x["q"], x["k"], x["v"], True, np)
    assert p.dtype == out.dtype == np.float32
    ref_out, _ = reference.attention_forward(x["q"], x["k"], x["v"], causal=True)
    assert bench.relative_error(out.transpose(0, 2, 1, 3), ref_out) < 1e-5
    grads = bench.naive_backward(x["dout"], x["q"], x["k"], x["v"], p, out, np)
    ref_grads = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], causal=True)
    for ours, ref in zip(grads, ref_grads):
        assert bench.relative_error(ours.transpose(0, 2, 1, 3), ref) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", [(50, 50), (20, 45), (45, 45)], ids=["50x50", "20x45", "45x45"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_slice_reference_matches_float64(causal: bool, lengths: tuple[int, int], dtype: str) -> None:
    seqlen_q, seqlen_k = lengths
    rows = 16
    x = _host_inputs(2, seqlen_q, seqlen_k, 3, 8, dtype)
    got = bench.slice_reference(x["q"], x["k"], x["v"], x["dout"], causal, rows, np)
    ref_out, _ = reference.attention_forward(x["q"], x["k"], x["v"], causal=causal)
    ref_dq, _, _ = reference.attention_backward(x["dout"], x["q"], x["k"], x["v"], causal=causal)
    assert got["out"].shape == got["dq"].shape == (rows, 3, 8)
    np.testing.assert_allclose(got["out"], ref_out[0, -rows:], rtol=0, atol=2e-5)
    np.testing.assert_allclose(got["dq"], ref_dq[0, -rows:], rtol=0, atol=2e-5)


def test_slice_reference_with_fewer_rows_than_asked() -> None:
    x = _host_inputs(1, 10, 10, 2, 8)
    got = bench.slice_reference(x["q"], x["k"], x["v"], x["dout"], True, 64, np)
    assert got["out"].shape == (10, 2, 8)


def test_to_float32_reads_bfloat16_bits() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    assert np.array_equal(bench.to_float32(values.astype(bench.numpy_dtype("bfloat16"))), values)
    assert bench.to_float32(values.astype(np.float16)).dtype == np.float32


def test_relative_error() -> None:
    ref = np.array([1.0, -4.0, 2.0], np.float32)
    assert bench.relative_error(ref, ref) == 0.0
    assert math.isclose(bench.relative_error(ref + np.float32(0.02), ref), 0.02 / 4, rel_tol=1e-5)
    assert math.isnan(bench.relative_error(np.array([1.0, np.nan, 2.0], np.float32), ref))
    assert math.isnan(bench.relative_error(np.array([1.0, np.inf, 2.0], np.float32), ref))
    assert bench.relative_error(np.ones(2, np.float32), np.zeros(2, np.float32)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        bench.relative_error(np.ones(2), np.ones(3))


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
           "tflops": tflops, "valid": valid, "error": 1e-3 if valid is not None else None, "check": "naive"}
    row.update(extra)
    return row


def _fake_report() -> dict:
    a = BenchShape("float16", 64, 1024, False, 16, 32)
    b = BenchShape("float16", 64, 4096, True, 4, 32)
    rows = [
        _fake_row("cupyflash", "fwd", a, 300.0, peak_extra_mb=128.25, output_mb=64.0, first_call_ms=950.0,
                  new_cubins=1),
        _fake_row("naive-cupy", "fwd", a, 80.0, valid=None, check=None, reference=True),
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
                                           _fake_row("naive-cupy", "bwd", shape, 7.25, valid=None, check=None,
                                                     reference=True)]}
    assert _table_rows(bench.format_table(report, "bwd")) == [["bfloat16", "128", "2048", "0", "123 ?", "7.2"]]


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
    assert bench._plot_choice(report, None, None) == ("float16", False)
    assert bench._plot_choice(report, None, True) == ("float16", True)
    for row in report["rows"]:
        row["dtype"], row["causal"] = "bfloat16", True
    assert bench._plot_choice(report, None, None) == ("bfloat16", True)
    assert bench._plot_choice(report, "float16", None) == ("float16", False)  # absent: plot() then says so


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
    # deterministic one has its own two kernels
    assert entries == [("fwd", "flash_fwd_sm90"), ("bwd", "flash_bwd_delta"), ("bwd", "flash_bwd_dkdv_sm90"),
                       ("bwd", "flash_bwd_convert_dq_tiled"), ("bwd-det", "flash_bwd_dkdv_sm90"),
                       ("bwd-det", "flash_bwd_dq")]
    for r in rows:
        assert r["seconds"] >= 0 and r["arch"] == ("sm_90a" if r["entry"].endswith("_sm90") else "sm_90")
        assert "failure" not in r, r  # every default kernel compiles
        # (registers is None only when NVRTC served the program from its own cache, with no log)
        assert r["registers"] is None or (r["registers"] > 0 and r["spill_bytes"] == 0), r
    convert = next(r for r in rows if r["entry"] == "flash_bwd_convert_dq_tiled")
    assert convert["memoized"] is True  # one program with flash_bwd_delta, compiled just before


# --------------------------------------------------------------------------- on a GPU


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
        assert row["valid"] is True and row["check"] == "naive", row
        assert row["ms"] > 0 and row["tflops"] > 0
        assert row["peak_extra_mb"] >= row["output_mb"] > 0
    naive = rows[("naive-cupy", "fwd")]
    assert naive["ms"] > 0 and naive.get("reference") is True and naive["runs"] == 2
    assert naive["peak_extra_mb"] - naive["output_mb"] >= bench.naive_score_bytes(shapes[0]) / bench.MIB  # S x S
    for impl in ("torch-flash", "torch-cudnn", "torch-efficient"):
        if (impl, "fwd") in rows and rows[(impl, "fwd")].get("failure") is None:
            assert rows[(impl, "fwd")]["valid"] is True, rows[(impl, "fwd")]
    assert "cupyflash" in bench.format_table(report, "fwd")


@pytest.mark.gpu
@needs_gpu
def test_reference_falls_back_to_the_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "NAIVE_MEMORY_FRACTION", 0.0)  # naive never fits
    shape = BenchShape("float16", 128, 512, False, 2, 4)
    report = bench.run([shape], impls=["cupyflash", "naive-cupy"], runs=2, warmup=1)
    rows = {(r["impl"], r["pass"]): r for r in report["rows"]}
    assert rows[("naive-cupy", "fwd")]["note"].startswith("skipped")
    assert rows[("cupyflash", "fwd")]["check"] == "slice" and rows[("cupyflash", "fwd")]["valid"] is True
    assert rows[("cupyflash", "bwd")]["check"] == "slice" and set(rows[("cupyflash", "bwd")]["errors"]) == {"dq"}
