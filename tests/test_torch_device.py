"""A torch trial process's switches: train.mixed_precision and train.jit_compile resolved as on the
Keras side, its share of the CPU threads, seeding. (Mixed precision itself needs a GPU.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun  # noqa: E402
from harness.frameworks.torch import device as dev  # noqa: E402
from harness.frameworks.torch import loop  # noqa: E402
from harness.frameworks.torch import model as tm  # noqa: E402
from harness.frameworks.torch.data import array_batches  # noqa: E402
from harness.phases import Phase  # noqa: E402


@pytest.fixture
def restored(monkeypatch):
    """This process's settings and thread count come back after the test."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(dev, "_settings", None)
    yield
    torch.set_num_threads(threads)


def train(mixed="auto", jit="auto"):
    return SimpleNamespace(mixed_precision=mixed, jit_compile=jit)


def test_the_switches_resolve_as_on_the_keras_side(restored, monkeypatch):
    assert dev.prepare(train()) == dev.Settings(torch.device("cpu"))  # auto: off without a GPU
    assert dev.start_trial_process(1, None) == {"gpu_memory": {}}
    assert torch.get_num_threads() == 1  # this process's share of the cores
    assert dev.prepare(train(jit="on")).compile is True
    monkeypatch.setattr(dev, "gpu_capabilities", lambda: [(9, 0)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    on_gpu = dev.prepare(train())
    assert on_gpu.device.type == "cuda" and on_gpu.amp_dtype == torch.float16 and on_gpu.scales_loss and on_gpu.compile
    assert dev.prepare(train(mixed="off", jit=False)) == dev.Settings(torch.device("cuda"))
    monkeypatch.setattr(dev, "gpu_capabilities", lambda: [(6, 1)])  # before Tensor Cores: auto is off
    assert dev.prepare(train()).amp_dtype is None


def test_seeding_makes_a_task_repeat_its_draws():
    dev.seed(5)
    first = (torch.rand(2), np.random.rand(2))
    dev.seed(5)
    second = (torch.rand(2), np.random.rand(2))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])


@pytest.mark.slow
def test_jit_compile_trains_a_phase_through_torch_compile(restored):
    """About 20 s of compilation on 2 CPU cores."""
    dev.prepare(train(jit="on"))
    model = tm.build(
        ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {}, head_units=8, cut_fraction=0.3), 0, torch.device("cpu")
    )
    tm.set_trainable(model, 0)
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    y = np.arange(16) % 3
    records = []
    phase_data = PhaseData(array_batches(x, y, 8, shuffle=True), array_batches(x, y, 8, shuffle=False))
    loop.run_phase(model, Phase("head", 1, 1e-3, 0), phase_data, PhaseRun(0, records.append))
    [(module, optimized)] = model.compiled.values()
    assert module is model.logits and type(optimized).__name__ == "OptimizedModule"
    assert np.isfinite(records[0].metrics["loss"])
