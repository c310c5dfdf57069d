"""The only module that asks the machine what it is.

Everything else receives a ``Hardware`` value, so tests can hand the planner a fake A100 or a CPU
without bf16 and check its decisions.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunepilot import distributed
from tunepilot.train import matmul


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" or "cpu"
    name: str
    memory_total_gb: float
    memory_available_gb: float
    cores: int
    bf16: bool  # native bf16 compute (not emulation)
    bf16_reason: str
    compute_capability: tuple[int, int] | None = None
    flash_attention: bool = False  # the flash-attn package (varlen kernels) is importable
    varlen_attention: bool = False  # PyTorch's own varlen flash kernel (2.10+) runs here
    processes: int = 1  # training processes of a distributed run (one device each)
    # the library fp32 matmuls run on (train/matmul.py): "onednn" where it measured faster
    # than MKL, "mkl", or "default" (a GPU, or a build without oneDNN's product)
    fp32_matmul: str = "default"
    fp32_matmul_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def detect() -> Hardware:
    """Describe the device this process trains on (its CUDA GPU, else the CPU).

    In a distributed run each process describes its own device; on a CPU the processes of one
    machine share its memory and cores, so each is given its share.
    """
    if torch.cuda.is_available():
        return _detect_cuda()
    return _detect_cpu()


def _detect_cuda() -> Hardware:
    device = torch.cuda.current_device()  # LOCAL_RANK's GPU in a distributed run
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    cc = (props.major, props.minor)
    # torch.cuda.is_bf16_supported() can report emulated bf16 on pre-Ampere cards; only
    # compute capability >= 8.0 has bf16 tensor cores.
    bf16 = cc >= (8, 0)
    reason = f"compute capability {cc[0]}.{cc[1]} {'>=' if bf16 else '<'} 8.0"
    # flash-attn kernels need Ampere or newer; importable is not enough on older cards
    flash = cc >= (8, 0) and importlib.util.find_spec("flash_attn") is not None
    # the kernel's own module decides (PyTorch 2.10+, Ampere or newer), so the plan's reason and
    # the kernel's use cannot disagree
    from tunepilot.train.attention import varlen_available

    varlen = varlen_available("cuda")
    cores = max(1, (os.cpu_count() or 1) // distributed.local_world())
    return Hardware(
        "cuda",
        props.name,
        total / 2**30,
        free / 2**30,
        cores,
        bf16,
        reason,
        cc,
        flash_attention=flash,
        varlen_attention=varlen,
        processes=distributed.world(),
    )


def _detect_cpu() -> Hardware:
    flags, name = _cpu_flags_and_name()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    reason = f"CPU has {', '.join(native)}" if native else "CPU lacks avx512_bf16 and amx_bf16"
    total, available = _memory_gb()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = distributed.local_world()
    library, why = matmul.choice()  # timed once per process, ~0.1 s
    return Hardware(
        "cpu",
        name,
        total,
        available / share,
        max(1, (cores or 1) // share),
        bool(native),
        reason,
        processes=distributed.world(),
        fp32_matmul=library,
        fp32_matmul_reason=why,
    )


def cpu_layer_gflops(dtype: torch.dtype, size: int = 512) -> float:
    """GFLOP/s of one linear layer's forward and backward on the CPU under autocast to ``dtype``
    (float32: no autocast), the work a training step is made of. Timed, not read from flags: a
    CPU's half-precision speed depends on its kernels as much as its instruction set (fp16 here,
    an EPYC with avx512_bf16: 15 GFLOP/s against fp32's 235; bf16: 426)."""
    # its own generator: a measurement must not move the global RNG that seeds training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=g)
    weight = (torch.randn(size, size, generator=g) / size**0.5).requires_grad_()
    bias = torch.zeros(size, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = matmul.linear(x, weight, bias)  # fp32: on the library training uses
        y.float().sum().backward()

    step()  # the first call picks the kernels
    reps, start = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < 0.05:
        step()
        reps += 1
    return 6 * size**3 * reps / (time.perf_counter() - start) / 1e9


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    return _cpu_flags_and_name()[0]


def _cpu_flags_and_name() -> tuple[set[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), "cpu"
    flags: set[str] = set()
    name = "cpu"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "model name" and name == "cpu":
            name = value.strip()
    return flags, name


def _memory_gb() -> tuple[float, float]:
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] / 2**30, info.get("MemAvailable", info["MemFree"]) / 2**30
    except (OSError, KeyError, ValueError, IndexError):
        import psutil  # only where /proc is missing (macOS)

        mem = psutil.virtual_memory()
        return mem.total / 2**30, mem.available / 2**30


def reset_peak_memory(device: str) -> bool:
    """Count this process's peak memory afresh from now on: what ran before (the batch probe's
    worst-case trials, the learning-rate finder) would otherwise stay in every later peak.
    CUDA: the allocator's peak statistics. CPU: the kernel's resident high-water mark, which
    ``ru_maxrss`` reads (Linux 4.0+, ``/proc/self/clear_refs``). False where it cannot; peaks
    then include what ran before."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# torch raises a failed CPU allocation as a plain RuntimeError: only this text tells it apart
CPU_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation on either device: CUDA's ``torch.OutOfMemoryError``, or the CPU
    allocator's error (strict overcommit, ``ulimit -v``, a request beyond RAM and swap). A CPU
    that runs out under the default overcommit is killed instead; the probe's worker takes that."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and CPU_ALLOCATION_FAILED in str(exc)
    )


def fail_allocation(device: str) -> None:
    """A real failed allocation on ``device`` (4 EiB: no machine has it), for fault injection:
    the error is the one torch raises, not an imitation."""
    torch.empty(2**62, dtype=torch.uint8, device=device)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (the CPU analogue of max_memory_allocated)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak / 2**20
