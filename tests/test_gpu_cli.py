"""The commands on a GPU: validate fails (exit 1) with a deliberately broken config injected;
a config tuned in one process is picked up by another. Skipped without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from cupyflash.cli import cli

pytestmark = pytest.mark.gpu


def test_validate_fails_with_a_broken_config() -> None:
    broken = json.dumps({"block_m": 64, "block_n": 64, "num_warps": 4, "stages": 1})  # kStages < 2
    result = CliRunner().invoke(cli, ["validate", "--quick", "--inject-config", broken])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output


SECOND_PROCESS = textwrap.dedent("""
    import json, sys
    from cupyflash import autotune, plan, tuning
    from cupyflash.device import device_limits
    bucket = autotune.Bucket("fwd", "float16", 64, True, 1024)
    if sys.argv[1] == "tune":
        autotune.tune([bucket])
    problem = bucket.problem()
    chosen = plan.choose("fwd", problem, device_limits(0))
    print(json.dumps(tuning.load_entries(device_limits(0))[bucket.key]["config"]), chosen)
""")


def test_tuned_config_is_used_by_a_second_process(tmp_path) -> None:
    env = {**os.environ, "CUPYFLASH_TUNING_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", SECOND_PROCESS, "tune"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", SECOND_PROCESS, "read"], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert first.stdout.strip().splitlines()[-1] == second.stdout.strip().splitlines()[-1]
