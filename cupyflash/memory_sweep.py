"""The memory-safety sweep: every kernel family and path on small, awkward shapes.

An out-of-bounds write is silent in the results and corrupts a caller's neighbouring arrays, so
two checks run the same list of cases on a GPU: tests/test_gpu_guard.py surrounds every
allocation with guard bytes and checks them after the call, and scripts/sanitize.py runs each
case in its own process under compute-sanitizer (memcheck; racecheck and synccheck on the
smaller list). A case names a path (the kernels the GPU picks by default, or the configs an A100
or an RTX 4090 would pick, forced through plan.forced), a validation.Case (head dim, lengths,
GQA, causal or window) and whether the backward is the deterministic one.

    from cupyflash import memory_sweep
    for case in memory_sweep.cases():
        memory_sweep.run(case)          # forward + backward, results checked against float64
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator

from . import gpu_classes, plan, validation
from .kernels.common import kernel_head_dim
from .tolerance import Comparison

PATHS = ("default", *gpu_classes.SMALLER_THAN_HOPPER)  # default, a100, rtx4090
# Every compiled head dim (32 ... 256) is reached, and padded ones between them: 8 and 40 run on
# the 32 and 64 kernels, 72 on 96, 200 on 256.
HEAD_DIMS = (8, 32, 40, 48, 64, 72, 96, 128, 160, 192, 200, 256)
SMALL_HEAD_DIMS = (40, 64, 96, 128, 256)
# (seqlen_q, seqlen_k, group, causal, window): lengths that are multiples of no tile; fewer and
# more queries than keys; GQA; some rows that see no key (causal 203 x 113); a sliding window.
SHAPES = ((33, 33, 1, False, (-1, -1)), (33, 130, 2, True, (-1, -1)), (203, 113, 4, True, (-1, -1)),
          (130, 97, 1, False, (17, 5)))


@dataclass(frozen=True)
class SweepCase:
    path: str  # "default" or a key of gpu_classes.SMALLER_THAN_HOPPER
    case: validation.Case
    deterministic: bool = False

    @property
    def id(self) -> str:
        return f"{self.path}-{self.case.id}" + ("-det" if self.deterministic else "")


def cases(small: bool = False) -> list[SweepCase]:
    """The sweep: paths x head dims x shapes, deterministic on the GQA shape; `small` is the
    subset racecheck and synccheck run (they are much slower than memcheck)."""
    dims = SMALL_HEAD_DIMS if small else HEAD_DIMS
    shapes = SHAPES[1:3] if small else SHAPES
    found = []
    for path, dim, (seqlen_q, seqlen_k, group, causal, window) in itertools.product(PATHS, dims, shapes):
        dtype = "bfloat16" if (dim // 8) % 2 else "float16"  # both dtypes, spread over the head dims
        case = validation.Case(dtype, dim, causal, seqlen_q, seqlen_k, group=group, window=window)
        found.append(SweepCase(path, case))
        if group > 1 and not small:
            found.append(SweepCase(path, case, deterministic=True))
    found.append(SweepCase("default", validation.Case("float16", 40, False, 33, 33, batch=1)))  # the first report
    return found


@contextlib.contextmanager
def configs_of(path: str, head_dim: int) -> Iterator[None]:
    """Run inside it with the configs `path` picks for head_dim (the default path forces nothing)."""
    if path == "default":
        yield
        return
    limits = gpu_classes.SMALLER_THAN_HOPPER[path]
    kernel_dim = kernel_head_dim(head_dim)  # (the compiled head dims are multiples of 8: padding changes nothing)
    with plan.forced(plan.default_fwd_config(kernel_dim, limits), plan.default_bwd_config(kernel_dim, limits)):
        yield


def run(sweep_case: SweepCase, check: bool = True) -> list[Comparison]:
    """Forward and backward of one case on the current GPU, compared with the float64 reference
    (without `check`, only the two calls: what the sanitizer needs, at a fraction of the launches)."""
    case = sweep_case.case
    with configs_of(sweep_case.path, case.head_dim):
        if check:
            return validation.run_gpu_case(case, deterministic=sweep_case.deterministic)
        from . import api

        dev = validation.to_device(case, validation.make_inputs(case))
        options = dict(causal=case.causal, window_size=case.window)
        out, lse = api.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **options)
        api.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse,
                               deterministic=sweep_case.deterministic, **options)
        return []


def by_id(case_id: str) -> SweepCase:
    """The case of that id (scripts/sanitize.py hands one id to each sanitized process)."""
    for sweep_case in cases():
        if sweep_case.id == case_id:
            return sweep_case
    raise KeyError(f"no memory-sweep case {case_id!r}; `python scripts/sanitize.py --list` lists them")
