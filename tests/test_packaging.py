"""What a user gets from ``pip install``: the wheel, its kernel sources, the console script,
and an import that needs neither CuPy nor a GPU and compiles nothing.

The wheel tests build the wheel (``python -m build``, which fetches hatchling into an isolated
environment) and install it with its plain dependencies into a fresh virtual environment, so
they need PyPI; they are marked slow but run by default (CI runs them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from cupyflash import build

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs a command; its stdout, or a failure that shows everything it printed."""
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would point Python back at the repository."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


# --------------------------------------------------------------------------- import contract


def python_with_cupy_blocked(code: str, tmp_path: Path) -> str:
    """Runs `code` in a fresh interpreter where `import cupy` fails, as if it were not installed."""
    prelude = "import sys\nsys.modules['cupy'] = None  # import cupy now raises ImportError\n"
    env = clean_env(PYTHONPATH=str(REPO), CUPYFLASH_CACHE_DIR=str(tmp_path / "cache"))
    return run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env)


def test_import_does_not_import_cupy(tmp_path: Path) -> None:
    env = clean_env(PYTHONPATH=str(REPO), CUPYFLASH_CACHE_DIR=str(tmp_path / "cache"))
    code = "import sys, cupyflash, cupyflash.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'cupy'))"
    assert run([sys.executable, "-c", code], cwd=tmp_path, env=env).strip() == "[]"
    assert not (tmp_path / "cache").exists(), "importing cupyflash wrote to the kernel cache"


def test_works_without_cupy(tmp_path: Path) -> None:
    """The reference, the input checks and the no-GPU error all work without CuPy."""
    out = python_with_cupy_blocked("""
        import numpy as np
        import cupyflash
        from cupyflash import reference
        from cupyflash.device import gpu_count
        q = np.random.default_rng(0).standard_normal((1, 3, 2, 8))
        out, lse = reference.attention_forward(q, q[:, :, :1], q[:, :, :1], causal=True)
        print(out.shape, lse.shape, gpu_count())
        try:
            cupyflash.attention(q.astype(np.float16), q.astype(np.float16), q[:, :2].astype(np.float16))
        except ValueError as error:
            print("ValueError", "k.shape" in str(error))
        try:
            cupyflash.attention(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16))
        except RuntimeError as error:
            print("RuntimeError", "no CUDA GPU" in str(error))
        """, tmp_path)
    assert out.split("\n")[:3] == ["(1, 3, 2, 8) (1, 2, 3) 0", "ValueError True", "RuntimeError True"]
    assert not (tmp_path / "cache").exists()


def test_cli_validate_works_without_cupy(tmp_path: Path) -> None:
    out = python_with_cupy_blocked("""
        from cupyflash.cli import main
        sys.argv = ["cupyflash", "validate", "--quick"]
        main()
        """, tmp_path)
    assert "all passed" in out and "GPU kernels were NOT validated" in out


# --------------------------------------------------------------------------- the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(REPO)], cwd=outdir, env=clean_env())
    (path,) = outdir.glob("cupyflash-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its plain dependencies (no CuPy extra); returns its python."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=True)
    python = root / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=root, env=clean_env())
    return python


@pytest.mark.slow
def test_wheel_carries_the_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cupyflash/kernels_cu/flash_fwd.cu" in names
    sources = {f"cupyflash/kernels_cu/{path.name}" for path in build.kernel_dir().glob("*.cu*")}
    assert sources <= names, f"missing from the wheel: {sorted(sources - names)}"
    assert "cupyflash/cli.py" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "cupyflash = cupyflash.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_installed_package_finds_its_own_kernels(installed: Path, tmp_path: Path) -> None:
    """Run from outside the repository: the kernels come from site-packages, with the repo's hash."""
    code = ("import sysconfig, cupyflash.build as b\n"
            "print(b.kernel_dir()); print(b.source_hash()); print(sysconfig.get_path('purelib'))")
    kernel_dir, source_hash, site_packages = run([str(installed), "-c", code], cwd=tmp_path,
                                                 env=clean_env()).split()
    assert Path(kernel_dir).is_relative_to(Path(site_packages).resolve()), kernel_dir
    assert source_hash == build.source_hash()


@pytest.mark.slow
def test_installed_console_script(installed: Path, tmp_path: Path) -> None:
    """`cupyflash` works after a plain install: no CuPy there, so validate checks the CPU path."""
    script = str(installed.parent / "cupyflash")
    env = clean_env(CUPYFLASH_CACHE_DIR=str(tmp_path / "cache"))
    info = run([script, "info"], cwd=tmp_path, env=env)
    assert "cupy            not installed" in info
    validate = run([script, "validate", "--quick"], cwd=tmp_path, env=env)
    assert "all passed" in validate and "GPU kernels were NOT validated" in validate
