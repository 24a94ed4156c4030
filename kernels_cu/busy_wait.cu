// busy_wait: keeps the GPU busy for a given time, for cupyflash/timing.py.
//
// A timed call is queued after this kernel: while it runs, the host has time to queue the call's
// kernels, so the start event (recorded after it) meets a full queue and the interval measures
// the GPU's work, not the gaps in which it waited for the host to launch the next kernel. One
// warp that mostly sleeps leaves the rest of the GPU idle. Compiled by CuPy (cupy.RawModule), not
// by cupyflash/build.py: it reads no parameter block.
extern "C" __global__ void busy_wait(unsigned long long nanoseconds) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
}
