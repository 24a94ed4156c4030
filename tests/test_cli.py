"""The ``cupyflash`` command through click's CliRunner.

The real GPU-less paths run as they are. The GPU paths (validate with a GPU, bench) are driven
with the GPU count, the validation matrix and the bench module replaced by fakes: what is tested
is the shell's plumbing and printing, the kernels themselves are tested by the GPU suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner, Result

import cupyflash
from cupyflash import cli, environment, kvcache_cases, tuning, validate_report, validation
from cupyflash.kernels.flash_fwd import FwdConfig
from cupyflash.device import DeviceLimits, gpu_count
from cupyflash.tolerance import Comparison

REPO = Path(__file__).resolve().parents[1]
no_real_gpu = pytest.mark.skipif(gpu_count() > 0, reason="checks the real behaviour without a CUDA GPU")
H100 = DeviceLimits("NVIDIA H100 80GB HBM3", (9, 0), 132, 232448, 233472)


def invoke(*args: str) -> Result:
    try:
        runner = CliRunner(mix_stderr=False)  # click 8.1: keep stderr out of stdout
    except TypeError:
        runner = CliRunner()  # click >= 8.2 always keeps them apart
    return runner.invoke(cli.cli, list(args))


def everything(result: Result) -> str:
    """stdout and stderr together."""
    return result.stdout + (result.stderr or "")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Caches in a temporary folder, so `info` reads what the test put there."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CUPYFLASH_CACHE_DIR", str(root))
    monkeypatch.delenv("CUPYFLASH_TUNING_DIR", raising=False)
    return root


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["info"], ["validate"], ["bench"], ["autotune"]],
                         ids=["group", "info", "validate", "bench", "autotune"])
def test_help(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, everything(result)
    assert result.stdout.startswith("Usage: ")
    assert "--json" in result.stdout or not command


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert cupyflash.__version__ in result.stdout


def test_main_runs_the_group_in_a_process(tmp_path: Path) -> None:
    """The console-script entry point, with its exit codes (2 for a bad option value)."""
    command = [sys.executable, "-c", "from cupyflash.cli import main; main()"]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(command + ["--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and cupyflash.__version__ in ok.stdout, ok.stderr
    bad = subprocess.run(command + ["bench", "--shape", "1,2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "four positive integers B,S,H,D" in bad.stderr


@pytest.mark.parametrize("module", ["cupyflash.cli", "cupyflash"])
def test_python_m_help_lists_every_command(tmp_path: Path, module: str) -> None:
    """`python -m cupyflash.cli --help`: main() runs only after every command is registered."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.split("Commands:\n")[1].splitlines() if line.strip()]
    assert listed == ["autotune", "bench", "info", "validate"], done.stdout


# --------------------------------------------------------------------------- info


def test_info_text() -> None:
    result = invoke("info")
    assert result.exit_code == 0, everything(result)
    for label in ("cupyflash", "python", "numpy", "cupy", "cuda runtime", "cuda driver", "nvrtc", "kernel sources",
                  "source hash", "kernel cache", "tuning dir"):
        assert f"\n{label} " in "\n" + result.stdout, label
    from cupyflash import build

    assert str(build.kernel_dir()) in result.stdout and build.source_hash() in result.stdout


def _write_cache(root: Path) -> None:
    (root / "kernels").mkdir(parents=True)
    for name in ("a.cubin", "b.cubin", "a.json"):
        (root / "kernels" / name).write_bytes(b"x")
    (root / "tuning").mkdir()
    entries = {"fwd/float16/d64/full/s1024/mha": {"config": {}}, "fwd/float16/d128/full/s1024/mha": {"config": {}}}
    (root / "tuning" / "GPU_A-sm_90.json").write_text(json.dumps({"header": {}, "entries": entries}))
    (root / "tuning" / "GPU_B-sm_80.json").write_text("{not json")
    (root / "tuning" / "GPU_C-sm_86.json").write_text("[1, 2]")


def test_info_json_reports_the_caches(isolated_cache: Path) -> None:
    _write_cache(isolated_cache)
    result = invoke("info", "--json")
    assert result.exit_code == 0, everything(result)
    facts = json.loads(result.stdout)
    assert facts["cupyflash"] == cupyflash.__version__
    assert facts["kernel_cache_dir"] == str(isolated_cache / "kernels") and facts["cubins"] == 2
    assert facts["tuning_dir"] == str(isolated_cache / "tuning")
    assert facts["tuned"] == [{"file": "GPU_A-sm_90.json", "entries": 2},
                              {"file": "GPU_B-sm_80.json", "entries": "unreadable"},
                              {"file": "GPU_C-sm_86.json", "entries": "unreadable"}]


def test_info_text_lists_tuned_files(isolated_cache: Path) -> None:
    _write_cache(isolated_cache)
    result = invoke("info")
    assert "(2 cubins)" in result.stdout
    assert "GPU_A-sm_90.json" in result.stdout and "2 entries" in result.stdout
    assert "GPU_B-sm_80.json" in result.stdout and "unreadable" in result.stdout


def test_info_long_tuning_file_name_keeps_a_space(isolated_cache: Path) -> None:
    """A file name longer than the label column is followed by a space; the files share a column."""
    folder = isolated_cache / "tuning"
    folder.mkdir(parents=True)
    long = "NVIDIA_H100_80GB_HBM3_with_a_long_name-sm_90.json"
    (folder / long).write_text(json.dumps({"header": {}, "entries": {"fwd/float16/d64/full/s1024/mha": {}}}))
    (folder / "A-sm_80.json").write_text("{not json")
    lines = invoke("info").stdout.splitlines()
    assert f"  {long} 1 entry" in lines
    assert f"  {'A-sm_80.json':<{len(long)}} unreadable" in lines
    assert f"tuning dir      {folder}" in lines  # the other rows keep their column


