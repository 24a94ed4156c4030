"""The memory-safety sweep: every kernel family and path on small, awkward shapes.

An out-of-bounds write is silent in the results and corrupts a caller's neighbouring arrays, so
two checks run the same list of cases on a GPU: tests/test_gpu_guard.py surrounds every
allocation with guard bytes and checks them after the call, and scripts/sanitize.py runs each
case in its own process under compute-sanitizer (memcheck; racecheck and synccheck on the
smaller list). A case names a path (the kernels the GPU picks by default, the configs an A100
or an RTX 4090 would pick, or a Hopper TMA forward config, forced through plan.forced), a
validation.Case (head dim, lengths, GQA, causal or window) or a PackedCase (a packed batch for
attention_varlen: lengths per sequence, empty ones included, seqused_k, keys no sequence owns)
and whether the backward is the deterministic one; or a MergeCase (merge_cases.py:
merge_attention over key slices); or a DecodeCase (kvcache_cases.py: attention_with_kvcache with
appends into a contiguous or paged cache).

    from cupyflash import memory_sweep
    for case in memory_sweep.cases():
        memory_sweep.run(case)          # forward + backward, results checked against float64

PackedCase and its helpers (inputs, the calls, per-sequence references and comparisons) live
in packed_cases.py, which `cupyflash validate` and tests/test_gpu_varlen.py use too.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator

from . import gpu_classes, plan, validation
from .kernels import flash_bwd_dkdv_sm90, flash_decode
from .kernels.common import kernel_head_dim
from .kvcache import decode_copies
from .kvcache_cases import DecodeCase, compare_case, run_case
from .merge_cases import MergeCase, compare_merge, run_merge
from .packed_cases import PackedCase, compare_varlen, varlen_calls, varlen_inputs, varlen_references, varlen_to_device
from .tolerance import Comparison

PATHS = ("default", *gpu_classes.SMALLER_THAN_HOPPER)  # default, a100, rtx4090
# Hopper's forward with bulk tensor copies (kernels/flash_fwd_tma.py) in a config its defaults do
# not all use: turn-taking warpgroups and the deepest pipeline. On other GPUs this path runs the
# default kernels.
TMA_PATH = "tma"
# Decode cases again with flash_decode's bulk tensor copies forced on (flash_decode.bulk_copies_enabled),
# where an sm_90 GPU can take them; on other GPUs the default copies.
BULK_DECODE = "bulk-copies"
# Hopper's wgmma dK/dV forced, adding dQ by bulk reductions, at the head dims where that is not
# their default (flash_bwd_dkdv_sm90.DEFAULT_HEAD_DIMS and atomic_dq_by_default): there the default
# path sweeps the same build. Today 160, 192 and 256, whose default leaves dQ to its own pass. On
# other GPUs the default kernels.
WGMMA_DKDV = "wgmma-dkdv"
WGMMA_DKDV_HEAD_DIMS = tuple(d for d in (32, 72, 96, 160, 192, 256)
                             if kernel_head_dim(d) not in flash_bwd_dkdv_sm90.DEFAULT_HEAD_DIMS
                             or not flash_bwd_dkdv_sm90.atomic_dq_by_default(kernel_head_dim(d)))
# Racecheck and synccheck: builds the small set's default head dims (SMALL_HEAD_DIMS) lack. 32 (tiles
# of 64 over a depth of 32) and 160 (256-column tiles that the two warpgroups split below 256; racecheck
# reported hazards on it, 2026-12-07), both adding dQ.
WGMMA_DKDV_SMALL_HEAD_DIMS = (32, 160)
# The deterministic dQ pass in the small set, on the causal GQA shape with rows that see no key:
# on Hopper its wgmma builds of tiles 64 (two warpgroups), 128 (96 zero-filled), 192 (160) and 256
# (one warpgroup); the mma.sync ones elsewhere.
DETERMINISTIC_SMALL_HEAD_DIMS = (40, 96, 160, 256)
# Every compiled head dim (32 ... 256) is reached, and padded ones between them: 8 and 40 run on
# the 32 and 64 kernels, 72 on 96, 200 on 256.
HEAD_DIMS = (8, 32, 40, 48, 64, 72, 96, 128, 160, 192, 200, 256)
SMALL_HEAD_DIMS = (40, 64, 96, 128, 256)
# (seqlen_q, seqlen_k, group, causal, window): lengths that are multiples of no tile; fewer and
# more queries than keys; GQA; some rows that see no key (causal 203 x 113); a sliding window.
SHAPES = ((33, 33, 1, False, (-1, -1)), (33, 130, 2, True, (-1, -1)), (203, 113, 4, True, (-1, -1)),
          (130, 97, 1, False, (17, 5)))
# Varlen: the kernels of head dims 64 (reached padded, from 40), 96 (from 72), 128 and 256; both dtypes.
VARLEN_HEAD_DIMS = (40, 72, 128, 256)
# (seqlens_q, seqlens_k, seqused_k, spare_k, group, causal, window), one packed batch each: lengths
# that are multiples of no tile; sequences with no query or no key; rows that see no key (causal
# 130 queries x 1 key, 17 queries x 0 used keys); keys no sequence uses (seqused_k below the owned
# keys, spare keys after cu_seqlens_k[-1]); GQA; a sliding window.
VARLEN_SHAPES = (((33, 0, 130, 1), (130, 17, 1, 0), None, 0, 2, True, (-1, -1)),
                 ((1, 97, 0, 203, 17), (113, 0, 33, 203, 5), (100, 0, 33, 150, 0), 9, 4, False, (17, 5)),
                 ((203, 64, 1), (113, 130, 1), None, 3, 1, False, (-1, -1)))
# What racecheck and synccheck run of them: the Hopper default and an A100's mma.sync kernels.
VARLEN_SMALL = (("default", 128, 0), ("a100", 72, 1))
# merge_attention (one kernel for every GPU, so the default path only): parts that saw no key,
# one part, many parts, head dims 40 to 256 (40 and 72: columns not a multiple of a warp), GQA.
MERGE_CASES = (MergeCase("bfloat16", 128, 33, (50, 0, 77, 1), group=4), MergeCase("float16", 40, 1, (17,)),
               MergeCase("bfloat16", 256, 130, (0, 0)), MergeCase("float16", 72, 203, (1, 2, 3, 4, 5, 6, 7, 300)))

# attention_with_kvcache (default path, and BULK_DECODE for the cases whose head dim and pages bulk
# tensor copies take): paged caches with pages of 1, 3, 16, 32 and 128 keys and appends, contiguous and slotted ones; split counts from the
# heuristic, forced ones and split_size; sequences of 0 and 1 keys; 17 query tokens and windows;
# 16 to 128 packed rows; head dims 64, 72 (run on 96), 128, 192 and 256. Split counts 2, 4 and 8
# merge inside a thread-block cluster on sm_90 and up (the third case is in the small set): their
# grids stay within flash_decode.cluster_size's limits (a quarter of the resident slots for 4 and 8).
DECODE_CASES = (DecodeCase("float16", 128, 1, (0, 1, 255), page_size=16, seqlen_new=1),
                DecodeCase("bfloat16", 72, 17, (300, 65), group=2, seqlen_new=17, num_splits=3, window=(50, 0)),
                DecodeCase("bfloat16", 128, 1, (0, 700, 3000), group=4, seqlen_new=1, num_splits=8),
                DecodeCase("float16", 256, 16, (500, 40), group=4, heads_kv=1, page_size=16, seqlen_new=16,
                           num_splits=4),
                DecodeCase("float16", 256, 3, (100, 1), slots=True, seqlen_new=2, num_splits=1),
                DecodeCase("bfloat16", 64, 16, (130, 7), group=8, page_size=1, num_splits=5),
                DecodeCase("bfloat16", 192, 2, (70,), group=16, heads_kv=1, split_size=64, page_size=3),
                DecodeCase("bfloat16", 80, 1, (700, 129), page_size=32, seqlen_new=1),  # 2 pages per full tile
                DecodeCase("float16", 128, 4, (1000,), page_size=128, num_splits=2),
                DecodeCase("float16", 64, 2, (90, 33), page_size=32, seqlen_new=2, num_splits=3))  # 2 boxes a tile


@dataclass(frozen=True)
class SweepCase:
    path: str  # "default", a key of gpu_classes.SMALLER_THAN_HOPPER, TMA_PATH or BULK_DECODE
    case: validation.Case | PackedCase | MergeCase | DecodeCase
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
    for path, dim, shape in itertools.product(PATHS, dims, shapes):
        case = _dense_case(dim, shape)
        found.append(SweepCase(path, case))
        if case.group > 1 and not small:
            found.append(SweepCase(path, case, deterministic=True))
    found.append(SweepCase("default", validation.Case("float16", 40, False, 33, 33, batch=1)))  # the first report
    if small:
        found += [SweepCase("default", _dense_case(dim, SHAPES[2]), deterministic=True)
                  for dim in DETERMINISTIC_SMALL_HEAD_DIMS]
    found += [SweepCase(WGMMA_DKDV, _dense_case(dim, shape))
              for dim, shape in itertools.product(WGMMA_DKDV_SMALL_HEAD_DIMS if small else WGMMA_DKDV_HEAD_DIMS,
                                                  shapes)]
    found += [SweepCase(TMA_PATH, _dense_case(dim, shape))
              for dim, shape in itertools.product(SMALL_HEAD_DIMS[1:3] if small else SMALL_HEAD_DIMS, shapes)]
    merges = [SweepCase("default", c) for c in (MERGE_CASES[:1] if small else MERGE_CASES)]
    chosen = DECODE_CASES[:3] if small else DECODE_CASES
    decodes = [SweepCase("default", c) for c in chosen]
    decodes += [SweepCase(BULK_DECODE, c) for c in chosen
                if flash_decode.kernel_head_dim(c.head_dim) in flash_decode.BULK_HEAD_DIMS
                and flash_decode.box_rows(c.page_size, c.page_size > 0)]
    return found + varlen_cases(small) + merges + decodes


def _dtype_of(dim: int) -> str:
    """Both dtypes, spread over the head dims."""
    return "bfloat16" if (dim // 8) % 2 else "float16"


def _dense_case(dim: int, shape: tuple) -> validation.Case:
    seqlen_q, seqlen_k, group, causal, window = shape
    return validation.Case(_dtype_of(dim), dim, causal, seqlen_q, seqlen_k, group=group, window=window)


def _varlen_sweep_case(dim: int, shape: int) -> PackedCase:
    seqlens_q, seqlens_k, seqused_k, spare_k, group, causal, window = VARLEN_SHAPES[shape]
    return PackedCase(_dtype_of(dim), dim, causal, seqlens_q, seqlens_k, seqused_k, group=group, window=window,
                      spare_k=spare_k)


def varlen_cases(small: bool = False) -> list[SweepCase]:
    """Paths x varlen head dims x packed batches, and the deterministic backward on the batch
    with seqused_k; `small` is the two racecheck and synccheck run (VARLEN_SMALL)."""
    if small:
        return [SweepCase(path, _varlen_sweep_case(dim, shape)) for path, dim, shape in VARLEN_SMALL]
    found = []
    for path, dim, shape in itertools.product(PATHS, VARLEN_HEAD_DIMS, range(len(VARLEN_SHAPES))):
        case = _varlen_sweep_case(dim, shape)
        found.append(SweepCase(path, case))
        if case.seqused_k is not None:
            found.append(SweepCase(path, case, deterministic=True))
    return found


@contextlib.contextmanager
def configs_of(path: str, head_dim: int) -> Iterator[None]:
    """Run inside it with the configs `path` picks for head_dim (the default path forces nothing)."""
    if path == "default":
        yield
        return
    if path == TMA_PATH:
        with _tma_forward(head_dim):
            yield
        return
    if path == WGMMA_DKDV:
        with _wgmma_dkdv(head_dim):
            yield
        return
    if path == BULK_DECODE:
        with decode_copies(bulk=True):
            yield
        return
    limits = gpu_classes.SMALLER_THAN_HOPPER[path]
    kernel_dim = kernel_head_dim(head_dim)  # (the compiled head dims are multiples of 8: padding changes nothing)
    with plan.forced(plan.default_fwd_config(kernel_dim, limits), plan.default_bwd_config(kernel_dim, limits)):
        yield


@contextlib.contextmanager
def _tma_forward(head_dim: int) -> Iterator[None]:
    from .device import current_device_id, device_limits
    from .kernels import flash_fwd_tma

    limits = device_limits(current_device_id())
    kernel_dim = kernel_head_dim(head_dim)
    configs = [c for c in flash_fwd_tma.candidates(kernel_dim, limits) if c.pingpong and not c.wide_pv]
    if not configs:  # not a Hopper GPU
        yield
        return
    with plan.forced(configs[-1], plan.default_bwd_config(kernel_dim, limits)):
        yield


@contextlib.contextmanager
def _wgmma_dkdv(head_dim: int) -> Iterator[None]:
    from .device import current_device_id, device_limits

    limits = device_limits(current_device_id())
    kernel_dim = kernel_head_dim(head_dim)
    dkdv = flash_bwd_dkdv_sm90.table_config(kernel_dim, limits)
    if dkdv is None:  # not a Hopper GPU
        yield
        return
    bwd = plan.BwdConfig(dkdv, plan.default_bwd_config(kernel_dim, limits).dq, dq_atomic=True)
    with plan.forced(bwd=bwd):
        yield


def run(sweep_case: SweepCase, check: bool = True) -> list[Comparison]:
    """Forward and backward of one case on the current GPU, compared with the float64 reference
    (without `check`, only the two calls: what the sanitizer needs, at a fraction of the launches)."""
    case = sweep_case.case
    with configs_of(sweep_case.path, case.head_dim):
        if isinstance(case, PackedCase):
            return run_varlen(case, deterministic=sweep_case.deterministic, check=check)
        if isinstance(case, MergeCase):
            host = case.inputs()
            results = run_merge(case, host, poison=check)
            return compare_merge(case, host, results) if check else []
        if isinstance(case, DecodeCase):
            host = case.inputs()
            results = run_case(case, host, poison=check)
            return compare_case(case, host, results) if check else []
        if check:
            return validation.run_gpu_case(case, deterministic=sweep_case.deterministic)
        from . import api

        dev = validation.to_device(case, validation.make_inputs(case))
        options = dict(causal=case.causal, window_size=case.window)
        out, lse = api.attention(dev["q"], dev["k"], dev["v"], return_lse=True, **options)
        api.attention_backward(dev["dout"], dev["q"], dev["k"], dev["v"], out, lse,
                               deterministic=sweep_case.deterministic, **options)
        return []


def run_varlen(case: PackedCase, *, deterministic: bool = False, check: bool = True) -> list[Comparison]:
    """attention_varlen and its backward on one packed batch; with `check`, into NaN-poisoned
    pool blocks and compared, sequence by sequence, with the float64 reference."""
    host = varlen_inputs(case)
    results = varlen_calls(case, varlen_to_device(case, host), deterministic=deterministic, poison=check)
    if not check:
        return []
    return compare_varlen(case, {name: array.get() for name, array in results.items()}, varlen_references(case, host))



def by_id(case_id: str) -> SweepCase:
    """The case of that id (scripts/sanitize.py hands one id to each sanitized process), from the
    sweep or its small set (which has cases of its own, e.g. the wgmma dK/dV at head dim 32)."""
    for sweep_case in itertools.chain(cases(), cases(small=True)):
        if sweep_case.id == case_id:
            return sweep_case
    raise KeyError(f"no memory-sweep case {case_id!r}; `python scripts/sanitize.py --list` lists them")
