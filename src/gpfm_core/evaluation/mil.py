"""Slide-level models: ABMIL for classification and survival, trained on cohort features.

The model is the paper's attention-based MIL (Ilse et al. 2018, as CLAM's ``Attn_Net``):

    h_i = Dropout(ReLU(W0 x_i + b0))                    (N, 512)   x_i: tile features (D,)
    a_i = w2 · tanh(W1 h_i + b1) + b2                    (N,)       W1: 512 -> 128
    z   = sum_i softmax(a)_i h_i                         (512,)
    out = W3 z + b3                                      (K,) class logits, or (n_bins,) hazard logits

trained with Adam (lr 2e-4, weight decay 1e-4), one slide per step, slides drawn with
class-balanced weights (CLAM's ``make_weights_for_balanced_classes_split``; survival: the
(time bin, censorship) groups, as PORPOISE), early stopping on the validation loss (the
weights of the best epoch are kept).

Two choices beyond the paper's recipe, both about optimisation only: the first layer reads
features standardised with the training tiles' mean and std (folded into its weights when
training ends, so the saved network is the plain ABMIL on raw features), and a survival
head starts at the training split's baseline hazards. Without them, features with a large
common offset (texture statistics) make the first epochs rank slides by feature magnitude,
and survival risks start inverted.

A trained model is a :class:`SlideModel`; it is saved as ONE ``.safetensors`` file: the
weights as tensors and a JSON config in the header (key ``gpfm_slide_model``: task, class
names or survival bin edges, sizes, the encoder and its weights hash, the tiling, the training
summary). No pickle. :func:`apply_slide_model` is the pure function that applies one to the
features of a slide: class probabilities or a risk, and the attention score of every tile.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.errors import GpfmError
from gpfm_core.evaluation._util import torch_threads

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "MILConfig",
    "SlideBags",
    "SlideModel",
    "SlideOutput",
    "TrainResult",
    "apply_slide_model",
    "build_abmil",
    "iter_apply_slide_model",
    "train_abmil",
]

log = logging.getLogger(__name__)

FORMAT = "gpfm-abmil"
FORMAT_VERSION = 1
_META_KEY = "gpfm_slide_model"
TASKS = ("classification", "survival")
#: Tiles x feature width below which a slide step runs on one thread (see ``_step_threads``).
_SMALL_BAG = 1 << 20


@dataclass(frozen=True)
class MILConfig:
    """ABMIL sizes and training hyper-parameters (defaults: the GPFM paper's / CLAM's).

    Attributes
    ----------
    hidden, attn_dim, dropout
        Linear(D -> hidden), attention hidden width, dropout after the first layer.
    lr, weight_decay
        Adam.
    max_epochs, patience, min_epochs
        Early stopping on the validation loss: stop once it has not improved for
        ``patience`` epochs, but not before ``min_epochs``.
    balanced_sampling
        Draw slides with class-balanced weights (with replacement, one epoch = N draws).
    n_bins, alpha_surv
        Survival: number of time bins and the NLL's ``alpha``.
    """

    hidden: int = 512
    attn_dim: int = 128
    dropout: float = 0.25
    lr: float = 2e-4
    weight_decay: float = 1e-4
    max_epochs: int = 50
    patience: int = 10
    min_epochs: int = 10
    balanced_sampling: bool = True
    n_bins: int = 4
    alpha_surv: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MILConfig:
        """Build from a (YAML) mapping; unknown keys are a :class:`GpfmError`."""
        d = dict(d or {})
        names = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - names
        if unknown:
            raise GpfmError(
                f"unknown ABMIL option(s) {sorted(unknown)}: choose from {sorted(names)}"
            )
        return cls(**d)


def build_abmil(
    in_dim: int, n_out: int, *, hidden: int = 512, attn_dim: int = 128, dropout: float = 0.25
) -> torch.nn.Module:
    """The ABMIL network; ``forward(x (N, D)) -> (logits (n_out,), attention scores (N,))``."""
    import torch
    from torch import nn

    class ABMIL(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
            self.attention = nn.Sequential(
                nn.Linear(hidden, attn_dim), nn.Tanh(), nn.Linear(attn_dim, 1)
            )
            self.classifier = nn.Linear(hidden, n_out)
            # training only: the first layer reads (x - input_mean) * input_scale; None
            # buffers stay out of the state dict (the saved model has it folded in)
            self.register_buffer("input_mean", None, persistent=False)
            self.register_buffer("input_scale", None, persistent=False)

        def first_layer(self, x: torch.Tensor) -> torch.Tensor:
            lin = self.fc[0]
            if self.input_scale is None:
                return lin(x)
            # W ((x - m) * s) + b == (W * s) x + (b - (W * s) m): scaling the (H, D) weight
            # costs far less than standardising the (N, D) tiles, with the same gradients
            w = lin.weight * self.input_scale
            return torch.nn.functional.linear(x, w, lin.bias - w @ self.input_mean)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.relu(self.first_layer(x))
            p = self.fc[2].p
            if self.training and p > 0:
                # nn.Dropout's Bernoulli sampling costs 6x a uniform draw on CPU (a sixth of
                # a 5,000-tile step); this is the same inverted dropout from torch.rand
                h = h * torch.rand_like(h).ge_(p).mul_(1.0 / (1.0 - p))
            a = self.attention(h).squeeze(-1)
            z = torch.softmax(a, dim=0) @ h
            return self.classifier(z), a

    return ABMIL()


# ------------------------------------------------------------------------------ the model
@dataclass
class SlideModel:
    """A trained slide-level model and everything needed to apply it.

    Attributes
    ----------
    task
        ``"classification"`` or ``"survival"``.
    embed_dim
        D of the tile features it reads.
    state
        Weights by parameter name (float32 numpy arrays).
    class_names
        Classification: one name per output.
    bin_edges
        Survival: (n_bins + 1,) time-bin edges (the unit of the training times).
    config
        The :class:`MILConfig` it was built and trained with.
    encoder, weights_hash, tiling
        What made the features (name, hash, ``{"mpp": ..., "tile_px": ...}``).
    training
        Summary of the training run (epochs, best epoch, validation metrics, seed ...).
    """

    task: str
    embed_dim: int
    state: dict[str, np.ndarray]
    class_names: list[str] = field(default_factory=list)
    bin_edges: list[float] = field(default_factory=list)
    config: MILConfig = field(default_factory=MILConfig)
    encoder: str | None = None
    weights_hash: str | None = None
    tiling: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    _module: Any = field(default=None, repr=False, compare=False)

    @property
    def n_out(self) -> int:
        """Outputs: classes, or survival bins."""
        return len(self.class_names) if self.task == "classification" else len(self.bin_edges) - 1

    def module(self) -> torch.nn.Module:
        """The network in eval mode with these weights (built once, cached)."""
        if self._module is None:
            import torch

            cfg = self.config
            net = build_abmil(
                self.embed_dim,
                self.n_out,
                hidden=cfg.hidden,
                attn_dim=cfg.attn_dim,
                dropout=cfg.dropout,
            )
            net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()})
            net.eval()
            self._module = net
        return self._module

    # ------------------------------------------------------------------- save / load
    def config_dict(self) -> dict[str, Any]:
        """The JSON config stored in the file's header."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "embed_dim": int(self.embed_dim),
            "n_out": int(self.n_out),
            "class_names": list(self.class_names),
            "bin_edges": [float(v) for v in self.bin_edges],
            "config": asdict(self.config),
            "encoder": self.encoder,
            "weights_hash": self.weights_hash,
            "tiling": self.tiling,
            "training": self.training,
            "created": self.created,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.safetensors`` file (weights + JSON config header) atomically."""
        from safetensors.numpy import save

        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.state.items()}
        blob = save(tensors, metadata={_META_KEY: json.dumps(self.config_dict())})
        return write_atomic(path, blob, parents=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, embed_dim: int | None = None) -> SlideModel:
        """Read a model written by :meth:`save`, checking every shape.

        Parameters
        ----------
        path
            The ``.safetensors`` file.
        embed_dim
            When given, the model must read features of this width.

        Raises
        ------
        GpfmError
            Missing, foreign, damaged or newer file; or a feature width that does not fit.
        """
        from gpfm_core._modelfile import read_model_file

        p = Path(path)
        state, meta = read_model_file(
            p,
            _META_KEY,
            fmt=FORMAT,
            version=FORMAT_VERSION,
            what="slide model",
            missing_fix="train one with gpfm train-mil",
        )
        bad = f"{p} is a damaged or foreign slide model: save it again"
        try:
            task = str(meta["task"])
            d = int(meta["embed_dim"])
            cfg = MILConfig.from_dict(meta["config"])
            names = [str(n) for n in meta.get("class_names", [])]
            edges = [float(v) for v in meta.get("bin_edges", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise GpfmError(bad) from exc
        if task not in TASKS:
            raise GpfmError(bad)
        n_out = len(names) if task == "classification" else len(edges) - 1
        h, a = cfg.hidden, cfg.attn_dim
        want = {
            "fc.0.weight": (h, d),
            "fc.0.bias": (h,),
            "attention.0.weight": (a, h),
            "attention.0.bias": (a,),
            "attention.2.weight": (1, a),
            "attention.2.bias": (1,),
            "classifier.weight": (n_out, h),
            "classifier.bias": (n_out,),
        }
        if (
            n_out < (2 if task == "classification" else 1)
            or set(state) != set(want)
            or any(tuple(state[k].shape) != s for k, s in want.items())
            or not all(np.isfinite(v).all() for v in state.values())
            or (task == "survival" and np.any(np.diff(edges) <= 0))
        ):
            raise GpfmError(bad)
        if embed_dim is not None and int(embed_dim) != d:
            raise GpfmError(
                f"the slide model reads {d}-d features but the slide has {embed_dim}-d: "
                f"use a model trained on features of its encoder ({meta.get('encoder')})"
            )
        return cls(
            task=task,
            embed_dim=d,
            state={k: v.astype(np.float32) for k, v in state.items()},
            class_names=names,
            bin_edges=edges,
            config=cfg,
            encoder=meta.get("encoder"),
            weights_hash=meta.get("weights_hash"),
            tiling=dict(meta.get("tiling") or {}),
            training=dict(meta.get("training") or {}),
            created=str(meta.get("created", "")),
        )


@dataclass(frozen=True)
class SlideOutput:
    """What a slide model says about one slide.

    Attributes
    ----------
    attention
        (N,) float32 attention score of every tile (the pre-softmax ``a_i``; ``softmax``
        over them gives the pooling weights). Higher = more influence on the answer.
    probabilities
        Classification: (K,) float32 class probabilities; else None.
    prediction
        Classification: the most likely class name; else None.
    risk
        Survival: ``-sum(S)`` (higher = earlier event); else None.
    hazards, survival
        Survival: (n_bins,) discrete hazards and survival function; else None.
    precision
        What the two large matrix products ran in: ``"fp32"``, ``"bf16"`` or ``"int8"``.
    check
        One line: why that precision (for int8: its agreement with fp32 on the slide's
        own tiles, see :func:`iter_apply_slide_model`); empty when it was simply asked for.
    """

    attention: np.ndarray
    probabilities: np.ndarray | None = None
    prediction: str | None = None
    risk: float | None = None
    hazards: np.ndarray | None = None
    survival: np.ndarray | None = None
    precision: str = "fp32"
    check: str = ""


def _outputs(
    model: SlideModel, logits: np.ndarray, attention: np.ndarray, precision: str = "fp32",
    check: str = "",
) -> SlideOutput:  # fmt: skip
    from gpfm_core.evaluation.survival import risk_from_logits

    if model.task == "classification":
        z = logits.astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        return SlideOutput(
            attention, p.astype(np.float32), model.class_names[int(np.argmax(p))],
            precision=precision, check=check,
        )  # fmt: skip
    hazards, surv, risk = risk_from_logits(logits)
    return SlideOutput(
        attention,
        risk=float(risk),
        hazards=hazards.astype(np.float32),
        survival=surv.astype(np.float32),
        precision=precision,
        check=check,
    )


#: Precisions of :func:`apply_slide_model`.
APPLY_PRECISIONS = ("auto", "fp32", "bf16", "int8")
#: ``precision="auto"`` on CPU tries int8 from this many tiles x feature width (16,384 tiles of
#: 1024-d): below it fp32 takes well under a second and int8 would not repay its check.
INT8_AUTO_WORK = 1 << 24
#: Tiles of the slide (spread over it) that the int8 check applies in fp32 and in int8.
INT8_CHECK_TILES = 2048
#: Least Spearman rank correlation of the sample's attention scores, int8 vs fp32.
INT8_MIN_RANK_CORR = 0.99
#: Largest change of a class probability (or of a survival-curve value) on the sample.
INT8_MAX_OUTPUT_CHANGE = 0.02


def _layers(
    x: torch.Tensor, precision: str, qnet: torch.nn.Module | None, w: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (n, hidden) float32, attention scores (n,)) of a chunk of tiles."""
    import torch

    if precision == "int8":
        assert qnet is not None
        # dynamic int8: int8 weights, the chunk's activations quantised per call (x86/fbgemm)
        h = torch.relu_(qnet.fc[0](x))
        t = torch.tanh_(qnet.attention[0](h))
    else:
        mm = w["w0"].dtype
        h = torch.relu_(torch.nn.functional.linear(x.to(mm), w["w0"]).float() + w["b0"])
        t = torch.tanh_(torch.nn.functional.linear(h.to(mm), w["w1"]).float() + w["b1"])
    return h, t @ w["w2"] + w["b2"]


