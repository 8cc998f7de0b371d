"""Device choice, mixed precision, the CPU int8 path, and CUDA out-of-memory back-off.

torch is imported inside the functions, so importing this module stays cheap.

**The CPU int8 path.** On CPU, :func:`choose_cpu_precision` can run the encoder with dynamic
int8 quantisation of its ``nn.Linear`` layers (``torch.ao.quantization.quantize_dynamic``:
int8 weights, activations quantised per call). Measured on the 2-core project machine with
a random-init ViT-S/14 at 224 px: 1.9x less CPU time per batch than fp32 (3.7 s vs 7.1 s
for 32 tiles, load average ~10) and a per-tile cosine to fp32 of 0.99999; end to end on a
slide, ``benchmarks/bench_cpu_path.py``. Fidelity is checked on every run, on the slide's
own tiles, never assumed: see :func:`choose_cpu_precision`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core.errors import GpfmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Precision names accepted by :func:`resolve_precision`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` into a usable torch device.

    Raises
    ------
    GpfmError
        CUDA asked for but not usable, or an unknown device name; one line.
    """
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = torch.version.cuda or "CPU-only"
            raise GpfmError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {build}, no usable GPU); use --device cpu or --device auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GpfmError(
                f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible; "
                "use cuda:0 ... or check CUDA_VISIBLE_DEVICES"
            )
        return dev
    raise GpfmError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def resolve_precision(precision: str, device: torch.device) -> str:
    """Compute precision for ``device``: ``"auto"`` is bf16 on CUDA and fp32 elsewhere.

    On CPU, ``"auto"`` and ``"int8"`` are then settled per slide by
    :func:`choose_cpu_precision` (int8 when it is faithful; fp32 otherwise).
    """
    if precision not in PRECISIONS:
        raise GpfmError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "int8" and device.type != "cpu":
        raise GpfmError(
            f"precision int8 is the CPU path (dynamic int8 quantisation); on {device.type} "
            "use precision='auto' (bf16 on CUDA)"
        )
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise GpfmError(
            f"precision {precision} needs a CUDA device; use precision='fp32' on {device.type}"
        )
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[object]:
    """An autocast context for ``precision`` (a no-op for fp32)."""
    import torch

    if precision in ("fp32", "int8"):  # int8 layers run their own kernels
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- CPU int8 path

#: Least per-tile cosine between int8 and fp32 features for int8 to be used.
INT8_MIN_COSINE = 0.99
#: Least mean overlap of the top-10 neighbours (int8 vs fp32) among the sample tiles.
INT8_MIN_OVERLAP = 0.9
#: Tiles of the slide the fidelity check embeds both ways (spread over the tile grid).
FIDELITY_TILES = 32
#: ``"auto"`` picks int8 only when ``nn.Linear`` does at least this share of the work.
INT8_MIN_LINEAR_SHARE = 0.5
#: ``"auto"`` picks int8 only for slides of at least this many tiles. The check costs
#: FIDELITY_TILES forward passes in fp32 and in int8, S (1 + r) fp32 tiles where r ~ 0.55 is
#: int8's time per tile relative to fp32 (ViT-S/14); int8 saves N (1 - r): break-even at
#: N = 32 x 1.55 / 0.45 ~ 110 tiles (measured: a 43-tile slide ran at 0.54x fp32 in int8).
INT8_MIN_TILES = 4 * FIDELITY_TILES

_INT8_MODELS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


class PrecisionFallbackWarning(UserWarning):
    """int8 features were not faithful to fp32 on this slide: it was embedded in fp32."""


@dataclass(frozen=True)
class CpuPrecisionChoice:
    """What :func:`choose_cpu_precision` decided, and the evidence.

    Attributes
    ----------
    precision : {"int8", "fp32"}
        What the encoder runs in.
    requested : str
        What was asked (``"auto"``, ``"int8"`` or ``"fp32"``).
    reason : str
        One line, e.g. ``"int8: min cosine 0.9999 >= 0.99, top-10 overlap 0.98 >= 0.9"``.
    min_cosine, top10_overlap : float or None
        Fidelity of int8 to fp32 on the sample (None when not measured).
    n_tiles : int
        Tiles in the sample.
    linear_share : float or None
        Share of the encoder's multiply-adds done by ``nn.Linear`` (None when not counted).
    """

    precision: str
    requested: str
    reason: str
    min_cosine: float | None = None
    top10_overlap: float | None = None
    n_tiles: int = 0
    linear_share: float | None = None

    def attrs(self) -> dict[str, Any]:
        """Root attributes for the embeddings file (None values are skipped by the writer)."""
        return {
            "precision_requested": self.requested,
            "int8_min_cosine": self.min_cosine,
            "int8_top10_overlap": self.top10_overlap,
            "int8_check_tiles": self.n_tiles or None,
        }


def fidelity_sample(n_tiles: int, *, size: int = FIDELITY_TILES) -> np.ndarray:
    """(m,) int64 tile rows spread evenly over a grid of ``n_tiles`` (m = min(size, n))."""
    if n_tiles <= 0:
        return np.empty(0, np.int64)
    return np.unique(np.linspace(0, n_tiles - 1, min(size, n_tiles)).round().astype(np.int64))