def test_info_flags_an_unusable_kernel_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = "kernel cache /nowhere/kernels is not writable (PermissionError): kernels compile in memory"
    monkeypatch.setattr(cupyflash.build, "disk_cache_problem", lambda: problem, raising=False)
    assert json.loads(invoke("info", "--json").stdout)["kernel_cache_problem"] == problem
    lines = invoke("info").stdout.splitlines()
    assert lines[lines.index(f"  WARNING       {problem}") - 1].startswith("kernel cache    ")


def test_info_kernel_cache_that_is_a_file(isolated_cache: Path) -> None:
    """The real check: a file where the kernel folder should be is reported, not fatal."""
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "kernels").write_bytes(b"not a folder")
    result = invoke("info", "--json")
    assert result.exit_code == 0, everything(result)
    assert str(isolated_cache / "kernels") in json.loads(result.stdout)["kernel_cache_problem"]
    assert "\n  WARNING       kernel cache " in invoke("info").stdout


def test_info_usable_kernel_cache_has_no_warning() -> None:
    assert json.loads(invoke("info", "--json").stdout)["kernel_cache_problem"] is None
    assert "WARNING" not in invoke("info").stdout


@no_real_gpu
def test_info_without_gpu() -> None:
    facts = json.loads(invoke("info", "--json").stdout)
    assert facts["gpus"] == []
    assert "GPUs            none visible" in invoke("info").stdout


def test_info_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "cupy_module", lambda: None)
    facts = json.loads(invoke("info", "--json").stdout)
    assert facts["cupy"] == "not installed"
    assert facts["cuda_runtime"] == facts["cuda_driver"] == facts["nvrtc"] == "unavailable (CuPy not installed)"


def test_info_with_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "gpu_count", lambda: 2)
    monkeypatch.setattr(environment, "device_limits",
                        lambda i: H100 if i == 0 else (_ for _ in ()).throw(RuntimeError("lost")))
    facts = json.loads(invoke("info", "--json").stdout)
    assert facts["gpus"][0] == {"id": 0, "name": H100.name, "compute_capability": "9.0", "arch": "sm_90",
                                "sm_count": 132, "smem_per_block_optin": 232448, "smem_per_sm": 233472}
    assert facts["gpus"][1] == "unavailable (lost)"
    assert "GPU 0           NVIDIA H100 80GB HBM3, sm_90 (compute capability 9.0), 132 SMs" in invoke("info").stdout


# --------------------------------------------------------------------------- validate without a GPU


@no_real_gpu
def test_validate_quick_without_gpu() -> None:
    result = invoke("validate", "--quick")
    assert result.exit_code == 0, everything(result)
    assert validate_report.NO_GPU_VALIDATE in result.stdout
    lines = result.stdout.splitlines()
    assert lines[1].split()[:6] == ["case", "out", "lse", "dq", "dk", "dv"]
    rows = [line for line in lines if line.endswith("  pass")]
    varlen = validation.cpu_varlen_matrix(quick=True)
    assert varlen and len(rows) == len(validation.cpu_matrix(quick=True)) + len(varlen)
    assert [row.split()[0] for row in rows[-len(varlen):]] == [case.id for case in varlen]
    assert f"{len(rows)} cases: all passed" in result.stdout
    assert "varlen cases: tiled and reference.py per sequence" in lines[0]


def test_validate_json_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    result = invoke("validate", "--quick", "--json")
    assert result.exit_code == 0, everything(result)
    report = json.loads(result.stdout)
    assert report["gpu"] is False and report["failures"] == 0 and report["note"] == validate_report.NO_GPU_VALIDATE
    assert len(report["rows"]) == report["cases"] == len(validation.cpu_matrix(quick=True)) + report["varlen_cases"]
    assert report["varlen_cases"] == len(validation.cpu_varlen_matrix(quick=True)) > 0
    assert all(row["ok"] and row["out"] <= validation.CPU_TOLERANCE for row in report["rows"])
    assert validate_report.NO_GPU_VALIDATE in result.stderr


def test_validate_cpu_failure_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(validation, "cpu_matrix", lambda quick: [validation.CpuCase(3, 5, 2, 2, True)])
    monkeypatch.setattr(validation, "cpu_varlen_matrix", lambda quick: [])
    monkeypatch.setattr(validation, "run_cpu_case", lambda case: {"out": 1e-3, "lse": 0.0, "dq": float("nan"),
                                                                  "dk": 0.0, "dv": 0.0})
    result = invoke("validate", "--quick")
    assert result.exit_code == 1
    assert "  FAIL" in result.stdout and "1 FAILED" in result.stdout and validate_report.NO_GPU_VALIDATE in result.stdout


def test_validate_text_without_gpu_says_no_gpu_kernels_were_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(validation, "cpu_matrix", lambda quick: [validation.CpuCase(3, 5, 2, 2, True)])
    monkeypatch.setattr(validation, "cpu_varlen_matrix", lambda quick: [])
    result = invoke("validate")
    assert result.exit_code == 0, everything(result)
    assert "1 cases: all passed; GPU kernels validated: no" in result.stdout
    assert json.loads(invoke("validate", "--json").stdout)["gpu_kernels_validated"] is False


IGNORED_NOTE = "{} ignored: it applies to the GPU kernels, and without a GPU none are validated"


@pytest.mark.parametrize("options, ignored", [([], []), (["--deterministic"], ["--deterministic"]),
                                              (["--deterministic", "--inject-config", '{"block_m": 64}'],
                                               ["--deterministic", "--inject-config"])],
                         ids=["none", "deterministic", "deterministic-and-inject-config"])