def _int8_check(
    model: SlideModel, x: np.ndarray, qnet: torch.nn.Module, w32: dict[str, torch.Tensor]
) -> tuple[bool, str]:
    """Whether int8 is faithful to fp32 on a sample of this slide's tiles, and the evidence.

    The sample (:data:`INT8_CHECK_TILES` tiles spread over the slide) is applied both ways:
    the attention scores must keep their order (Spearman >= :data:`INT8_MIN_RANK_CORR`) and
    the sample's pooled answer (class probabilities, or the survival curve) may move by at
    most :data:`INT8_MAX_OUTPUT_CHANGE`.
    """
    import warnings

    import torch
    from scipy.stats import spearmanr

    from gpfm_core.embed.device import fidelity_sample

    rows = fidelity_sample(x.shape[0], size=INT8_CHECK_TILES)
    xs = torch.from_numpy(np.ascontiguousarray(x[rows], dtype=np.float32))
    net = model.module()
    h32, a32 = _layers(xs, "fp32", None, w32)
    h8, a8 = _layers(xs, "int8", qnet, w32)
    r32, r8 = (
        _outputs(model, net.classifier(torch.softmax(a, dim=0) @ h).numpy(), a.numpy())
        for h, a in ((h32, a32), (h8, a8))
    )
    curve = "probabilities" if model.task == "classification" else "survival"
    change = float(np.abs(getattr(r32, curve) - getattr(r8, curve)).max())
    with warnings.catch_warnings():  # constant scores: rho is NaN, which fails the check
        warnings.simplefilter("ignore")
        rho = float(spearmanr(a32.numpy(), a8.numpy())[0]) if rows.size > 2 else 1.0
    ok = math.isfinite(rho) and rho >= INT8_MIN_RANK_CORR and change <= INT8_MAX_OUTPUT_CHANGE
    evidence = (
        f"attention rank correlation {rho:.4f} {'>=' if rho >= INT8_MIN_RANK_CORR else '<'} "
        f"{INT8_MIN_RANK_CORR}, {curve} change {change:.4f} "
        f"{'<=' if change <= INT8_MAX_OUTPUT_CHANGE else '>'} {INT8_MAX_OUTPUT_CHANGE} "
        f"on {rows.size} tiles"
    )
    return ok, evidence


