"""Environment variables for the Ray worker processes that train and decode.

Ray runs a task, and Ray Train its training function, on a thread other than the worker process's main
thread. glibc gives such threads malloc arenas of their own, which hand freed memory back to the kernel
eagerly and fault it in again at the next allocation: the demo's training step, run on a second thread,
took 3.3x the page faults and 2.4x the system time of the same step on the main thread (19.6k vs 6.0k
faults per step), and decoding in Ray tasks paid the same. One arena with fixed mmap and trim thresholds
makes a worker allocate as the main thread does. glibc reads these when a process starts, so they travel
in the workers' ``runtime_env``; other C libraries ignore them.
"""

from __future__ import annotations

MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    # Buffers under 64 MiB (frames, activations of one layer) come from the heap, not fresh mmaps ...
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
    # ... and up to 128 MiB of freed heap stays mapped for the next step instead of being faulted in again.
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
}