def test_validate_without_gpu_names_the_ignored_gpu_options(monkeypatch: pytest.MonkeyPatch, options: list[str],
                                                            ignored: list[str]) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(validation, "cpu_matrix", lambda quick: [validation.CpuCase(3, 5, 2, 2, True)])
    monkeypatch.setattr(validation, "cpu_varlen_matrix", lambda quick: [])
    text, as_json = invoke("validate", *options), invoke("validate", "--json", *options)
    assert text.exit_code == as_json.exit_code == 0, everything(text) + everything(as_json)
    notes = [IGNORED_NOTE.format(option) for option in ignored]
    assert [line for line in text.stdout.splitlines() if " ignored: " in line] == notes
    assert json.loads(as_json.stdout)["ignored_options"] == ignored
    assert [line for line in as_json.stderr.splitlines() if " ignored: " in line] == notes


def test_validate_require_gpu_without_gpu_exits_2_before_the_cpu_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(environment, "cupy_module", lambda: None)
    monkeypatch.setattr(validation, "cpu_matrix", lambda quick: pytest.fail("the CPU check ran"))
    result = invoke("validate", "--require-gpu", "--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert everything(result).strip() == ("Error: --require-gpu: no CUDA GPU found (CuPy not installed), "
                                          "so no GPU kernels can be validated")


# --------------------------------------------------------------------------- validate with a (fake) GPU

CASES = [validation.Case("float16", 64, False, 113, 203), validation.Case("bfloat16", 128, True, 1, 1, group=4)]


def _comparison(name: str, error: float) -> Comparison:
    return Comparison(name, error, 1e-3, 4.9e-4, (0, 1, 2, 3), 0.5 + error, 0.5)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One H100 and a two-case matrix; each run records its arguments."""
    calls: dict[str, Any] = {"run": []}
    monkeypatch.setattr(cli, "gpu_count", lambda: 1)
    for module in (cli, validate_report):  # autotune asks in cli, the validate header in validate_report
        monkeypatch.setattr(module, "current_device_id", lambda: 0)
    for module in (cli, environment):
        monkeypatch.setattr(module, "device_limits", lambda i: H100)

    def gpu_matrix(quick: bool) -> list[validation.Case]:
        calls["quick"] = quick
        return CASES

    def varlen_matrix(quick: bool) -> list[validation.VarlenCase]:
        calls["varlen_quick"] = quick
        return []  # tests of varlen cases put some in

    monkeypatch.setattr(validation, "gpu_matrix", gpu_matrix)
    monkeypatch.setattr(validation, "varlen_matrix", varlen_matrix)
    monkeypatch.setattr(kvcache_cases, "decode_matrix", lambda quick: [])  # tests of cache cases put some in
    return calls


def _fake_run(calls: dict[str, Any], errors: dict[str, float]) -> Any:
    def run_gpu_case(case: validation.Case, *, deterministic: bool = False) -> list[Comparison]:
        calls["run"].append((case.id, deterministic))
        return [_comparison(name, errors.get(name, 1e-3)) for name in ("out", "lse", "dq", "dk", "dv")]
    return run_gpu_case


def test_validate_gpu_pass(fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {}))
    result = invoke("validate", "--quick", "--deterministic")
    assert result.exit_code == 0, everything(result)
    assert fake_gpu["quick"] is True and fake_gpu["run"] == [(case.id, True) for case in CASES]
    assert "GPU 0: NVIDIA H100 80GB HBM3, sm_90" in result.stdout
    assert "2 cases, 10 rows: all passed" in result.stdout
    assert f"{CASES[0].id:<{validate_report.CASE_WIDTH}} dq      1.000e-03  1.000e-03    1.00  pass" in result.stdout
    assert validate_report.NO_GPU_VALIDATE not in result.stdout


def test_validate_gpu_says_gpu_kernels_were_validated(fake_gpu: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {}))
    result = invoke("validate", "--require-gpu")
    assert result.exit_code == 0, everything(result)
    assert "2 cases, 10 rows: all passed; GPU kernels validated: yes" in result.stdout
    report = json.loads(invoke("validate", "--json", "--require-gpu", "--deterministic").stdout)
    assert report["gpu_kernels_validated"] is True and report["ignored_options"] == []
    assert report["deterministic"] is True


def test_validate_gpu_failure_names_tensor_and_coordinate(fake_gpu: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {"dk": 0.5, "lse": float("nan")}))
    result = invoke("validate")
    assert result.exit_code == 1
    assert fake_gpu["quick"] is False and fake_gpu["run"][0] == (CASES[0].id, False)
    assert "2 cases, 10 rows: 4 FAILED" in result.stdout
    assert "dk: max|ours - ref64| = 5.000e-01 at (0, 1, 2, 3)" in result.stdout


def test_validate_gpu_case_that_raises_is_a_failure(fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(case: validation.Case, *, deterministic: bool = False) -> list[Comparison]:
        raise RuntimeError("NVRTC failed to compile flash_fwd.cu\nlog line")

    monkeypatch.setattr(validation, "run_gpu_case", crash)
    result = invoke("validate", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["gpu"] is True and report["failures"] == 2 and report["device"]["name"] == H100.name
    assert report["rows"][0] == {"case": CASES[0].id, "tensor": None, "ok": False,
                                 "exception": "RuntimeError: NVRTC failed to compile flash_fwd.cu"}


def test_validate_gpu_json_has_no_infinities(fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {"out": float("inf")}))
    result = invoke("validate", "--json")
    report = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert report["rows"][0]["error"] == "inf" and report["rows"][0]["ok"] is False


VARLEN_CASES = [validation.VarlenCase("float16", 128, True, (0, 1, 203), (0, 1, 203), group=4)]


def _fake_varlen_run(calls: dict[str, Any], errors: dict[str, float]) -> Any:
    def run_varlen_gpu_case(case: validation.VarlenCase, *, deterministic: bool = False) -> list[Comparison]:
        calls["run"].append((case.id, deterministic))
        return [_comparison(f"{name}@s{b}", errors.get(f"{name}@s{b}", 1e-3))
                for b in (1, 2) for name in ("out", "lse", "dq", "dk", "dv")]
    return run_varlen_gpu_case


def test_validate_gpu_runs_the_varlen_cases(fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "varlen_matrix", lambda quick: fake_gpu.update(varlen_quick=quick) or VARLEN_CASES)
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {}))
    monkeypatch.setattr(validation, "run_varlen_gpu_case", _fake_varlen_run(fake_gpu, {"dk@s2": 0.5}))
    result = invoke("validate", "--quick", "--deterministic")
    assert result.exit_code == 1
    assert fake_gpu["varlen_quick"] is True
    assert fake_gpu["run"] == [(case.id, True) for case in CASES + VARLEN_CASES]
    assert "3 cases (1 varlen, 0 KV cache); deterministic=True" in result.stdout
    assert "3 cases, 20 rows: 1 FAILED" in result.stdout
    width = validate_report.CASE_WIDTH
    assert f"{VARLEN_CASES[0].id:<{width}} out@s1  1.000e-03  1.000e-03    1.00  pass" in result.stdout
    assert f"{VARLEN_CASES[0].id:<{width}} dk@s2   5.000e-01  1.000e-03  500.00  FAIL" in result.stdout
    assert "dk@s2: max|ours - ref64| = 5.000e-01" in result.stdout
    report = json.loads(invoke("validate", "--json").stdout)
    assert report["cases"] == 3 and report["varlen_cases"] == 1
    assert [r["tensor"] for r in report["rows"] if r["case"] == VARLEN_CASES[0].id][:2] == ["out@s1", "lse@s1"]


def test_validate_gpu_runs_the_cache_cases(fake_gpu: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV-cache cases follow the others; a cache element written wrongly fails its row."""
    case = kvcache_cases.DecodeCase("bfloat16", 128, 1, (0, 4097), page_size=16, seqlen_new=1)
    monkeypatch.setattr(kvcache_cases, "decode_matrix", lambda quick: fake_gpu.update(decode_quick=quick) or [case])
    monkeypatch.setattr(validation, "run_gpu_case", _fake_run(fake_gpu, {}))

    def run_decode(c: kvcache_cases.DecodeCase, deterministic: bool) -> list[Comparison]:
        fake_gpu["run"].append((c.id, deterministic))
        return [_comparison("out", 1e-3), _comparison("lse", 1e-3),
                Comparison("kcache", 0.0, 0.0, 0.0, (), 0.0, 0.0), Comparison("vcache", 3.0, 0.0, 0.0, (0, 5), 3.0, 0.0)]

    monkeypatch.setattr(validate_report, "_run_decode_case", run_decode)
    result = invoke("validate", "--quick")
    assert result.exit_code == 1 and fake_gpu["decode_quick"] is True
    assert fake_gpu["run"][-1] == (case.id, False)
    assert "3 cases (0 varlen, 1 KV cache)" in result.stdout and "3 cases, 14 rows: 1 FAILED" in result.stdout
    assert f"{case.id:<{validate_report.CASE_WIDTH}} vcache  3.000e+00  0.000e+00     inf  FAIL" in result.stdout
    assert json.loads(invoke("validate", "--json").stdout)["decode_cases"] == 1