def iter_apply_slide_model(
    model: SlideModel,
    features: np.ndarray,
    *,
    chunk: int = 8192,
    precision: str = "fp32",
    device: str = "cpu",
) -> Generator[tuple[int, int], None, SlideOutput]:
    """Apply a slide model to the tile features of one slide, yielding progress.

    A generator: yields ``(tiles done, N)`` after each chunk and returns the
    :class:`SlideOutput` (``StopIteration.value``); :func:`apply_slide_model` runs it to
    the end. For a worker that shows progress and can stop between chunks.

    The tiles are processed in chunks with a running (log-sum-exp) softmax, so memory stays
    at ``chunk x hidden`` floats whatever the slide size, and the answer equals the
    network's full forward pass.

    Cost: two matrix products per tile, ``2 x D x hidden + 2 x hidden x attn_dim`` FLOPs
    (1.18 MFLOP for D = 1024, hidden 512, attn_dim 128): 118 GFLOP for a 100,000-tile slide,
    89 % of it in the first layer. That is ~1.2 s at 100 GFLOP/s (float32 on two CPU cores),
    a few ms on a GPU; ``benchmarks/bench_eval.py`` measures each precision.

    Parameters
    ----------
    model
        A trained :class:`SlideModel`.
    features
        (N, D) float features of the slide's tiles (the model's encoder and tiling).
    chunk
        Tiles per step.
    precision
        ``"fp32"`` (exact); ``"bf16"``: both matrix products in bfloat16 with float32
        accumulation and softmax — 2-3x faster on CPUs with AVX512-BF16 or AMX and on GPUs;
        probabilities move by ~1e-3 and attention ranks stay (a test checks both);
        ``"int8"`` (CPU): both matrix products with dynamic int8 weights and activations
        (``torch.ao`` dynamic quantisation, as the embedding's CPU int8 path), ~3x faster
        than fp32 on CPUs with VNNI — kept only when faithful to fp32 on this slide
        (attention rank correlation and answer change on :data:`INT8_CHECK_TILES` of its
        tiles, see ``_int8_check``), else fp32 with a ``PrecisionFallbackWarning``;
        ``"auto"``: int8 on CPU for slides of at least :data:`INT8_AUTO_WORK` tiles x D,
        else fp32.
    device
        ``"cpu"`` or a torch device such as ``"cuda"``.

    Returns
    -------
    SlideOutput
        Attention (N,) and probabilities + prediction, or risk + hazards + survival; its
        ``precision`` / ``check`` say what ran and why.

    Raises
    ------
    GpfmError
        Wrong shape or width, no tiles, NaN / inf features, unknown precision, int8 asked
        for on a GPU.
    """
    import warnings

    import torch

    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise GpfmError(f"features must be a non-empty (N, D) array, got shape {x.shape}")
    if x.shape[1] != model.embed_dim:
        raise GpfmError(
            f"features are {x.shape[1]}-d but the slide model reads {model.embed_dim}-d: "
            f"embed the slide with the model's encoder ({model.encoder or 'unknown'})"
        )
    if precision not in APPLY_PRECISIONS:
        raise GpfmError(f"precision must be one of {APPLY_PRECISIONS}, not {precision!r}")
    net = model.module()
    dev = torch.device(device)
    if precision == "int8" and dev.type != "cpu":
        raise GpfmError("int8 applies on the CPU only: use precision fp32 or bf16 on a GPU")
    n = x.shape[0]
    check = ""
    if precision == "auto":
        big = dev.type == "cpu" and n * x.shape[1] >= INT8_AUTO_WORK
        precision = "int8" if big else "fp32"
        if not big:
            check = "fp32: a small slide (int8 would not repay its check)"
    mm = torch.bfloat16 if precision == "bf16" else torch.float32
    w = {
        "w0": net.fc[0].weight.to(dev, mm), "b0": net.fc[0].bias.to(dev),
        "w1": net.attention[0].weight.to(dev, mm), "b1": net.attention[0].bias.to(dev),
        "w2": net.attention[2].weight.to(dev)[0], "b2": net.attention[2].bias.to(dev),
    }  # fmt: skip
    qnet = None
    if precision == "int8":
        from gpfm_core.embed.device import PrecisionFallbackWarning, quantize_int8

        try:
            qnet = quantize_int8(net)
            with torch.inference_mode():
                ok, evidence = _int8_check(model, x, qnet, w)
        except GpfmError as exc:  # no quantised engine in this torch build
            ok, evidence = False, str(exc)
        if ok:
            check = f"int8: {evidence}"
        else:
            warnings.warn(
                f"int8 is not faithful to fp32 on this slide ({evidence}); applying in fp32",
                PrecisionFallbackWarning,
                stacklevel=2,
            )
            precision, check, qnet = "fp32", f"fp32 fallback: {evidence}", None
    # inference mode is entered per chunk, never across a yield: it is thread state, and
    # the caller's code between chunks must not run in it
    with torch.inference_mode():
        attention = torch.empty(n, dtype=torch.float32, device=dev)
        state = {
            "m": torch.tensor(-math.inf, dtype=torch.float64, device=dev),
            "total": torch.zeros((), dtype=torch.float64, device=dev),
            "pooled": torch.zeros(model.config.hidden, dtype=torch.float64, device=dev),
        }
    for start in range(0, n, chunk):
        with torch.inference_mode():
            xb = torch.from_numpy(np.ascontiguousarray(x[start : start + chunk], dtype=np.float32))
            h, a = _layers(xb.to(dev, non_blocking=True), precision, qnet, w)
            attention[start : start + a.shape[0]] = a
            # running softmax pooling: rescale what was summed when the maximum grows
            m_new = torch.maximum(state["m"], a.max().double())
            scale = torch.exp(state["m"] - m_new)
            e = torch.exp(a.double() - m_new)
            state["total"] = state["total"] * scale + e.sum()
            state["pooled"] = state["pooled"] * scale + (e.float() @ h).double()
            state["m"] = m_new
        yield min(start + chunk, n), n
    pooled = state["pooled"] / state["total"]
    if not bool(torch.isfinite(attention).all()) or not bool(torch.isfinite(pooled).all()):
        raise GpfmError("features contain NaN or inf: re-embed the slide or drop those tiles")
    with torch.inference_mode():
        w3, b3 = net.classifier.weight.to(dev), net.classifier.bias.to(dev)
        logits = torch.nn.functional.linear(pooled.float(), w3, b3).cpu().numpy()
    return _outputs(model, logits, attention.cpu().numpy(), precision, check)