def linear_flop_share(model: Any, x: torch.Tensor) -> float:
    """Share of the multiply-adds of ``model(x)`` done in ``nn.Linear`` layers, in [0, 1].

    Counted on ``x`` with :class:`torch.utils.flop_counter.FlopCounterMode` (all matmuls and
    convolutions) and forward hooks on the linear layers. Dynamic int8 speeds up only those.
    """
    import torch

    # its "triton not found" warning is about GPU kernels this CPU count never meets
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    from torch.utils.flop_counter import FlopCounterMode

    linear = [0]

    def hook(mod: torch.nn.Linear, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        linear[0] += 2 * (inp[0].numel() // mod.in_features) * mod.in_features * mod.out_features

    hooks = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)
    ]
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    total = counter.get_total_flops()
    return 0.0 if total <= 0 else min(1.0, linear[0] / total)


def quantize_int8(model: Any) -> Any:
    """A copy of ``model`` with dynamic int8 ``nn.Linear`` layers (cached per model).

    Raises
    ------
    GpfmError
        This torch build has no quantised CPU engine.
    """
    import torch

    cached = _INT8_MODELS.get(model)
    if cached is not None:
        return cached
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines:
        raise GpfmError("this torch build has no quantised CPU engine: int8 is unavailable")
    if torch.backends.quantized.engine == "none":
        torch.backends.quantized.engine = engines[0]
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API still works in the
        # pinned torch, and the warning would only confuse users
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        q = torch.ao.quantization.quantize_dynamic(
            model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False
        )
    q.eval()
    _INT8_MODELS[model] = q
    return q


