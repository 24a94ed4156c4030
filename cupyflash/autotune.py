"""Tune block sizes on the GPU at hand.

A bucket is (pass, dtype, compiled head dim, masking, seqlen bucket, GQA or not), the key of
tuning.py. For each bucket the candidates are the config space pruned by `fits` (shared memory
and registers of this device), with the heuristic config always among them; each is compiled
(in parallel processes, into the disk cache), rejected if ptxas reports spills, validated
against the float64 reference on an awkward-length problem (a fast wrong config must never
win), screened with one timed run, and the best few timed properly with timing.do_bench on
the bucket's representative problem. The winner is stored after each bucket, so an
interrupted run keeps what it finished. Since the heuristic is a candidate, the stored
config is never slower than the heuristic one on the measured problem.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from . import build, plan, timing, tuning, validation
from .plan import BwdConfig
from .device import DeviceLimits, current_device_id, device_limits, require_cupy
from .problem import Problem

TOKENS, HIDDEN = 16384, 2048  # the FlashAttention papers' grid: batch * seqlen, heads * head_dim
SCREEN_KEEP = 4  # candidates that get the full timing after the one-run screen


@dataclass(frozen=True)
class Bucket:
    kind: str  # "fwd" | "bwd"
    dtype: str
    head_dim: int  # a compiled head dim
    causal: bool
    seqlen: int
    gqa: bool = False

    def problem(self) -> Problem:
        heads_q = max(4, HIDDEN // self.head_dim)
        return Problem(batch=max(1, TOKENS // self.seqlen), seqlen_q=self.seqlen, seqlen_k=self.seqlen,
                       heads_q=heads_q, heads_kv=heads_q // 4 if self.gqa else heads_q, head_dim=self.head_dim,
                       dtype=self.dtype, causal=self.causal, softmax_scale=self.head_dim ** -0.5,
                       window=(-1, 0) if self.causal else (-1, -1))

    @property
    def key(self) -> str:
        return tuning.bucket_key(self.kind, self.problem(), self.head_dim)


def default_buckets() -> list[Bucket]:
    """fwd and bwd x fp16, bf16 x head dims 64, 128, 256 x causal or not x seqlen 2048, 8192."""
    product = itertools.product(("fwd", "bwd"), ("float16", "bfloat16"), (64, 128, 256), (False, True), (2048, 8192))
    return [Bucket(kind, dtype, dim, causal, seqlen) for kind, dtype, dim, causal, seqlen in product]


def candidates(bucket: Bucket, limits: DeviceLimits) -> list[Any]:
    """The configs to try, heuristic first."""
    dim = bucket.head_dim
    if bucket.kind == "fwd":
        default = plan.default_fwd_config(dim, limits)
        found = plan.fwd_candidates(dim, limits)
    else:
        default = plan.default_bwd_config(dim, limits)
        found = [BwdConfig(dkdv, default.dq, atomic) for dkdv in plan.dkdv_candidates(dim, limits)
                 for atomic in (True, False)]
        found += [BwdConfig(default.dkdv, dq, False) for dq in plan.dq_candidates(dim, limits)]
    return [default] + [c for c in dict.fromkeys(found) if c != default]


def specs_of(bucket: Bucket, cfg: Any) -> list[build.KernelSpec]:
    """The kernels the bucket's calls run with cfg: plan.py's list."""
    problem = bucket.problem()
    if bucket.kind == "fwd":
        return [call.spec for call in plan.forward_kernels(problem, cfg)]
    return [call.spec for call in plan.backward_kernels(problem, cfg, deterministic=False)]


def _compile_one(spec: build.KernelSpec, arch: str) -> int | None:
    return build.cached_kernel(spec, arch).spill_bytes


def _spill_bytes(bucket: Bucket, cfg: Any, spills: dict[build.KernelSpec, int | None], limits: DeviceLimits) -> int:
    """Spills of cfg's kernels: from ptxas, or from the loaded kernel when ptxas said nothing."""
    total = 0
    for spec in specs_of(bucket, cfg):
        known = spills.get(spec)
        if known is None:
            smem = int(dict(spec.defines).get("CF_SMEM_BYTES", 0))  # the prep kernels take none
            known = build.local_memory_bytes(build.load_function(spec, current_device_id(), limits.arch, smem))
        total += known
    return total


def precompile(specs: list[build.KernelSpec], arch: str,
               jobs: int | None = None) -> dict[build.KernelSpec, int | None]:
    """Compiles every spec into the disk cache in parallel processes; returns spill bytes per spec."""
    unique = list(dict.fromkeys(specs))
    if len(unique) <= 1 or jobs == 1:
        return {spec: _compile_one(spec, arch) for spec in unique}
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds a CUDA context
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=context) as pool:
        return dict(zip(unique, pool.map(_compile_one, unique, itertools.repeat(arch))))


