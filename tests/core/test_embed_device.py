"""Device resolution and the CUDA out-of-memory back-off, with real torch modules."""

from __future__ import annotations

import pytest
import torch

from gpfm_core.embed.device import (
    CudaOutOfMemory,
    OomBackoff,
    autocast,
    resolve_device,
    resolve_precision,
)
from gpfm_core.errors import GpfmError


class _FitsAtMost:
    """A real linear layer that raises CUDA's real OOM exception above ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(6, 4).eval()
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory: {x.shape[0]} rows > {self.limit}"
            )
        return self.model(x)


def test_backoff_halves_retries_and_keeps_the_smaller_size() -> None:
    fn = _FitsAtMost(limit=10)
    x = torch.randn(64, 6)
    emptied: list[int] = []
    backoff = OomBackoff(64, on_oom=lambda: emptied.append(1))
    with torch.inference_mode():
        out = backoff.run(fn, x)
        expected = fn.model(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert backoff.batch_size == 8  # 64 -> 32 -> 16 -> 8
    assert backoff.oom_count == 3 and len(emptied) == 3
    assert max(fn.sizes[-8:]) == 8  # the successful pass used chunks of 8
    fn.sizes.clear()
    with torch.inference_mode():
        out2 = backoff.run(fn, x[:20])  # next batch starts at the smaller size: no new OOM
    assert fn.sizes == [8, 8, 4] and backoff.oom_count == 3
    torch.testing.assert_close(out2, expected[:20], rtol=1e-6, atol=1e-6)


def test_backoff_gives_up_at_one_tile_with_one_line() -> None:
    backoff = OomBackoff(4, on_oom=lambda: None)
    with pytest.raises(CudaOutOfMemory, match="batch of one tile") as info:
        backoff.run(_FitsAtMost(limit=0), torch.randn(4, 6))
    assert "\n" not in str(info.value) and isinstance(info.value, GpfmError)


def test_backoff_does_not_swallow_other_errors() -> None:
    backoff = OomBackoff(8)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        backoff.run(torch.nn.Linear(3, 2), torch.randn(8, 6))
    assert backoff.batch_size == 8


def test_backoff_rejects_bad_batch_size() -> None:
    with pytest.raises(GpfmError, match="batch_size"):
        OomBackoff(0)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GpfmError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(GpfmError, match="CUDA is not available") as info:
            resolve_device("cuda")
        assert "\n" not in str(info.value) and "--device cpu" in str(info.value)


def test_precision_rules() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(GpfmError, match="needs a CUDA device"):
        resolve_precision("bf16", cpu)
    assert resolve_precision("int8", cpu) == "int8"
    with pytest.raises(GpfmError, match="int8 is the CPU path"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(GpfmError, match="unknown precision"):
        resolve_precision("int4", cpu)
    with autocast(cpu, "fp32"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32