def test_validate_cpu_varlen_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(validation, "cpu_matrix", lambda quick: [])
    case = validation.VarlenCpuCase((0, 1, 5), (0, 1, 5), 2, 2, True)
    monkeypatch.setattr(validation, "cpu_varlen_matrix", lambda quick: [case])
    monkeypatch.setattr(validation, "run_cpu_varlen_case", lambda c: {"out": 0.0, "lse": float("nan"), "dq": 0.0,
                                                                      "dk": 0.0, "dv": 0.0})
    result = invoke("validate")
    assert result.exit_code == 1
    assert f"{case.id:<{validate_report.CASE_WIDTH}}" in result.stdout and "1 cases: 1 FAILED" in result.stdout


# --------------------------------------------------------------------------- library errors


@pytest.mark.parametrize("error, code", [(ValueError("window_size must be a pair"), 2),
                                         (TypeError("q.dtype is float32"), 2),
                                         (RuntimeError("cupyflash found no CUDA GPU"), 1),
                                         (NotImplementedError("softcap not yet supported"), 1)],
                         ids=["ValueError", "TypeError", "RuntimeError", "NotImplementedError"])
def test_library_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, error: Exception, code: int) -> None:
    def fail(quick: bool) -> list[Any]:
        raise error

    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    monkeypatch.setattr(validation, "cpu_matrix", fail)
    result = invoke("validate")
    assert result.exit_code == code
    assert everything(result).strip() == f"Error: {error}"


# --------------------------------------------------------------------------- bench


@no_real_gpu
def test_bench_without_gpu() -> None:
    result = invoke("bench")
    assert result.exit_code == 1
    assert "Error: No CUDA GPU found: cupyflash bench times the GPU kernels and needs one" in everything(result)


def test_bench_rejects_a_bad_shape() -> None:
    result = invoke("bench", "--shape", "1,2,x,4")
    assert result.exit_code == 2
    assert "'1,2,x,4' must be four positive integers B,S,H,D" in everything(result)