@dataclass
class BucketResult:
    bucket: Bucket
    heuristic: Any
    heuristic_ms: float
    best: Any
    best_ms: float
    rejected: dict[str, str] = field(default_factory=dict)  # config repr -> why

    def tflops(self, ms: float) -> float:
        p = self.bucket.problem()
        flops = 4.0 * p.batch * p.heads_q * p.seqlen_q * p.seqlen_k * p.head_dim * (0.5 if p.causal else 1.0)
        return flops * (2.5 if self.bucket.kind == "bwd" else 1.0) / (ms * 1e-3) / 1e12


def _forced(bucket: Bucket, cfg: Any) -> Any:
    return plan.forced(fwd=cfg) if bucket.kind == "fwd" else plan.forced(bwd=cfg)


_validated: dict[tuple[Any, ...], str | None] = {}


def validate(bucket: Bucket, cfg: Any) -> str | None:
    """None when cfg passes the tolerance rule on an awkward-length problem, else why not.
    Remembered per (pass, dtype, head dim, masking, GQA, config): the seqlen bucket does not
    change the kernel."""
    memo = (bucket.kind, bucket.dtype, bucket.head_dim, bucket.causal, bucket.gqa, cfg)
    if memo not in _validated:
        _validated[memo] = _validate_once(bucket, cfg)
    return _validated[memo]


def _validate_once(bucket: Bucket, cfg: Any) -> str | None:
    case = validation.Case(bucket.dtype, bucket.head_dim, bucket.causal, 317, 389, group=4 if bucket.gqa else 1,
                           batch=1)
    with _forced(bucket, cfg):
        results = validation.run_gpu_case(case, backward=bucket.kind == "bwd")
    failed = [r.message() for r in results if not r.ok]
    return "; ".join(failed) if failed else None


def _runner(bucket: Bucket) -> Callable[[], Any]:
    """A closure running the bucket's representative problem through the public API."""
    from . import api

    cupy, p = require_cupy(), bucket.problem()
    shape_q = (p.batch, p.seqlen_q, p.heads_q, p.head_dim)
    shape_kv = (p.batch, p.seqlen_k, p.heads_kv, p.head_dim)
    data = validation.random_inputs(shape_q, shape_kv, p.dtype, xp=cupy)
    q, k, v, dout = data["q"], data["k"], data["v"], data["dout"]
    if bucket.kind == "fwd":
        return lambda: api.attention(q, k, v, causal=p.causal)
    out, lse = api.attention(q, k, v, causal=p.causal, return_lse=True)
    return lambda: api.attention_backward(dout, q, k, v, out, lse, causal=p.causal)


def tune_bucket(bucket: Bucket, limits: DeviceLimits, spills: dict[build.KernelSpec, int | None],
                progress: Callable[[str], None] = lambda message: None) -> BucketResult:
    run = _runner(bucket)
    rejected: dict[str, str] = {}
    screened: list[tuple[float, Any]] = []
    for cfg in candidates(bucket, limits):
        progress(f"{bucket.key} {cfg}")
        spilled = _spill_bytes(bucket, cfg, spills, limits)
        why = f"spills {spilled} bytes" if spilled else validate(bucket, cfg)
        if why:
            rejected[repr(cfg)] = why
            continue
        with _forced(bucket, cfg):
            screened.append((timing.do_bench(run, warmup=1, runs=1).median_ms, cfg))
    if not screened:
        raise RuntimeError(f"{bucket.key}: every candidate was rejected: {rejected}")
    heuristic = candidates(bucket, limits)[0]
    finalists = [cfg for _, cfg in sorted(screened, key=lambda item: item[0])[:SCREEN_KEEP]]
    finalists += [heuristic] if heuristic not in finalists and repr(heuristic) not in rejected else []
    timed = {}
    for cfg in finalists:
        with _forced(bucket, cfg):
            timed[cfg] = timing.do_bench(run, warmup=2, runs=10).median_ms
    best = min(timed, key=timed.get)
    return BucketResult(bucket, heuristic, timed.get(heuristic, float("nan")), best, timed[best], rejected)


def tune(buckets: list[Bucket], *, progress: Callable[[str], None] = lambda message: None,
         on_result: Callable[[BucketResult], None] = lambda result: None, store: bool = True) -> list[BucketResult]:
    """Tunes each bucket in turn, storing each winner as soon as it is known."""
    device_id = current_device_id()
    limits = device_limits(device_id)
    progress(f"compiling candidates for {len(buckets)} buckets")
    specs = [spec for b in buckets for cfg in candidates(b, limits) for spec in specs_of(b, cfg)]
    spills = precompile(specs, limits.arch)
    results = []
    for bucket in buckets:
        result = tune_bucket(bucket, limits, spills, progress)
        if store:
            tuning.store(limits, bucket.key, result.best, {"ms": result.best_ms, "heuristic_ms": result.heuristic_ms,
                                                           "tflops": result.tflops(result.best_ms)})
        results.append(result)
        on_result(result)
    return results


def candidate_count(buckets: list[Bucket]) -> int:
    limits = device_limits(current_device_id())
    return sum(len(candidates(b, limits)) for b in buckets)

