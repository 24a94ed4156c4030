"""On a GPU: a kernel cache whose cubins were all cut to a third (a full disk, a partial copy
of the folder) used to kill the next process inside module.load (exit -11, no message). Now
that process warns, recompiles and gives bitwise the results of the process that filled the
cache, and the cubins on disk are whole again."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Forward and backward once on random float16 inputs, results saved to argv[1]. seqlen_k 60 is
# below every block_n, so each dQ element gets one float32 atomic add: bitwise repeatable.
SCRIPT = textwrap.dedent("""
    import sys, warnings
    import cupy, numpy
    import cupyflash
    warnings.simplefilter("always")  # every CacheWarning reaches stderr
    cupy.random.seed(0)
    q, dout = (cupy.random.standard_normal((1, 130, 2, 64)).astype(cupy.float16) for _ in range(2))
    k, v = (cupy.random.standard_normal((1, 60, 2, 64)).astype(cupy.float16) for _ in range(2))
    out, lse = cupyflash.attention(q, k, v, return_lse=True)
    dq, dk, dv = cupyflash.attention_backward(dout, q, k, v, out, lse)
    numpy.savez(sys.argv[1], out=out.get(), lse=lse.get(), dq=dq.get(), dk=dk.get(), dv=dv.get())
""")


def run_script(results: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUPYFLASH_CACHE_DIR": str(cache)}  # tuned configs live there too: none
    for name in ("CUPYFLASH_NO_DISK_CACHE", "CUPYFLASH_TUNING_DIR"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(results)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.gpu
def test_truncated_cubins_are_rebuilt_not_loaded(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run_script(tmp_path / "first.npz", cache)
    assert first.returncode == 0, first.stderr
    cubins = sorted((cache / "kernels").glob("*.cubin"))
    sizes = {path: path.stat().st_size for path in cubins}
    assert cubins, f"the first process cached no cubin in {cache}"
    for path in cubins:
        path.write_bytes(path.read_bytes()[:sizes[path] // 3])

    second = run_script(tmp_path / "second.npz", cache)
    assert second.returncode == 0, f"exit {second.returncode} with truncated cubins:\n{second.stderr}"
    for path in cubins:
        assert path.name in second.stderr and "CacheWarning" in second.stderr, \
            f"no CacheWarning names the truncated {path.name}:\n{second.stderr}"
        assert path.stat().st_size == sizes[path], f"{path} was not repaired"
    with np.load(tmp_path / "first.npz") as want, np.load(tmp_path / "second.npz") as got:
        for name in want.files:
            assert want[name].dtype == got[name].dtype and want[name].shape == got[name].shape, name
            assert want[name].tobytes() == got[name].tobytes(), f"{name} differs from the first process's"
