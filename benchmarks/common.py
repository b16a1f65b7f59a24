"""Measuring tools shared by the benchmarks: clocks, peak memory, the matmul ceiling, run metadata.

Timing: CUDA work is timed with CUDA events around each call after warm-up; CPU work with
``time.perf_counter``. Each measurement repeats until it has ``min_reps`` samples and has spent
``budget_s`` seconds (or reached ``max_reps``), and reports the median.

Peak memory is what a block allocates above what was live when it started:
- CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: torch keeps no allocator statistics, so the process's resident-set high-water mark
  (``VmHWM``) is used. It is reset through ``/proc/self/clear_refs`` at the start of the block and
  compared with the resident size then. glibc's mmap threshold is pinned at 1 MiB first, so every
  large tensor is its own mapping that goes back to the kernel when freed: the high-water mark
  then follows live tensors, not heap growth left over from earlier work. Without
  ``clear_refs`` (not Linux) the measurement is reported as unavailable.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = float(1 << 20)


# ----------------------------------------------------------------------------------------------
# devices and metadata


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible; use --device cpu or --quick")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    """A short name for the device: the GPU's name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def card_slug(device: torch.device) -> str:
    """File-name form of the card: ``h100``, ``h200``, ``a100``, ... or ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "h20", "a100", "a10g", "l40s", "l4", "b200", "gh200"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "gpu"


def git_commit() -> str:
    """The checkout's commit (short hash), with ``+dirty`` when tracked files changed."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ALTPO_COMMIT", "unknown")
    if not head:
        return os.environ.get("ALTPO_COMMIT", "unknown")
    return head + ("+dirty" if dirty else "")


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # an installed package that fails to import counts as absent
        return None
    return getattr(mod, "__version__", "unknown")


PEER_DISTRIBUTIONS = ("trl", "cut-cross-entropy", "liger-kernel")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def run_metadata(device: torch.device) -> dict:
    """When, where and on what code a result was measured."""
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device.type,
        "card": card_name(device),
        "card_slug": card_slug(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cpu_threads": torch.get_num_threads(),
        # the peers' versions (None: not installed), read from their installed metadata
        "peers": {name: _dist_version(name) for name in PEER_DISTRIBUTIONS},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(cuda=torch.version.cuda, multiprocessors=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return meta


# ----------------------------------------------------------------------------------------------
# timing


def time_fn(fn, device: torch.device, *, setup=None, warmup: int = 1, min_reps: int = 3,
            max_reps: int = 100, budget_s: float = 1.0) -> dict:
    """Median milliseconds of ``fn()``; ``setup()`` (untimed) runs before every call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < budget_s):
        if setup is not None:
            setup()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "reps": len(times)}


# ----------------------------------------------------------------------------------------------
# peak memory

_libc = None
_M_MMAP_THRESHOLD = -3


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            # large blocks become their own mappings, returned to the kernel when freed
            _libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        except OSError:
            _libc = False
    return _libc


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # 5 resets the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False


CPU_MEMORY_METHOD = ("resident-set high-water mark (VmHWM, reset via /proc/self/clear_refs) "
                     "minus resident size at start, glibc mmap threshold pinned at 1 MiB")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus memory allocated at start"


class PeakMemory:
    """Context manager: ``peak_bytes`` allocated above the starting level inside the block.

    ``peak_bytes`` is None where the platform gives no way to measure it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.method = CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            libc = _glibc()
            if libc:
                libc.malloc_trim(0)
            self._ok = _reset_cpu_high_water()
            self._base = (_proc_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._ok:
            hwm = _proc_status_kib("VmHWM")
            self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self._base)
        return False


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# the matmul ceiling


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                  budget_s: float = 1.0) -> dict:
    """Measured dense matmul rate (TFLOP/s) of ``size``-cubed products in ``dtype``.

    Random inputs (zeros run faster than real data on some GPUs), three input sets in rotation so
    repeated products do not run out of a warm cache.
    """
    if size is None:
        size = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator(device="cpu").manual_seed(1234)
    sets = [(torch.randn(size, size, generator=gen).to(device, dtype),
             torch.randn(size, size, generator=gen).to(device, dtype)) for _ in range(3)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    state = {"i": 0}

    def run():
        a, b = sets[state["i"] % 3]
        state["i"] += 1
        torch.matmul(a, b, out=out)

    timing = time_fn(run, device, warmup=3, min_reps=5, budget_s=budget_s)
    del sets, out
    free_memory(device)
    return {"tflops": 2 * size**3 / (timing["median_ms"] * 1e-3) / 1e12, "size": size,
            "dtype": str(dtype).replace("torch.", ""), "median_ms": timing["median_ms"]}


# ----------------------------------------------------------------------------------------------
# output


def write_json(path, payload: dict) -> None:
    """Write ``payload`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``columns`` = (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([fmt(row.get(key), spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