def feature_fidelity(
    reference: np.ndarray, test: np.ndarray, *, k: int = 10
) -> tuple[float, float | None]:
    """How faithful ``test`` features are to ``reference`` ones (same tiles, same order).

    Parameters
    ----------
    reference, test
        (n, D) features of the same n tiles (e.g. fp32 and int8).
    k
        Neighbours compared.

    Returns
    -------
    (float, float or None)
        The least per-tile cosine between the two, and the mean overlap of each tile's
        top-k neighbours among the other tiles (cosine of features centred on the sample
        mean, as the dock and the cohort index compare tiles). With few tiles k drops to
        (n - 1) // 2, so the neighbours stay a minority of the others and the overlap means
        something; None below 5 tiles.
    """
    from gpfm_core.analysis.similarity import center_features

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-12)
    min_cos = float(cos.min()) if cos.size else 1.0
    n = a.shape[0]
    k = min(k, (n - 1) // 2)
    if k < 2:
        return min_cos, None
    overlap = []
    tops = []
    for x in (a, b):
        # the sample's own mean, as the dock centres a slide on its own (NaN passes through:
        # it fails the cosine check above instead of raising here)
        c = center_features(x, unit=True, finite=False)[0].astype(np.float64)
        s = c @ c.T
        np.fill_diagonal(s, -np.inf)
        tops.append(np.argsort(-s, axis=1, kind="stable")[:, :k])
    for ta, tb in zip(*tops, strict=True):
        overlap.append(len(set(ta.tolist()) & set(tb.tolist())) / k)
    return min_cos, float(np.mean(overlap))


def choose_cpu_precision(
    encoder: Any,
    requested: str,
    sample: torch.Tensor | None,
    *,
    n_tiles: int | None = None,
    label: str = "",
) -> tuple[Any, CpuPrecisionChoice]:
    """Pick the model to run on CPU: int8 when asked (or worth it) and faithful, else fp32.

    The check runs on every call, on ``sample``: a few preprocessed tiles of the slide being
    embedded (:func:`fidelity_sample` spreads them over its grid). The slide's own tiles,
    rather than the sample image, because the error of int8 depends on the inputs (stain,
    scanner, tissue) and a run sees only its own; reading 32 tiles is cheap, and the two
    forward passes cost about a batch. int8 is kept when the least per-tile cosine to fp32
    is >= 0.99 and the tiles' top-10 neighbours agree >= 90 %; otherwise the slide is
    embedded in fp32 with a :class:`PrecisionFallbackWarning`.

    ``requested="auto"`` tries int8 only when it can pay: for slides of at least
    :data:`INT8_MIN_TILES` tiles (the check costs about 50 tiles' worth of fp32 work), and
    when ``nn.Linear`` does >= 50 % of the encoder's multiply-adds
    (:func:`linear_flop_share`): int8 speeds up only those (ViT: ~90 %; a CNN with a
    linear head: a few %, where int8 would cost a copy and gain nothing).

    Parameters
    ----------
    encoder
        The fp32 encoder (eval mode, on CPU).
    requested
        ``"auto"``, ``"int8"`` or ``"fp32"``.
    sample
        (n, 3, S, S) preprocessed tiles, or None / empty (then fp32: nothing to check on).
    n_tiles
        Tiles of the slide to embed (for ``"auto"``'s size rule; None: no size rule).
    label
        Named in the warning (e.g. the slide's file name).

    Returns
    -------
    (model, CpuPrecisionChoice)
        The module to run and the decision with its evidence.
    """
    import torch

    if requested not in ("auto", "int8"):
        return encoder, CpuPrecisionChoice("fp32", requested, "fp32 requested")
    who = f"{label}: " if label else ""
    if sample is None or len(sample) == 0:
        return encoder, CpuPrecisionChoice("fp32", requested, "no tile to check int8 on")
    share = None
    if requested == "auto" and n_tiles is not None and n_tiles < INT8_MIN_TILES:
        why = f"{n_tiles} tiles: fewer than {INT8_MIN_TILES}, int8 would not repay its check"
        log.info("%sfp32 (%s)", who, why)
        return encoder, CpuPrecisionChoice("fp32", requested, why)
    if requested == "auto":
        share = linear_flop_share(encoder, sample[:1])
        if share < INT8_MIN_LINEAR_SHARE:
            why = f"linear layers do {share:.0%} of the work: int8 would not pay"
            log.info("%sfp32 (%s)", who, why)
            return encoder, CpuPrecisionChoice("fp32", requested, why, linear_share=share)
    try:
        q = quantize_int8(encoder)
    except GpfmError as exc:
        if requested == "int8":
            warnings.warn(f"{who}{exc}; embedding in fp32", PrecisionFallbackWarning, stacklevel=2)
        return encoder, CpuPrecisionChoice("fp32", requested, str(exc), linear_share=share)
    with torch.inference_mode():
        ref = encoder(sample).float().numpy()
        test = q(sample).float().numpy()
    min_cos, overlap = feature_fidelity(ref, test)
    n = len(sample)
    ok_cos = math.isfinite(min_cos) and min_cos >= INT8_MIN_COSINE
    ok_top = overlap is None or overlap >= INT8_MIN_OVERLAP
    if overlap is None:
        top = "neighbour overlap not measured (too few tiles)"
    else:
        kk = min(10, (n - 1) // 2)
        top = f"top-{kk} overlap {overlap:.2f} {'>=' if ok_top else '<'} {INT8_MIN_OVERLAP}"
    evidence = (
        f"min cosine {min_cos:.4f} {'>=' if ok_cos else '<'} {INT8_MIN_COSINE}, {top}, {n} tiles"
    )
    common = {"min_cosine": min_cos, "top10_overlap": overlap, "n_tiles": n, "linear_share": share}
    if ok_cos and ok_top:
        log.info("%sint8 (%s)", who, evidence)
        return q, CpuPrecisionChoice("int8", requested, f"int8: {evidence}", **common)
    warnings.warn(
        f"{who}int8 features are not faithful to fp32 ({evidence}); embedding in fp32",
        PrecisionFallbackWarning,
        stacklevel=2,
    )
    return encoder, CpuPrecisionChoice("fp32", requested, f"fp32 fallback: {evidence}", **common)


class CudaOutOfMemory(GpfmError):
    """The model does not fit on the GPU even one tile at a time."""


class OomBackoff:
    """Run a batched callable, halving the batch after a CUDA out-of-memory error.

    The halved size is kept for later batches, so a job that ran out of memory once
    does not pay for the failed attempt again.

    Parameters
    ----------
    batch_size
        Largest number of rows passed to the callable at once.
    on_oom
        Called after each out-of-memory error, before the retry (default: empty the
        CUDA cache when CUDA is available).

    Examples
    --------
    >>> backoff = OomBackoff(64)                           # doctest: +SKIP
    >>> feats = backoff.run(model, x)                      # x (B, 3, S, S) -> (B, D)
    """

    def __init__(self, batch_size: int, *, on_oom: Callable[[], None] | None = None) -> None:
        if batch_size < 1:
            raise GpfmError(f"batch_size must be >= 1, not {batch_size}")
        self.batch_size = int(batch_size)
        self.oom_count = 0
        self._on_oom = on_oom if on_oom is not None else _empty_cuda_cache

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(start + self.batch_size, n))

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Return ``fn(x)`` computed in chunks of at most :attr:`batch_size` rows.

        Parameters
        ----------
        fn
            Maps (b, ...) to (b, ...) rows independently (a model in eval mode).
        x
            (B, ...) input.

        Returns
        -------
        torch.Tensor
            (B, ...) concatenated outputs, equal to ``fn(x)``.

        Raises
        ------
        CudaOutOfMemory
            When even one row does not fit.
        """
        import torch

        n = int(x.shape[0])
        while True:
            try:
                outs = [fn(x[s]) for s in self._chunks(n)]
                return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            except torch.cuda.OutOfMemoryError:
                self.oom_count += 1
                outs = []  # drop partial results before retrying
                if self.batch_size == 1:
                    raise CudaOutOfMemory(
                        "CUDA out of memory with a batch of one tile; use a smaller encoder, "
                        "free the GPU, or use --device cpu"
                    ) from None
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)
                self._on_oom()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