def apply_slide_model(
    model: SlideModel,
    features: np.ndarray,
    *,
    chunk: int = 8192,
    precision: str = "fp32",
    device: str = "cpu",
) -> SlideOutput:
    """Apply a slide model to the tile features of one slide (pure: no state changes).

    :func:`iter_apply_slide_model` run to the end; the parameters, cost, result and errors
    are documented there (``precision``: ``"fp32"`` exact, ``"bf16"``, ``"int8"`` checked
    against fp32 on the slide, ``"auto"``).
    """
    gen = iter_apply_slide_model(model, features, chunk=chunk, precision=precision, device=device)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ------------------------------------------------------------------------------- features
class SlideBags:
    """Tile features of a cohort, one ``(N_i, D)`` array per slide, read on demand.

    Parameters
    ----------
    paths
        One embeddings file per bag (any file :func:`gpfm_core.embed.load_embeddings`
        reads), a list of files (a patient's slides: their tiles form one bag), or
        in-memory arrays (for tests and benchmarks).
    cache_bytes
        Keep recently read slides in memory up to this size (LRU); a cohort that fits is
        read from disk once.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike[str] | np.ndarray], *, cache_bytes: int = 4 << 30
    ) -> None:
        self._items: list[Any] = list(paths)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.cache_bytes = int(cache_bytes)
        self._dim: int | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self._items[i]
        if isinstance(item, np.ndarray):
            return self._checked(i, item)
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        from gpfm_core.embed import load_embeddings

        if isinstance(item, list | tuple):  # a patient: the tiles of all their slides
            feats = self._checked(i, np.concatenate([load_embeddings(p).features for p in item]))
        else:
            feats = self._checked(i, load_embeddings(item).features)
        self._cache[i] = feats
        self._bytes += feats.nbytes
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return feats

    def _checked(self, i: int, feats: np.ndarray) -> np.ndarray:
        f = np.asarray(feats, dtype=np.float32)
        name = self._items[i] if not isinstance(self._items[i], np.ndarray) else f"bag {i}"
        if f.ndim != 2 or f.shape[0] == 0:
            raise GpfmError(f"{name} has no tiles (features {f.shape}): embed the slide again")
        if self._dim is None:
            self._dim = int(f.shape[1])
        elif f.shape[1] != self._dim:
            raise GpfmError(
                f"{name} has {f.shape[1]}-d features but other slides have {self._dim}-d: "
                "use one encoder's features for the whole cohort"
            )
        return f

    @property
    def dim(self) -> int:
        """D (reads the first slide when not known yet)."""
        if self._dim is None:
            self[0]
        assert self._dim is not None
        return self._dim


# ------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """A trained model, its training history and its outputs on the evaluated slides.

    Attributes
    ----------
    model
        The :class:`SlideModel` with the best validation epoch's weights.
    history
        One dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``train_seconds``
        (wall time of the epoch's training steps).
    outputs
        Slide index -> :class:`SlideOutput` for every index passed as ``evaluate``.
    """

    model: SlideModel
    history: list[dict[str, float]]
    outputs: dict[int, SlideOutput]


def _balanced_weights(groups: np.ndarray) -> np.ndarray:
    """CLAM's sampling weights: N / N_group for each slide (-> every group equally likely)."""
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return (groups.size / counts[inv]).astype(np.float64)


def _standardiser(
    bags: SlideBags, train: np.ndarray, *, seed: int, max_slides: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and 1 / std of the training tiles (from up to ``max_slides`` slides).

    ABMIL trains on standardised features: features with a large common offset (all
    positive, as texture statistics are) otherwise make the first epochs order slides by
    feature magnitude, and survival models start with an inverted risk. The standardisation
    is folded into the first layer when training ends (:func:`_fold_standardiser`), so the
    saved model is the plain ABMIL of the paper applied to raw features.
    """
    pick = train
    if train.size > max_slides:
        pick = np.sort(np.random.default_rng(seed).choice(train, max_slides, replace=False))
    total = np.zeros(bags.dim, np.float64)
    sq = np.zeros(bags.dim, np.float64)
    n = 0
    for i in pick:
        f = bags[int(i)]
        total += f.sum(axis=0, dtype=np.float64)
        sq += np.einsum("ij,ij->j", f, f, dtype=np.float64)
        n += f.shape[0]
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), (1.0 / std).astype(np.float32)


def _fold_standardiser(
    state: dict[str, np.ndarray], mean: np.ndarray, inv_std: np.ndarray
) -> dict[str, np.ndarray]:
    """``W (x - m) * s + b`` -> ``(W * s) x + (b - (W * s) m)``: the same network on raw x."""
    w = state["fc.0.weight"].astype(np.float64) * inv_std.astype(np.float64)[None, :]
    b = state["fc.0.bias"].astype(np.float64) - w @ mean.astype(np.float64)
    out = dict(state)
    out["fc.0.weight"] = w.astype(np.float32)
    out["fc.0.bias"] = b.astype(np.float32)
    return out


def _baseline_hazard_logits(bins: np.ndarray, censorship: np.ndarray, n_bins: int) -> np.ndarray:
    """logit of the discrete hazard of each bin: events in it / cases still at risk."""
    events = np.bincount(bins[censorship == 0], minlength=n_bins).astype(np.float64)
    at_risk = np.array([(bins >= k).sum() for k in range(n_bins)], dtype=np.float64)
    h = np.clip(events / np.maximum(at_risk, 1.0), 0.02, 0.98)
    return np.log(h / (1.0 - h)).astype(np.float32)


def _step_threads(bags: SlideBags, idx: np.ndarray) -> int:
    """One thread for small bags (threads only wait on each other), all threads otherwise."""
    import torch

    sizes = [bags[int(i)].shape[0] for i in idx[: min(8, idx.size)]]
    work = float(np.mean(sizes)) * bags.dim
    return 1 if work < _SMALL_BAG else torch.get_num_threads()


def train_abmil(
    bags: SlideBags,
    *,
    task: str,
    train: Sequence[int],
    val: Sequence[int],
    evaluate: Sequence[int] = (),
    labels: np.ndarray | None = None,
    class_names: Sequence[str] = (),
    time: np.ndarray | None = None,
    censorship: np.ndarray | None = None,
    config: MILConfig | None = None,
    seed: int = 0,
    encoder: str | None = None,
    weights_hash: str | None = None,
    tiling: dict[str, Any] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train ABMIL on the ``train`` slides, early-stop on ``val``, apply to ``evaluate``.

    Parameters
    ----------
    bags
        Features of every slide of the cohort.
    task
        ``"classification"`` (needs ``labels`` and ``class_names``) or ``"survival"``
        (needs ``time`` and ``censorship``, 1 = censored).
    train, val, evaluate
        Slide indices into ``bags``.
    labels
        (N_slides,) int class index per slide.
    class_names
        One name per class.
    time, censorship
        (N_slides,) follow-up time and censorship per slide.
    config
        :class:`MILConfig` (default: the paper's).
    seed
        Seeds the weights, dropout and the slide order.
    encoder, weights_hash, tiling
        Recorded in the model.
    progress
        Called as ``progress(epoch, max_epochs, val_loss)`` after each epoch.

    Returns
    -------
    TrainResult

    Raises
    ------
    GpfmError
        Empty splits, missing targets, a class absent from the training split.
    """
    import torch
    import torch.nn.functional as F

    from gpfm_core.evaluation.survival import assign_bins, nll_survival_loss, survival_bins

    cfg = config or MILConfig()
    if task not in TASKS:
        raise GpfmError(f"task must be one of {TASKS}, not {task!r}")
    tr, va = np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64)
    if tr.size == 0 or va.size == 0:
        raise GpfmError("ABMIL needs training and validation slides: check the task's splits")
    if task == "classification":
        if labels is None or len(class_names) < 2:
            raise GpfmError("classification needs labels and at least two class names")
        y = np.asarray(labels, dtype=np.int64)
        missing = sorted(set(range(len(class_names))) - set(y[tr].tolist()))
        if missing:
            raise GpfmError(
                f"class(es) {[class_names[i] for i in missing]} have no training slide: "
                "add slides or change the split"
            )
        n_out = len(class_names)
        edges: np.ndarray = np.empty(0)
        groups = y[tr]
        target = torch.from_numpy(y)
    else:
        if time is None or censorship is None:
            raise GpfmError("survival needs survival_months and censorship for every slide")
        t = np.asarray(time, dtype=np.float64)
        c = np.asarray(censorship, dtype=np.int64)
        edges = survival_bins(t[tr], c[tr], n_bins=cfg.n_bins)
        bins = assign_bins(t, edges)
        n_out = cfg.n_bins
        groups = bins[tr] * 2 + c[tr]
        bins_t, cens_t = torch.from_numpy(bins), torch.from_numpy(c)

    def loss_of(logits: torch.Tensor, i: int) -> torch.Tensor:
        if task == "classification":
            return F.cross_entropy(logits[None], target[i : i + 1])
        return nll_survival_loss(
            logits[None], bins_t[i : i + 1], cens_t[i : i + 1], alpha=cfg.alpha_surv
        )

    dim = bags.dim
    mean, inv_std = _standardiser(bags, tr, seed=seed)

    def x_of(i: int) -> torch.Tensor:
        return torch.from_numpy(bags[i])  # shares the cached array's memory

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_abmil(dim, n_out, hidden=cfg.hidden, attn_dim=cfg.attn_dim, dropout=cfg.dropout)
        net.input_mean = torch.from_numpy(mean)
        net.input_scale = torch.from_numpy(inv_std)
        if task == "survival":
            # start at the training split's baseline hazards: otherwise the first epochs fit
            # the baseline through the weights, which orders slides by feature magnitude
            # (often inverting the risk) before the discriminative signal is learnt
            with torch.no_grad():
                net.classifier.bias.copy_(
                    torch.from_numpy(_baseline_hazard_logits(bins[tr], c[tr], n_out))
                )
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        weights = (
            torch.from_numpy(_balanced_weights(groups))
            if cfg.balanced_sampling
            else torch.ones(tr.size, dtype=torch.float64)
        )
        best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, {})
        history: list[dict[str, float]] = []
        since = 0
        threads = _step_threads(bags, tr)
        with torch_threads(threads):
            for epoch in range(1, cfg.max_epochs + 1):
                net.train()
                order = tr[
                    torch.multinomial(weights, tr.size, replacement=True, generator=gen).numpy()
                ]
                total = 0.0
                t_epoch = perf_counter()
                for i in order:
                    logits, _ = net(x_of(int(i)))
                    loss = loss_of(logits, int(i))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                seconds = perf_counter() - t_epoch
                net.eval()
                with torch.inference_mode():
                    val_loss = float(
                        np.mean([float(loss_of(net(x_of(int(i)))[0], int(i))) for i in va])
                    )
                history.append(
                    {
                        "epoch": epoch,
                        "train_loss": total / tr.size,
                        "val_loss": val_loss,
                        "train_seconds": seconds,
                    }
                )
                if progress is not None:
                    progress(epoch, cfg.max_epochs, val_loss)
                if val_loss < best[0]:
                    best = (
                        val_loss,
                        epoch,
                        {k: v.detach().clone() for k, v in net.state_dict().items()},
                    )
                    since = 0
                else:
                    since += 1
                    if since >= cfg.patience and epoch >= cfg.min_epochs:
                        break
    model = SlideModel(
        task=task,
        embed_dim=dim,
        state=_fold_standardiser({k: v.numpy() for k, v in best[2].items()}, mean, inv_std),
        class_names=[str(n) for n in class_names] if task == "classification" else [],
        bin_edges=[float(v) for v in edges],
        config=cfg,
        encoder=encoder,
        weights_hash=weights_hash,
        tiling=dict(tiling or {}),
        training={
            "seed": int(seed),
            "epochs": len(history),
            "best_epoch": best[1],
            "best_val_loss": best[0],
            "n_train": int(tr.size),
            "n_val": int(va.size),
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    with torch_threads(threads):
        outputs = {int(i): apply_slide_model(model, bags[int(i)]) for i in evaluate}
    return TrainResult(model, history, outputs)
