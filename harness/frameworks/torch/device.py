"""This process's device, precision and threads, set once (`prepare`) and read by every task.

train.mixed_precision and train.jit_compile resolve as on the Keras side (harness/runtime.py
`resolve_switch`: auto is on for a GPU of compute capability 7.0 or higher): mixed precision is
`torch.autocast` on the GPU (bfloat16 where the GPU has it, else float16 with a gradient scaler),
jit_compile is `torch.compile` of what a phase trains. A trial process sees one GPU
(CUDA_VISIBLE_DEVICES, set by the engine) and uses it; without one it runs on the CPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from harness import runtime


def import_quietly() -> None:
    """Import torch and torchvision (harness/frameworks `framework_named` calls this first).

    In a process that has imported TensorFlow already (the sweep process checks Keras and torch
    backbones alike; a test process runs both), triton is hidden from torch first: torchvision
    imports torch._dynamo, which imports triton (CUDA builds of torch), and triton's LLVM crashes
    the process once TensorFlow's is loaded. Such a process trains nothing on a GPU, so it needs no
    triton; a trial process imports one framework only and keeps it."""
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` raises ImportError: torch does without
    import torchvision  # noqa: F401


@dataclass(frozen=True)
class Settings:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast's dtype; None: float32 throughout
    compile: bool = False  # torch.compile what a phase trains

    @property
    def scales_loss(self) -> bool:
        """float16 gradients underflow without a loss scale; bfloat16's range needs none."""
        return self.amp_dtype == torch.float16


def _default() -> Settings:
    return Settings(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


_settings: Settings | None = None


def settings() -> Settings:
    """This process's settings (the device alone until `prepare` runs: tests, the sweep process)."""
    return _settings or _default()


def gpu_capabilities() -> list[tuple[int, int]]:
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def prepare(train) -> Settings:
    """Resolve train.mixed_precision and train.jit_compile on this process's GPU."""
    global _settings
    capabilities = gpu_capabilities()
    mixed = runtime.resolve_switch(train.mixed_precision, capabilities)
    jit = runtime.resolve_switch(train.jit_compile, capabilities)
    device = torch.device("cuda" if capabilities else "cpu")
    amp_dtype = None
    if mixed and capabilities:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if capabilities:
        torch.backends.cudnn.benchmark = True  # one input size per model: cuDNN picks its fastest kernels once
    _settings = Settings(device, amp_dtype, jit)
    return _settings


def set_threads(threads: int) -> None:
    """Several trial processes on one CPU box: each takes its share of the cores (as the Keras side
    caps TensorFlow's intra- and inter-op threads), instead of all of them thrashing."""
    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(min(2, threads))
        except RuntimeError:  # settable once, before any parallel work: a warm process has done some
            pass


def start_trial_process(threads: int, gpu_memory_limit_mib: float | None) -> dict:
    """First thing in a trial process: its share of the CPU threads (0: one per core), and the
    GPU memory rule: a fixed limit (as a share of the GPU), or else torch's caching allocator,
    which takes what the process needs as it needs it (TensorFlow's "memory growth"). CUDA is
    initialised here, not in the first trial. Returns what the parent is told."""
    set_threads(threads)
    if not torch.cuda.is_available():
        return {"gpu_memory": {}}
    torch.cuda.init()
    count = torch.cuda.device_count()
    if gpu_memory_limit_mib is not None:
        for i in range(count):
            total = torch.cuda.get_device_properties(i).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_memory_limit_mib * 2**20 / total), i)
    return {"gpu_memory": runtime.gpu_memory_plan([f"cuda:{i}" for i in range(count)], gpu_memory_limit_mib)}


def sweep_process_gpus() -> list[tuple[str, tuple[int, int] | None]]:
    """The GPUs this process sees, as (CUDA_VISIBLE_DEVICES name, compute capability). torch takes
    no GPU memory until a tensor is placed there, so nothing needs hiding from the sweep process."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    names = listed[:count] if len(listed) >= count else [str(i) for i in range(count)]
    return [(name, torch.cuda.get_device_capability(i)) for i, name in enumerate(names)]


def make_reproducible(value: int) -> None:
    """A clean state, every generator seeded and deterministic kernels (cuDNN's and cuBLAS'), for a
    run that must reproduce bit for bit (the shipped source backbone)."""
    release()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS' deterministic mode
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed(value)


def autocast():
    """Mixed precision where this process has it switched on, else nothing."""
    s = settings()
    if s.amp_dtype is None or s.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=s.amp_dtype)


def seed(value: int) -> None:
    """Python's, NumPy's and torch's generators (every device's), at a task's start."""
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def release() -> None:
    """Drop what the last task left: compiled graphs, cached GPU blocks, freed heap pages."""
    if settings().compile:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    runtime.trim_heap()


def trial_errors() -> tuple[type[BaseException], ...]:
    """Errors that end one trial, not the sweep: out of memory, and torch's own runtime errors
    (a shape a model cannot take, a CUDA error)."""
    return (torch.OutOfMemoryError, RuntimeError)


def out_of_memory(message: str) -> BaseException:
    """The error a GPU allocation failure surfaces as (for the crash tests' fault injection)."""
    return torch.OutOfMemoryError(message)