@pytest.fixture
def fake_bench(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A GPU and a stand-in for cupyflash.bench that records what the command asks of it."""
    calls: dict[str, Any] = {}

    def paper_grid(dtypes: Any, head_dims: Any, seqlens: Any, causal: Any) -> list[Any]:
        calls["grid"] = (tuple(dtypes), tuple(head_dims), tuple(seqlens), tuple(causal))
        return ["grid-shape"]

    def run(shapes: list[Any], passes: Any = ("fwd", "bwd"), impls: Any = None, runs: int = 20, warmup: int = 3,
            progress: Any = None) -> dict[str, Any]:
        calls["run"] = (shapes, tuple(passes), runs)
        progress("timing", "shape 1/1")
        return {"rows": [{"tflops": 123.0}]}

    def save(report: dict[str, Any], directory: Path, stem: str) -> list[Path]:
        calls["save"] = (report, Path(directory), stem)
        return [Path(directory) / f"{stem}.json"]

    def plot(report: dict[str, Any], path: Path) -> Path:
        calls["plot"] = Path(path)
        return Path(path)

    def varlen_batches(dtypes: Any, head_dims: Any, causal: Any) -> list[Any]:
        calls["varlen_batches"] = (tuple(dtypes), tuple(head_dims), tuple(causal))
        return ["varlen-batch"]

    def run_varlen(batches: list[Any], passes: Any = ("fwd", "bwd"), runs: int = 20, warmup: int = 3,
                   progress: Any = None) -> dict[str, Any]:
        calls["run_varlen"] = (batches, tuple(passes), runs)
        progress("timing", "batch 1/1")
        return {"kind": "varlen", "rows": [{"tflops": 321.0}]}

    def decode_grid(dtypes: Any, head_dims: Any, page_sizes: Any, quick: bool = False) -> list[Any]:
        calls["decode_grid"] = (tuple(dtypes), tuple(head_dims), tuple(page_sizes), quick)
        return ["decode-cell"]

    def run_decode(cells: list[Any], runs: int = 20, warmup: int = 3, progress: Any = None) -> dict[str, Any]:
        calls["run_decode"] = (cells, runs)
        progress("timing", "cell 1/1")
        return {"kind": "decode", "rows": [{"tbps": 4.5}]}

    def save_decode(report: dict[str, Any], directory: Path, stem: str) -> list[Path]:
        calls["save_decode"] = (report, Path(directory), stem)
        return [Path(directory) / f"{stem}.json"]

    def plot_decode(report: dict[str, Any], path: Path) -> Path:
        calls["plot_decode"] = Path(path)
        return Path(path)

    module = SimpleNamespace(paper_grid=paper_grid, run=run, save=save, plot=plot, calls=calls,
                             default_stem=lambda report: "bench-gpu-2026-11-23",
                             BenchShape=lambda *args: ("shape",) + args,
                             format_table=lambda report, which: f"table {which}",
                             varlen_batches=varlen_batches, run_varlen=run_varlen,
                             format_varlen_table=lambda report: "varlen table",
                             decode_grid=decode_grid, run_decode=run_decode, save_decode=save_decode,
                             plot_decode=plot_decode, decode_stem=lambda report: "bench-decode-gpu-2026-11-23",
                             format_decode_table=lambda report: "decode table")
    monkeypatch.setattr(cli, "gpu_count", lambda: 1)
    monkeypatch.setitem(sys.modules, "cupyflash.bench", module)
    monkeypatch.setattr(cupyflash, "bench", module, raising=False)
    return module


def test_bench_defaults_run_the_paper_grid(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["grid"] == (("float16", "bfloat16"), (64, 128, 256), cli.PAPER_SEQLENS, (False, True))
    assert fake_bench.calls["run"] == (["grid-shape"], ("fwd", "bwd"), 20)
    assert result.stdout == "table fwd\n\ntable bwd\n"
    assert "timing shape 1/1" in result.stderr


@pytest.mark.parametrize("flag, causal", [("--causal", (True,)), ("--no-causal", (False,)), ("--both", (False, True))])
def test_bench_mask_flags(fake_bench: SimpleNamespace, flag: str, causal: tuple[bool, ...]) -> None:
    assert invoke("bench", flag).exit_code == 0
    assert fake_bench.calls["grid"][3] == causal


def test_bench_grid_options(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--dtype", "bfloat16", "--head-dim", "96", "--head-dim", "40", "--seqlen", "4097",
                    "--pass", "bwd", "--runs", "5")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["grid"] == (("bfloat16",), (96, 40), (4097,), (False, True))
    assert fake_bench.calls["run"] == (["grid-shape"], ("bwd",), 5)
    assert result.stdout == "table bwd\n"


def test_bench_custom_shape(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--shape", "2,1024,16,64", "--dtype", "float16", "--causal", "--pass", "fwd")
    assert result.exit_code == 0, everything(result)
    assert "grid" not in fake_bench.calls
    assert fake_bench.calls["run"][0] == [("shape", "float16", 64, 1024, True, 2, 16)]


def test_bench_json_out_and_plot(fake_bench: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())  # matplotlib "installed"
    result = invoke("bench", "--json", "--out", str(tmp_path / "results"), "--plot", str(tmp_path / "speed.png"))
    assert result.exit_code == 0, everything(result)
    assert json.loads(result.stdout) == {"rows": [{"tflops": 123.0}]}
    _, directory, stem = fake_bench.calls["save"]
    assert directory == tmp_path / "results" and stem == "bench-gpu-2026-11-23"
    assert fake_bench.calls["plot"] == tmp_path / "speed.png"


def test_bench_plot_without_matplotlib_fails_before_timing(fake_bench: SimpleNamespace,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None)
    result = invoke("bench", "--plot", "speed.png")
    assert result.exit_code == 1 and "--plot needs matplotlib" in everything(result)
    assert "run" not in fake_bench.calls


def test_bench_drives_the_real_bench_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command against cupyflash.bench itself, with only the timing replaced: the grid and the
    shape arguments match its signatures, its tables print, its ValueErrors exit with 2."""
    from cupyflash import bench

    seen: dict[str, Any] = {}

    def run(shapes: list[Any], **options: Any) -> dict[str, Any]:
        seen.update(shapes=shapes, **options)
        return {"environment": {}, "settings": {"runs": options["runs"]}, "rows": []}

    monkeypatch.setattr(cli, "gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "run", run)
    result = invoke("bench", "--head-dim", "128", "--seqlen", "2048", "--causal", "--dtype", "bfloat16")
    assert result.exit_code == 0, everything(result)
    assert seen["shapes"] == [bench.BenchShape("bfloat16", 128, 2048, True, batch=8, heads=16)]
    assert "Forward TFLOP/s" in result.stdout and "Backward TFLOP/s" in result.stdout
    assert invoke("bench", "--shape", "2,1024,16,64", "--no-causal", "--dtype", "float16").exit_code == 0
    assert seen["shapes"] == [bench.BenchShape("float16", 64, 1024, False, batch=2, heads=16)]
    too_long = invoke("bench", "--seqlen", "20000")
    assert too_long.exit_code == 2 and everything(too_long).startswith("Error: seqlen 20000 must be in")


def test_bench_help_lists_varlen() -> None:
    result = invoke("bench", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "--varlen" in text and "16x1024, 4x4096, 2x8192" in text and "bar 0.97x" in text and "bar 0.9x" in text
    assert "(--varlen and --decode: 128 unless given)" in text


def test_bench_varlen_defaults(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--varlen")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["varlen_batches"] == (("float16", "bfloat16"), (128,), (False, True))
    assert fake_bench.calls["run_varlen"] == (["varlen-batch"], ("fwd", "bwd"), 20)
    assert "run" not in fake_bench.calls and "grid" not in fake_bench.calls  # the dense grid is not timed
    assert result.stdout == "varlen table\n"
    assert "timing batch 1/1" in result.stderr


def test_bench_varlen_options(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--varlen", "--dtype", "bfloat16", "--head-dim", "64", "--head-dim", "256", "--causal",
                    "--pass", "bwd", "--runs", "7")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["varlen_batches"] == (("bfloat16",), (64, 256), (True,))
    assert fake_bench.calls["run_varlen"] == (["varlen-batch"], ("bwd",), 7)
    assert invoke("bench", "--varlen", "--head-dim", "128", "--no-causal").exit_code == 0
    assert fake_bench.calls["varlen_batches"] == (("float16", "bfloat16"), (128,), (False,))


def test_bench_varlen_json_and_out(fake_bench: SimpleNamespace, tmp_path: Path) -> None:
    result = invoke("bench", "--varlen", "--json", "--out", str(tmp_path / "results"))
    assert result.exit_code == 0, everything(result)
    assert json.loads(result.stdout) == {"kind": "varlen", "rows": [{"tflops": 321.0}]}
    report, directory, stem = fake_bench.calls["save"]
    assert report["kind"] == "varlen" and directory == tmp_path / "results" and stem == "bench-gpu-2026-11-23"
    assert "saved " in result.stderr


@pytest.mark.parametrize("options, named", [(["--seqlen", "1024"], "--seqlen"),
                                            (["--shape", "2,1024,16,64"], "--shape"),
                                            (["--plot", "speed.png"], "--plot"),
                                            (["--seqlen", "512", "--plot", "x.png"], "--seqlen, --plot")],
                         ids=["seqlen", "shape", "plot", "seqlen-and-plot"])
def test_bench_varlen_rejects_grid_options(monkeypatch: pytest.MonkeyPatch, options: list[str], named: str) -> None:
    """A usage error (exit 2) before anything else, GPU or not."""
    monkeypatch.setattr(cli, "gpu_count", lambda: pytest.fail("asked for the GPU before the usage check"))
    result = invoke("bench", "--varlen", *options)
    assert result.exit_code == 2, everything(result)
    assert f"Error: {named} cannot be combined with --varlen" in everything(result)


def test_bench_varlen_drives_the_real_bench_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--varlen against cupyflash.bench itself, only the timing replaced: the batches it builds,
    the table it prints, the files it saves."""
    from cupyflash import bench

    seen: dict[str, Any] = {}

    def run_varlen(batches: list[Any], **options: Any) -> dict[str, Any]:
        seen.update(batches=batches, **options)
        return {"kind": "varlen", "environment": {"gpu": "NVIDIA H200", "date": "2026-12-03T10:00:00+00:00"},
                "settings": {"runs": options["runs"]}, "rows": [], "summary": []}

    monkeypatch.setattr(cli, "gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "run_varlen", run_varlen)
    result = invoke("bench", "--varlen", "--dtype", "float16", "--causal", "--runs", "5", "--out", str(tmp_path))
    assert result.exit_code == 0, everything(result)
    batches = seen["batches"]
    assert [(b.kind, b.spec, b.causal, b.head_dim, b.heads) for b in batches] == [
        ("equal", "16x1024", True, 128, 16), ("equal", "4x4096", True, 128, 16), ("equal", "2x8192", True, 128, 16),
        ("mixed", "64x[128,8192]s0", True, 128, 16)]
    assert seen["passes"] == ("fwd", "bwd") and seen["runs"] == 5
    assert "Variable-length TFLOP/s" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-varlen-nvidia-h200-2026-12-03.json",
                                                          "bench-varlen-nvidia-h200-2026-12-03.md"]


# --------------------------------------------------------------------------- autotune


def test_autotune_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    result = invoke("autotune", "--pass", "fwd", "--head-dim", "64")
    assert result.exit_code == 1
    assert everything(result).strip() == ("Error: autotune needs a CUDA GPU to time the kernels; none was found "
                                          "(--show and --clear work without one)")


def test_autotune_help_lists_its_options() -> None:
    result = invoke("autotune", "--help")
    assert result.exit_code == 0
    for option in ("--show", "--clear", "--json", "--pass", "--head-dim", "--seqlen"):
        assert option in result.stdout
    words = " ".join(result.stdout.split())  # the help text is wrapped
    assert "--show and --clear only read or remove files" in words and "without a GPU, every GPU's" in words


def test_autotune_show_and_clear_exclude_each_other(isolated_cache: Path) -> None:
    _write_cache(isolated_cache)
    result = invoke("autotune", "--show", "--clear")
    assert result.exit_code == 2 and "--show and --clear exclude each other" in everything(result)
    assert len(list((isolated_cache / "tuning").glob("*.json"))) == 3  # nothing removed


def test_autotune_show_without_gpu_lists_every_gpu_file(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    _write_cache(isolated_cache)
    result = invoke("autotune", "--show")
    assert result.exit_code == 0, everything(result)
    assert result.stdout.splitlines() == [
        f"No CUDA GPU found: listing the tuning files of every GPU in {isolated_cache / 'tuning'} as stored "
        "(attention() uses one only on its GPU, with the versions it was tuned under)",
        "GPU_A-sm_90.json: 2 entries",
        f"  {'fwd/float16/d128/full/s1024/mha':<38} " + '{"config": {}}',
        f"  {'fwd/float16/d64/full/s1024/mha':<38} " + '{"config": {}}',
        "GPU_B-sm_80.json: unreadable, ignored",
        "GPU_C-sm_86.json: unreadable, ignored"]
    as_json = invoke("autotune", "--show", "--json")
    assert json.loads(as_json.stdout) == [
        {"file": "GPU_A-sm_90.json", "bucket": "fwd/float16/d128/full/s1024/mha", "config": {}},
        {"file": "GPU_A-sm_90.json", "bucket": "fwd/float16/d64/full/s1024/mha", "config": {}}]
    assert "No CUDA GPU found" in as_json.stderr and "GPU_B-sm_80.json: unreadable, ignored" in as_json.stderr


def test_autotune_show_without_gpu_and_nothing_tuned(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    result = invoke("autotune", "--show")
    assert result.exit_code == 0, everything(result)
    assert result.stdout.splitlines()[-1] == f"no tuned configs for any GPU in {isolated_cache / 'tuning'}"
    as_json = invoke("autotune", "--show", "--json")
    assert json.loads(as_json.stdout) == [] and "no tuned configs for any GPU" in as_json.stderr


def test_autotune_clear_without_gpu_removes_every_gpu_file(isolated_cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: 0)
    _write_cache(isolated_cache)
    folder = isolated_cache / "tuning"
    result = invoke("autotune", "--clear")
    assert result.exit_code == 0, everything(result)
    assert result.stdout.splitlines() == [f"No CUDA GPU found: removing the tuning files of every GPU in {folder}"] + [
        f"removed {folder / name}" for name in ("GPU_A-sm_90.json", "GPU_B-sm_80.json", "GPU_C-sm_86.json")]
    assert not list(folder.glob("*.json")) and (isolated_cache / "kernels" / "a.cubin").exists()
    again = invoke("autotune", "--clear")
    assert again.exit_code == 0 and again.stdout.splitlines()[-1] == f"no tuning files in {folder}: nothing removed"
    assert json.loads(invoke("autotune", "--clear", "--json").stdout) == []


FWD_BUCKET = "fwd/float16/d128/causal/s4096/mha"


@pytest.fixture
def tuned_h100(fake_gpu: dict[str, Any], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake H100's tuning file with one entry, beside another GPU's file; returns the H100's."""
    monkeypatch.setattr(tuning, "header", lambda limits: {"gpu": limits.name})  # no CUDA versions needed
    path = tuning.store(H100, FWD_BUCKET, FwdConfig(128, 32, 4, 2), {"ms": 1.0})
    (path.parent / "GPU_A-sm_80.json").write_text(json.dumps({"header": {}, "entries": {FWD_BUCKET: {}}}))
    return path


def test_autotune_show_with_a_gpu_lists_only_its_file(tuned_h100: Path) -> None:
    result = invoke("autotune", "--show")
    assert result.exit_code == 0, everything(result)
    stored = {"config": FwdConfig(128, 32, 4, 2).to_dict(), "ms": 1.0}
    assert result.stdout.splitlines() == [f"{tuned_h100.name}: 1 entry",
                                          f"  {FWD_BUCKET:<38} {json.dumps(stored, sort_keys=True)}"]
    assert json.loads(invoke("autotune", "--show", "--json").stdout) == [
        {"file": tuned_h100.name, "bucket": FWD_BUCKET, **stored}]


def test_autotune_clear_with_a_gpu_removes_only_its_file(tuned_h100: Path) -> None:
    result = invoke("autotune", "--clear", "--json")
    assert result.exit_code == 0, everything(result)
    assert json.loads(result.stdout) == [str(tuned_h100)]
    assert not tuned_h100.exists() and (tuned_h100.parent / "GPU_A-sm_80.json").exists()
    again = invoke("autotune", "--clear")
    assert again.stdout.strip() == f"no tuning file for {H100.name} (sm_90) in {tuned_h100.parent}: nothing removed"
    show = invoke("autotune", "--show")
    assert show.stdout.strip() == f"no tuned configs for {H100.name} (sm_90) in {tuned_h100.parent}"


# --------------------------------------------------------------------------- bench --decode


def test_bench_help_lists_decode() -> None:
    result = invoke("bench", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "--decode" in text and "1, 2, 4, 8, 16 query tokens" in text and "4k, 32k, 128k" in text
    assert "0.85x copy" in text and "2x at 8 and 16 tokens" in text and "(--decode: bfloat16 unless given)" in text
    assert "--quick" in text and "--paged PAGE_SIZE" in text and "default 16 and 256; 0: none" in text


def test_bench_decode_defaults(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--decode")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["decode_grid"] == (("bfloat16",), (128,), (16, 256), False)
    assert fake_bench.calls["run_decode"] == (["decode-cell"], 20)
    assert not {"run", "grid", "run_varlen", "save_decode", "plot_decode"} & set(fake_bench.calls)
    assert result.stdout == "decode table\n"
    assert "timing cell 1/1" in result.stderr


def test_bench_decode_options(fake_bench: SimpleNamespace) -> None:
    result = invoke("bench", "--decode", "--quick", "--dtype", "float16", "--head-dim", "64", "--paged", "32",
                    "--paged", "64", "--runs", "3", "--causal", "--pass", "fwd")
    assert result.exit_code == 0, everything(result)
    assert fake_bench.calls["decode_grid"] == (("float16",), (64,), (32, 64), True)
    assert fake_bench.calls["run_decode"] == (["decode-cell"], 3)
    assert invoke("bench", "--decode", "--paged", "0").exit_code == 0
    assert fake_bench.calls["decode_grid"] == (("bfloat16",), (128,), (), False)


def test_bench_decode_json_out_and_plot(fake_bench: SimpleNamespace, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())  # matplotlib "installed"
    result = invoke("bench", "--decode", "--json", "--out", str(tmp_path / "results"), "--plot",
                    str(tmp_path / "decode.png"))
    assert result.exit_code == 0, everything(result)
    assert json.loads(result.stdout) == {"kind": "decode", "rows": [{"tbps": 4.5}]}
    report, directory, stem = fake_bench.calls["save_decode"]
    assert report["kind"] == "decode" and directory == tmp_path / "results" and stem == "bench-decode-gpu-2026-11-23"
    assert fake_bench.calls["plot_decode"] == tmp_path / "decode.png" and "save" not in fake_bench.calls
    assert "saved " in result.stderr and "plot " in result.stderr


@pytest.mark.parametrize("options, named", [(["--varlen"], "--varlen"), (["--seqlen", "1024"], "--seqlen"),
                                            (["--shape", "2,1024,16,64"], "--shape"), (["--pass", "bwd"], "--pass"),
                                            (["--no-causal"], "--no-causal/--both"),
                                            (["--both"], "--no-causal/--both"),
                                            (["--pass", "both", "--seqlen", "512"], "--seqlen, --pass")],
                         ids=["varlen", "seqlen", "shape", "pass", "no-causal", "both", "seqlen-and-pass"])
def test_bench_decode_rejects_other_grids_options(monkeypatch: pytest.MonkeyPatch, options: list[str],
                                                  named: str) -> None:
    """A usage error (exit 2) before anything else, GPU or not."""
    monkeypatch.setattr(cli, "gpu_count", lambda: pytest.fail("asked for the GPU before the usage check"))
    result = invoke("bench", "--decode", *options)
    assert result.exit_code == 2, everything(result)
    assert f"Error: {named} cannot be combined with --decode" in everything(result)


@pytest.mark.parametrize("options, named", [(["--quick"], "--quick"), (["--paged", "16"], "--paged"),
                                            (["--varlen", "--quick", "--paged", "0"], "--quick, --paged")],
                         ids=["quick", "paged", "both"])
def test_bench_decode_options_need_decode(monkeypatch: pytest.MonkeyPatch, options: list[str], named: str) -> None:
    monkeypatch.setattr(cli, "gpu_count", lambda: pytest.fail("asked for the GPU before the usage check"))
    result = invoke("bench", *options)
    assert result.exit_code == 2, everything(result)
    assert f"Error: {named} shape the --decode grid: use with --decode" in everything(result)


def test_bench_decode_drives_the_real_bench_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--decode against cupyflash.bench itself, only the timing replaced: the cells it builds,
    the table it prints, the files it saves."""
    from cupyflash import bench

    seen: dict[str, Any] = {}

    def run_decode(cells: list[Any], **options: Any) -> dict[str, Any]:
        seen.update(cells=cells, **options)
        return {"kind": "decode", "environment": {"gpu": "NVIDIA H200", "date": "2026-12-03T10:00:00+00:00"},
                "copy": {"tbps": 4.1}, "settings": {"runs": options["runs"]}, "rows": [], "summary": []}

    monkeypatch.setattr(cli, "gpu_count", lambda: 1)
    monkeypatch.setattr(bench, "run_decode", run_decode)
    result = invoke("bench", "--decode", "--runs", "5", "--out", str(tmp_path))
    assert result.exit_code == 0, everything(result)
    cells = seen["cells"]
    assert len(cells) == 90 and cells == bench.decode_grid() and seen["runs"] == 5
    assert {c.page_sizes for c in cells} == {(), (16, 256)}
    assert "Decode TB/s" in result.stdout and "copy bandwidth 4.10 TB/s" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-decode-nvidia-h200-2026-12-03.json",
                                                          "bench-decode-nvidia-h200-2026-12-03.md"]
    assert invoke("bench", "--decode", "--quick", "--paged", "0").exit_code == 0
    assert len(seen["cells"]) == 16 and not any(c.page_sizes for c in seen["cells"])
    odd = invoke("bench", "--decode", "--paged", "100")
    assert odd.exit_code == 2 and everything(odd).startswith("Error: page size 100 does not divide the cache length")
