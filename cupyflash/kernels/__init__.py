"""One module per kernel family, named after its source in kernels_cu/.

Each module owns everything about its kernels that the host needs: the config class (tile
sizes, warps, stages) with the rules a config must meet and the shared memory it takes, the
kernel spec (source file, entry point, -D macros), the grid and block of a launch, the
candidates the autotuner times and the heuristic table used when nothing is tuned. Which
families a call runs, and in what order, is plan.py's.

    flash_fwd.py            mma.sync forward (sm_80 and up)
    flash_fwd_sm90.py       wgmma forward fed by cp.async (sm_90: packed batches)
    flash_fwd_tma.py        wgmma forward fed by a TMA copy warpgroup (sm_90: the default)
    flash_bwd_dkdv.py       mma.sync dK/dV, optionally adding dQ by atomics
    flash_bwd_dkdv_sm90.py  wgmma dK/dV, adding dQ by bulk reductions (sm_90)
    flash_bwd_dq.py         mma.sync dQ in its own pass (deterministic)
    flash_bwd_dq_sm90.py    wgmma dQ in its own pass (deterministic, sm_90)
    flash_bwd_prep.py       delta before dK/dV, and the dQ conversions after it
    flash_merge.py          results over disjoint key sets merged by their lse (merge_attention)
"""
