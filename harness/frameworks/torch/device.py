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
import random
from dataclasses import dataclass

import numpy as np
import torch

from harness import runtime


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


def prepare(train, threads: int = 0) -> Settings:
    """Resolve train.mixed_precision and train.jit_compile on this process's GPU, and cap the CPU
    threads at `threads` (0: torch's default, one per core)."""
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
    set_threads(threads)
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
    runtime._malloc_trim()


def trial_errors() -> tuple[type[BaseException], ...]:
    """Errors that end one trial, not the sweep: out of memory, and torch's own runtime errors
    (a shape a model cannot take, a CUDA error)."""
    return (torch.OutOfMemoryError, RuntimeError)
