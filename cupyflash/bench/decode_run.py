"""run_decode(): attention_with_kvcache on full caches beside torch's SDPA, in one process,
every result checked before it is timed, every rate in TB/s beside the GPU's copy bandwidth
measured at the start of the same run.

    cupyflash           attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=<int32 array,
                        every entry the cache length>, causal=True, num_splits=0: the library's
                        own split heuristic)
    cupyflash-paged{P}  the same call on the same keys in pages of P tokens, stored in a random
                        physical order (decode.block_table), with block_table=
    torch-cudnn         SDPA under sdpa_kernel(CUDNN_ATTENTION) on (B, H, S, D) views of the same
                        arrays, enable_gqa=True. One query token needs no mask; more get an
                        explicit boolean attn_mask, bottom-right (SDPA's is_causal is top-left)
    torch-flash         SDPA under sdpa_kernel(FLASH_ATTENTION), enable_gqa=True, for one query
                        token; for more, aten._scaled_dot_product_flash_attention(is_causal=True),
                        whose causal mask is FlashAttention-2's own bottom-right one (SDPA's
                        flash path takes no attn_mask; torch.nn.attention.bias makes this very
                        call for causal_lower_right), fewer kv heads taken as they are

Either peer falls back to k and v repeat_interleave'd to heads_q when its GQA path raises and
the copies fit; its row says which ("gqa") and how it masked ("mask"). A peer that raises or
declines gets a row with its "failure"; the run goes on.

Timing: every implementation and layout on its own (measure.timed; a torch peer inside
peers.impl_context, which pins the backend and makes CuPy's stream torch's), one after another
in the same process. Not in alternation: the contiguous cache timed in turn with its paged
copies (another few GB read between its calls) ran 12% slower than alone at batch 16 x 32k on an
H200, while the peers, which no alternation can straddle, are timed alone
(benchmarks/results/h200-2026-12-04-decode-l2/README.md). A time is the CUDA-event interval around one
call, so it includes the host's own work wherever the GPU waits for it: the smallest cells, a
few microseconds of GPU work, measure the launch path as much as the kernels.

Checks: bench.check's float64 reference (cupyflash.reference, in pieces of (batch, kv heads))
with pieces sized for decode (reference_parts), judged by cupyflash.tolerance's rule
(check.judge). A paged result is judged against the contiguous cache's reference: its pages
hold the same keys.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import environment, reference, tolerance, validation
from ..device import require_cupy
from ..problem import numpy_dtype
from ..timing import Timing, do_bench
from . import check, measure, peers
from .decode import (BANDWIDTH_BAR, BANDWIDTH_MIN_TOKENS, CACHE_MEMORY_FRACTION, CUDNN_BAR, CUDNN_BAR_MANY,
                     MANY_QUERY_TOKENS, OURS, PAGED_BAR, PAGED_MIN_PAGE, TORCH_PEERS, DecodeCell, block_table,
                     cell_impls, memory_plan, page_size_of, paged_impl, tbps)
from .decode_report import summarize_decode
from .gpu import MIB, first_call, free_device_bytes, free_memory, nbytes, peak_extra_bytes, short

Array = Any  # a cupy.ndarray (numpy.ndarray where a function says so)
Progress = Callable[[str], None]
GB = 1e9
COPY_BYTES = 2 * 2**30  # the copy-bandwidth source buffer; the destination is as large
COPY_MEMORY_FRACTION = 0.5  # ... and both together stay within this share of the free memory
COPY_MIN_RUNS = 5
MASKS = {"none": "no mask: one query token sees every key",
         "boolean": "boolean attn_mask, bottom-right causal (SDPA's is_causal is top-left)",
         "flash-op": "aten._scaled_dot_product_flash_attention(is_causal=True): FlashAttention-2's bottom-right causal"}


# --------------------------------------------------------------------------- copy bandwidth


def _time_copy(nbytes: int, runs: int, warmup: int) -> Timing:
    """do_bench of one cudaMemcpyAsync of nbytes between two buffers of its own."""
    cupy = require_cupy()
    source = cupy.ones(nbytes, dtype=cupy.uint8)
    target = cupy.empty_like(source)
    stream = cupy.cuda.get_current_stream()
    return do_bench(lambda: target.data.copy_from_device_async(source.data, nbytes, stream), warmup=warmup, runs=runs)


def copy_bandwidth(runs: int, warmup: int, nbytes: int = COPY_BYTES) -> dict[str, Any]:
    """The GPU's copy bandwidth: one device-to-device cudaMemcpyAsync of nbytes (less when the
    two buffers would pass COPY_MEMORY_FRACTION of the free memory), timed by do_bench (median
    of max(runs, COPY_MIN_RUNS)); tbps counts the bytes read and the bytes written."""
    nbytes = min(nbytes, int(COPY_MEMORY_FRACTION * free_device_bytes()) // 2)
    if nbytes < MIB:
        raise RuntimeError(f"{nbytes} bytes free for the copy-bandwidth buffers; the GPU's memory is taken")
    timing = _time_copy(nbytes, max(runs, COPY_MIN_RUNS), warmup)
    free_memory()  # the two buffers
    return {"bytes": nbytes, "ms": timing.median_ms, "ms_min": timing.min_ms, "ms_max": timing.max_ms,
            "runs": timing.runs, "tbps": tbps(2 * nbytes, timing.median_ms),
            "method": "cudaMemcpyAsync device to device; bytes read + bytes written over the median time"}


def add_bandwidth(row: dict[str, Any], copy_tbps: float | None) -> dict[str, Any]:
    """row with tbps (kv_bytes over its median time) and copy_fraction (tbps / copy_tbps) when it has a time."""
    if isinstance(row.get("ms"), (int, float)) and row["ms"] > 0:
        row["tbps"] = tbps(row["kv_bytes"], row["ms"])
        row["copy_fraction"] = row["tbps"] / copy_tbps if copy_tbps else None
    return row


# --------------------------------------------------------------------------- inputs and layouts


def _bits(array: Array) -> Array:
    """The 16-bit values as int16: copies and scatters of them need no bfloat16 support."""
    return array.view(np.int16)


def cell_inputs(cell: DecodeCell, seed: int = 0) -> dict[str, Array]:
    """Signed normal q (B, Sq, Hq, D) and caches k, v (B, cache, Hkv, D) in cell.dtype on the
    current GPU. Sequence b is drawn by validation.random_inputs with seed + b, so that its
    float32 draw holds one sequence's cache, never the batch's."""
    cupy = require_cupy()
    dtype = numpy_dtype(cell.dtype)
    data = {"q": cupy.empty(cell.q_dims, dtype), "k": cupy.empty(cell.cache_dims, dtype),
            "v": cupy.empty(cell.cache_dims, dtype)}
    q_dims, cache_dims = (1, *cell.q_dims[1:]), (1, *cell.cache_dims[1:])
    for b in range(cell.batch):
        drawn = validation.random_inputs(q_dims, cache_dims, cell.dtype, seed=seed + b, xp=cupy)
        for name, array in data.items():
            _bits(array)[b] = _bits(drawn[name])[0]
    return data


def paged_cache(cache: Array, page_size: int, table: Array, xp: Any) -> Array:
    """A contiguous cache (B, S, H, D) as pages (B * S // page_size, page_size, H, D): page j
    of sequence b stored at physical page table[b, j]. NumPy or CuPy arrays (xp)."""
    batch, seqlen, heads, dim = cache.shape
    if table.shape != (batch, seqlen // page_size) or seqlen % page_size:
        raise ValueError(f"table has shape {tuple(table.shape)} for a cache of {tuple(cache.shape)} in pages of "
                         f"{page_size}; it must be (batch, seqlen // page_size) with page_size dividing seqlen")
    pages = xp.empty((table.size, page_size, heads, dim), dtype=cache.dtype)
    _bits(pages)[table.reshape(-1)] = _bits(cache).reshape(table.size, page_size, heads, dim)
    return pages


@dataclass
class Paged:
    """One paged layout of a cell's cache: pages k, v (num_pages, page_size, Hkv, D) and the
    int32 block table (batch, cache // page_size), all on the GPU."""

    page_size: int
    k: Array
    v: Array
    table: Array


def paged_layout(cell: DecodeCell, data: dict[str, Array], page_size: int, seed: int = 0) -> Paged:
    cupy = require_cupy()
    table = cupy.asarray(block_table(cell.batch, cell.cache // page_size, seed))
    return Paged(page_size, paged_cache(data["k"], page_size, table, cupy), paged_cache(data["v"], page_size, table,
                                                                                         cupy), table)


# --------------------------------------------------------------------------- the check


def reference_head_bytes(cell: DecodeCell) -> int:
    """Bytes reference.py holds for one kv head of one sequence: its scores (check.head_bytes)
    and, per element of K and of V, the float32 copy bench.check hands it (4), its float64 load
    (8), and float64 copies of the head repeated for its `group` query heads and of those made
    contiguous for the matmul (2 x 8 x group). Counted from the code, not measured: an upper
    bound. At a few query tokens the K and V copies dominate, not the scores."""
    per_element = 4 + 8 + 16 * cell.group
    return check.head_bytes(cell.seqlen_q, cell.cache, cell.group) + 2 * cell.cache * cell.head_dim * per_element


def reference_parts(cell: DecodeCell, budget: float) -> list[tuple[slice, slice]]:
    """check.pieces of the cell, each within `budget` bytes by reference_head_bytes.
    check.pieces counts a kv head's scores only (check.head_bytes, right when seqlen_q is near
    seqlen_k), so the budget handed to it is scaled by scores / reference_head_bytes."""
    scores = check.head_bytes(cell.seqlen_q, cell.cache, cell.group)
    return check.pieces(cell.batch, cell.heads_kv, cell.seqlen_q, cell.cache, cell.group,
                        budget * scores / reference_head_bytes(cell))


def decode_reference(cell: DecodeCell, data: dict[str, Array], free_bytes: int, xp: Any) -> check.Reference:
    """bench.check's reference of out: every element when one kv head fits
    REFERENCE_MEMORY_FRACTION of free_bytes (pieces by reference_parts), else, or when that
    fails, the query rows of batch element 0 (check.slice_reference), as check.reference_for
    does. data: q, k, v, arrays of xp; check's inputs also name dout, which the forward never
    reads: q stands in."""
    inputs = {**data, "dout": data["q"]}
    parts = reference_parts(cell, check.REFERENCE_MEMORY_FRACTION * free_bytes)
    if parts:
        try:
            return check.full_reference(inputs, True, cell.dtype, ["out"], parts, xp)
        except Exception as exc:  # out of memory after all: the slice still checks something
            reason = f"full reference failed: {short(exc)}"
        free_memory()
    else:
        reason = (f"one kv head of the reference would need {reference_head_bytes(cell) / GB:.1f} GB (allowed: "
                  f"{check.REFERENCE_MEMORY_FRACTION:.0%} of {free_bytes / GB:.1f} GB free)")
    try:
        return replace(check.slice_reference(inputs, True, cell.dtype, ["out"], check.CHECK_ROWS, xp), note=reason)
    except Exception as exc:
        return check.Reference(None, {}, {}, note=f"{reason}; slice reference failed: {short(exc)}")


# --------------------------------------------------------------------------- the torch peers


def torch_peers() -> tuple[tuple[str, ...], str]:
    """The torch peers of this installation and a note saying why: () and the reason without PyTorch."""
    try:
        if importlib.util.find_spec("torch") is None:
            return (), "PyTorch not installed: no peers"
        torch = peers._import_torch()
    except Exception as exc:  # a broken installation counts as none
        return (), f"no torch peers: {short(exc)}"
    return TORCH_PEERS, f"torch {torch.__version__}: SDPA's cuDNN and flash backends"


def mask_mode(impl: str, seqlen_q: int) -> str:
    """How a torch peer applies the bottom-right causal mask (a key of MASKS)."""
    if seqlen_q == 1:
        return "none"
    return "flash-op" if impl == "torch-flash" else "boolean"


def gqa_modes(mask: str, group: int) -> tuple[str, ...]:
    """How a torch peer meets fewer kv heads than query heads, in the order tried: SDPA takes
    enable_gqa=True, the flash op takes them as they are ("native"); then k and v
    repeat_interleave'd to heads_q. Equal heads need nothing."""
    if group == 1:
        return ("equal heads",)
    return ("native" if mask == "flash-op" else "enable_gqa", "repeat_interleave")


def _torch_fn(torch: Any, mask: str, gqa: str, q: Any, k: Any, v: Any, cell: DecodeCell) -> Callable[[], Any]:
    """The peer's call on (B, H, S, D) tensors, masked per `mask`, GQA per `gqa`; returns (B, Hq, Sq, D)."""
    if gqa == "repeat_interleave":
        k, v = (t.repeat_interleave(cell.group, dim=1) for t in (k, v))
    if mask == "flash-op":
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        return lambda: flash(q, k, v, 0.0, True, False)[0]  # dropout_p, is_causal, return_debug_mask
    options: dict[str, Any] = {"enable_gqa": True} if gqa == "enable_gqa" else {}
    if mask == "boolean":
        visible = reference.visible_mask(cell.seqlen_q, cell.cache, causal=True)  # True where a key is seen
        options["attn_mask"] = torch.from_numpy(visible).to(q.device)[None, None]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(q, k, v, **options)


def _setup_torch(impl: str, cell: DecodeCell, data: dict[str, Array]) -> peers.Setup:
    """A torch peer ready to time (inside peers.impl_context(impl)): the GQA modes tried in
    order, repeat_interleave only when its copies fit CACHE_MEMORY_FRACTION of the free memory.
    Raises with every attempt's reason when none runs."""
    torch = peers._import_torch()
    q, k, v = (peers._to_torch(torch, data[n], contiguous=False) for n in ("q", "k", "v"))
    mask, reasons = mask_mode(impl, cell.seqlen_q), []
    for gqa in gqa_modes(mask, cell.group):
        need = cell.kv_bytes * cell.group
        if gqa == "repeat_interleave" and need > CACHE_MEMORY_FRACTION * free_device_bytes():
            reasons.append(f"repeat_interleave: its copies would need {need / GB:.1f} GB")
            continue
        try:
            fn = _torch_fn(torch, mask, gqa, q, k, v, cell)
            out = peers._from_torch(torch, fn(), cell.dtype)
        except (RuntimeError, TypeError) as exc:  # a backend declining; a torch without enable_gqa
            reasons.append(f"{gqa}: {short(exc)}")
            continue
        return peers.Setup(fn, (out,), {"gqa": gqa, "mask": MASKS[mask]})
    raise RuntimeError(f"{impl} declined every way tried: " + "; ".join(reasons))


# --------------------------------------------------------------------------- cupyflash


def _setup_cupyflash(cell: DecodeCell, data: dict[str, Array], seqlens: Array, paged: Paged | None) -> peers.Setup:
    import cupyflash

    q = data["q"]
    k, v, table = (data["k"], data["v"], None) if paged is None else (paged.k, paged.v, paged.table)

    def fn() -> Any:
        return cupyflash.attention_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table, causal=True,
                                                num_splits=0)

    first, wall_ms, new_cubins = first_call(fn)
    again, peak = peak_extra_bytes(fn)
    extra = {"first_call_ms": wall_ms, "new_cubins": new_cubins, "peak_extra_mb": peak / MIB,
             "output_mb": nbytes(again) / MIB}
    return peers.Setup(fn, (first,), extra)


# --------------------------------------------------------------------------- rows


def _row(impl: str, cell: DecodeCell) -> dict[str, Any]:
    page = page_size_of(impl)
    return {"id": cell.id, "impl": impl, "layout": "contiguous" if page is None else "paged", "page_size": page,
            "dtype": cell.dtype, "head_dim": cell.head_dim, "heads_q": cell.heads_q, "heads_kv": cell.heads_kv,
            "seqlen_q": cell.seqlen_q, "batch": cell.batch, "cache": cell.cache, "tokens": cell.tokens,
            "kv_bytes": cell.kv_bytes, "flops": cell.flops, "ms": None, "tflops": None, "tbps": None,
            "copy_fraction": None, "valid": None, "error": None}


def _rate(cell: DecodeCell) -> Callable[[float], float]:
    return lambda ms: cell.flops / (ms * 1e-3) / 1e12


def measure_ours(cell: DecodeCell, data: dict[str, Array], ref: check.Reference, layouts: Sequence[Paged],
                 runs: int, warmup: int) -> list[dict[str, Any]]:
    """The cupyflash row and one per paged layout, each checked, then timed on its own."""
    cupy = require_cupy()
    seqlens = cupy.full((cell.batch,), cell.cache, dtype=cupy.int32)
    choices: list[Paged | None] = [None, *layouts]
    rows = [_row(OURS if p is None else paged_impl(p.page_size), cell) for p in choices]

    def prepare(row: dict[str, Any], paged: Paged | None) -> Callable[[], Callable[[], Any]]:
        def ready() -> Callable[[], Any]:
            setup = _setup_cupyflash(cell, data, seqlens, paged)
            measure._add(row, setup.extra)
            measure._add(row, check.judge(ref, "fwd", setup.outputs, cell.dtype, cupy))
            return setup.fn

        return ready

    return [measure.timed(row, row["impl"], prepare(row, paged), runs, warmup, _rate(cell))
            for row, paged in zip(rows, choices)]


def measure_peer(impl: str, cell: DecodeCell, data: dict[str, Array], ref: check.Reference, runs: int,
                 warmup: int) -> dict[str, Any]:
    """One torch peer's row: set up inside its context, checked, timed on its own."""
    row = _row(impl, cell)

    def prepare() -> Callable[[], Any]:
        setup = _setup_torch(impl, cell, data)
        measure._add(row, setup.extra)
        measure._add(row, check.judge(ref, "fwd", setup.outputs, cell.dtype, require_cupy()))
        return setup.fn

    return measure.timed(row, impl, prepare, runs, warmup, _rate(cell))


def describe(row: dict[str, Any]) -> str:
    """One progress line for a finished row: measure's outcome, then its TB/s and share of the copy bandwidth."""
    line = measure.describe_outcome(f"{row['id']} {row['impl']}: ", row)
    if row.get("tbps") is not None and not row.get("failure"):
        line += f", {row['tbps']:.2f} TB/s"
        if row.get("copy_fraction") is not None:
            line += f" ({row['copy_fraction']:.0%} of copy)"
    return line


def _cell_rows(cell: DecodeCell, torch_impls: Sequence[str], runs: int, warmup: int) -> Iterator[dict[str, Any]]:
    """Every row of one cell, as they finish: inputs and reference, then ours on the contiguous
    cache and every paged layout that fits (together), then each torch peer once those copies
    are freed; a layout or cell that does not fit gets rows with a "skipped: memory" note."""
    fits, pages, note = memory_plan(cell, free_device_bytes())
    if not fits:
        for impl in cell_impls(cell, torch_impls):
            yield {**_row(impl, cell), "note": note}
        return
    data = cell_inputs(cell)
    ref = decode_reference(cell, data, free_device_bytes(), require_cupy())
    free_memory()  # the reference's temporaries, before the paged copies take their room
    layouts = [paged_layout(cell, data, page) for page in pages]
    yield from measure_ours(cell, data, ref, layouts, runs, warmup)
    del layouts
    free_memory()
    for page in cell.page_sizes:
        if page not in pages:
            yield {**_row(paged_impl(page), cell), "note": note}
    for impl in torch_impls:
        yield measure_peer(impl, cell, data, ref, runs, warmup)
        free_memory()


def _settings(runs: int, warmup: int, torch_impls: Sequence[str], peer_note: str) -> dict[str, Any]:
    return {"runs": runs, "warmup": warmup, "peers": list(torch_impls), "peer_note": peer_note,
            "bars": {"copy": BANDWIDTH_BAR, "copy_min_tokens": BANDWIDTH_MIN_TOKENS, "cudnn": CUDNN_BAR,
                     "cudnn_many": CUDNN_BAR_MANY, "many_query_tokens": list(MANY_QUERY_TOKENS), "paged": PAGED_BAR,
                     "paged_min_page": PAGED_MIN_PAGE},
            "bytes": "K and V read once: batch * cache * heads_kv * head_dim * itemsize * 2",
            "flops": "4 * head_dim * heads_q * batch * (query, key) pairs visible under the bottom-right causal mask",
            "call": "attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=int32 (batch,) array of the cache "
                    "length, block_table=(paged), causal=True, num_splits=0)",
            "timing": "each implementation and layout on its own (timing.do_bench), one after another; a torch "
                      "peer inside its backend context",
            "inputs": "sequence b drawn by validation.random_inputs with seed b; block tables numpy default_rng(0)",
            "tolerance": {"rule": measure.RULE, "floor_eps": dict(tolerance.FLOOR_EPS)},
            "check": "out against bench.check's float64 reference, pieces sized by decode_run.reference_head_bytes",
            "check_rows": check.CHECK_ROWS, "reference_memory_fraction": check.REFERENCE_MEMORY_FRACTION,
            "cache_memory_fraction": CACHE_MEMORY_FRACTION}


def run_decode(cells: Sequence[DecodeCell], *, runs: int = 20, warmup: int = 3,
               progress: Progress | None = None) -> dict[str, Any]:
    """Measure the copy bandwidth, then validate and time every (cell, impl) on the current GPU;
    returns the report.

    Report: {"kind": "decode", "environment": environment.record(), "copy": copy_bandwidth(),
    "rows": [...], "summary": decode_report.summarize_decode(rows), "settings": {...}}. A row:
    id, impl (cupyflash, cupyflash-paged{P}, torch-cudnn, torch-flash), layout, page_size,
    dtype, head_dim, heads_q, heads_kv, seqlen_q, batch, cache, tokens (batch * cache),
    kv_bytes, flops, ms (median), tflops, tbps (kv_bytes / ms), copy_fraction (tbps / the copy
    bandwidth), valid, error, and measure.run's other fields where they apply (check,
    mismatches, note, failure, warnings, first_call_ms, new_cubins, peak_extra_mb, output_mb);
    the torch peers' gqa and mask say how they ran.
    """
    measure._check_run_args(("fwd",), (), runs, warmup)
    say = progress or (lambda message: None)
    torch_impls, peer_note = torch_peers()
    copy = copy_bandwidth(runs, warmup)
    say(f"copy bandwidth: {copy['tbps']:.2f} TB/s ({copy['bytes'] / 2**30:.2f} GiB device to device, "
        "read + written)")
    report: dict[str, Any] = {"kind": "decode", "environment": environment.record(), "copy": copy, "rows": [],
                              "settings": _settings(runs, warmup, torch_impls, peer_note)}
    total = sum(len(cell_impls(cell, torch_impls)) for cell in cells)
    for cell in cells:
        for row in _cell_rows(cell, torch_impls, runs, warmup):
            report["rows"].append(add_bandwidth(row, copy["tbps"]))
            say(f"[{len(report['rows'])}/{total}] {describe(row)}")
        free_memory()
    report["summary"] = summarize_decode(report["rows"])
    return report
