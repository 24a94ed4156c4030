"""Speed of cupyflash beside its peers, measured in one process on one GPU.

    from cupyflash import bench
    report = bench.run(bench.paper_grid(), progress=print)
    bench.save(report, "benchmarks/results", bench.default_stem(report))
    print(bench.format_table(report, "fwd"))

One module per stage:

    grid           the shapes (the FlashAttention papers' grid), passes, impl names, FLOPs
    peers          the implementations timed (cupyflash, naive CuPy, torch SDPA) and their setup
    check          the float64 reference (cupyflash.reference) and the rule (cupyflash.tolerance)
                   every result is judged by before it is timed
    gpu            peak memory and first-call time of one call, freeing memory between calls
    measure        run(): inputs, reference, check, time, for every (shape, pass, impl)
    report         markdown tables, JSON + markdown files
    plots          TFLOP/s plots (matplotlib, imported only when drawing)
    compile_times  NVRTC seconds, registers and spills of every default kernel
    varlen         variable-length (cu_seqlens) batches, their FLOPs and the bars against dense
    varlen_run     run_varlen(): varlen beside the dense call and a torch peer, checked per sequence
    varlen_report  the varlen report's summary (varlen / dense ratios) and tables
    decode         decoding cells (a few query tokens against a full KV cache), their bytes,
                   the memory they need, paged block tables, and the bars of issue 14
    decode_run     run_decode(): attention_with_kvcache, contiguous and paged, beside torch's
                   cuDNN and flash SDPA, checked, in TB/s beside the GPU's copy bandwidth
    decode_report  the decode report's summary (the bars per cell), tables and files
    decode_plot    TB/s against batch x cache tokens (matplotlib, imported only when drawing)

    report = bench.run_varlen(bench.varlen_batches(("bfloat16",)), progress=print)
    print(bench.format_varlen_table(report))

    report = bench.run_decode(bench.decode_grid(quick=True), progress=print)
    bench.save_decode(report, "benchmarks/results")
    print(bench.format_decode_table(report))

All implementations are fed the same random signed-normal q, k, v, dout of shape (batch,
seqlen, heads, head_dim), drawn by cupyflash.validation.random_inputs. A result that fails the
check is still timed but flagged (valid: false, "✗"). The environment of a report (GPU,
versions, commit, date) comes from cupyflash.environment, as `cupyflash info`'s does.
"""

from ..environment import describe as describe_environment
from ..environment import record as environment
from .check import CHECK_ROWS, REFERENCE_MEMORY_FRACTION, Reference, judge, reference_for, slice_reference
from .compile_times import measure_compile_times
from .decode import BANDWIDTH_BAR, CUDNN_BAR, CUDNN_BAR_MANY, PAGED_BAR, DecodeCell, block_table, decode_grid, \
    kv_bytes, memory_plan, visible_pairs
from .decode_plot import plot_decode, plot_decode_series
from .decode_report import decode_stem, format_decode_report, format_decode_table, save_decode, summarize_decode
from .decode_run import copy_bandwidth, run_decode
from .gpu import MIB
from .grid import DTYPES, IMPL_PASSES, IMPLS, PASS_TENSORS, PASSES, RATIO_PEERS, BenchShape, flops, paper_grid, \
    quick_grid, tflops
from .measure import inputs, run
from .peers import NAIVE_MAX_RUNS, NAIVE_MEMORY_FRACTION, TORCH_BACKENDS, available_impls, naive_backward, \
    naive_forward, naive_score_bytes, naive_skip_reason, to_float32
from .plots import plot, plot_series, save_plots
from .report import default_stem, first_calls, format_compile_table, format_memory_table, format_report, \
    format_table, load, save
from .varlen import EQUAL_BAR, EQUAL_BATCHES, MIXED_BAR, VarlenBatch, batch_flops, cu_seqlens, equal_batch, \
    mixed_batch, mixed_lengths, segments, varlen_batches, varlen_flops
from .varlen_report import format_varlen_report, format_varlen_table, summarize
from .varlen_run import run_varlen

__all__ = ["BenchShape", "paper_grid", "quick_grid", "flops", "tflops", "run", "environment",
           "describe_environment", "default_stem", "measure_compile_times", "format_table",
           "format_memory_table", "format_compile_table", "format_report", "first_calls", "save", "load",
           "plot", "plot_series", "save_plots", "naive_forward", "naive_backward", "slice_reference",
           "reference_for", "judge", "naive_skip_reason", "naive_score_bytes", "available_impls", "inputs",
           "VarlenBatch", "varlen_batches", "equal_batch", "mixed_batch", "mixed_lengths", "cu_seqlens", "segments",
           "varlen_flops", "batch_flops", "run_varlen", "summarize", "format_varlen_table", "format_varlen_report",
           "DecodeCell", "decode_grid", "kv_bytes", "visible_pairs", "block_table", "memory_plan", "run_decode",
           "copy_bandwidth", "summarize_decode", "format_decode_table", "format_decode_report", "save_decode",
           "decode_stem", "plot_decode", "plot_decode_series"]
