"""Linear probe: logistic regression on tile embeddings, saved safely (safetensors + JSON).

The saved file is one ``.safetensors`` file: tensors ``coef`` (K, D), ``intercept`` (K,),
``scaler_mean`` (D,), ``scaler_scale`` (D,), ``classes`` (K,) int64 (indices into
``class_names`` of the classes seen in training) and a JSON string in the header metadata
(key ``gpfm_probe``) with class names, colours, encoder name, encoder weights hash, the
tiling the features were made at (``requested_mpp``, ``tile_px``, ``overlap_px``), embed dim
and date. No pickle: loading parses numbers and JSON only. Files written before the weights
hash and tiling were stored load with a :class:`ProbeProvenanceWarning`.

Speed (100,000 x 1024 float32 on 2 cores, see ``benchmarks/bench_analysis.py``)
--------------------------------------------------------------------------------
* Fitting minimises scikit-learn's ``LogisticRegression(class_weight="balanced", C=C)``
  objective (multinomial; a single logit vector for two classes) with a full-batch
  L-BFGS in float32 torch (``solver="torch"``, the default; torch is imported lazily).
  scikit-learn's lbfgs reaches the same optimum but its skinny (N, D) @ (D, K) products go
  through OpenBLAS, several times slower; ``solver="sklearn"`` keeps it available and a test
  checks that both give >= 99 % identical labels. Without torch the sklearn solver is used.
  Measured (10,000 labelled x 1024, 4 overlapping classes, load average ~2): torch 0.2 s,
  sklearn 2.4 s; 98.9 % identical labels on 90,000 held-out tiles (both stop at ``tol``,
  near, not at, the optimum: the disagreements are tiles on a decision boundary).
* Cross-validation fits every fold from zero with the same ``max_iter`` / ``tol`` as the
  final fit (no warm start from the full fit: its solution has seen the held-out fold). A
  fold costs about as much as the final fit (less: 80 % of the rows), so ``cv_folds=5``
  costs ~4 extra fits: fit + 5-fold CV measured 0.6 s. No parallel folds: torch already
  uses every core for each fit.

Honest cross-validation
-----------------------
Neighbouring tiles of one annotation look alike, so a split tile by tile puts near copies
of a held-out tile in the training fold and reports what the probe memorised: labels that
carry no tissue information scored 0.67 balanced accuracy that way (0.47 split by
annotation). The folds are therefore grouped (scikit-learn ``StratifiedGroupKFold``): every
tile of one annotation falls on one side. A class drawn as a single annotation is cut into
square blocks of the tile grid (the largest of 16, 8, 4, 2 tiles a side that gives each
such class enough blocks), as spatial cross-validation does (Roberts et al. 2017,
Ecography 40:913). The scaler is fitted inside each training fold (a scikit-learn
``Pipeline`` of ``StandardScaler`` and the probe's own solver). :attr:`ProbeReport.cv_scheme`
says which split was used.
* Prediction folds the standardisation into the weights (``W' = W / scale``,
  ``b' = b - W' @ mean``): one float32 (N, D) @ (D, K) product (torch when importable, else
  numpy), no float64 or standardised copies, softmax in place: 60 ms for 100,000 x 1024
  (numpy/OpenBLAS needs ~250 ms for the same skinny product).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gpfm_core._atomic import write_atomic
from gpfm_core.analysis._util import as_features
from gpfm_core.errors import GpfmError

log = logging.getLogger(__name__)

class ProbeProvenanceWarning(UserWarning):
    """A probe file does not record the encoder weights or tiling it was trained on."""


FORMAT = "gpfm-linear-probe"
FORMAT_VERSION = 1
_META_KEY = "gpfm_probe"


@dataclass(frozen=True)
class ProbeReport:
    """What a fit learned from.

    Attributes
    ----------
    n_per_class
        Labelled tiles per class name (classes without tiles included, as 0).
    cv_balanced_accuracy
        Mean balanced accuracy of grouped, stratified k-fold CV, or None (see ``note``).
    train_balanced_accuracy
        Balanced accuracy on the training tiles (optimistic).
    cv_folds
        Folds used (0 when CV was skipped).
    note
        Why CV was skipped or reduced; empty otherwise.
    cv_scheme
        How the CV score was computed, in words (folds, and what kept tiles apart).
    cv_groups
        Number of groups the folds were built from (annotations, or annotation blocks).
    """

    n_per_class: dict[str, int]
    cv_balanced_accuracy: float | None
    train_balanced_accuracy: float
    cv_folds: int = 0
    note: str = ""
    cv_scheme: str = ""
    cv_groups: int = 0


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax of float logits, in place."""
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _linear(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w.T + b`` as a fresh (N, K) float32 array.

    OpenBLAS is slow on this skinny product (K is a handful of classes); torch's CPU kernels
    are 2-3x faster, so torch is used when it is importable (it shares ``x``'s memory).
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return np.asarray(x @ w.T + b, dtype=np.float32)
    with warnings.catch_warnings():  # read-only input (e.g. a cached view): torch only reads
        warnings.filterwarnings("ignore", message=".*not writable.*")
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.no_grad():
        z = torch.nn.functional.linear(xt, torch.from_numpy(w), torch.from_numpy(b))
    return z.numpy()


def _fit_lbfgs_torch(
    xs: np.ndarray, y: np.ndarray, *, C: float, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's balanced, L2 logistic regression objective, full-batch L-BFGS in torch.

    Minimises ``sum_i s_i * loss_i / sum(s) + ||W||^2 / (2 C sum(s))`` with
    ``s_i = n / (K * n_{y_i})`` (``class_weight="balanced"``), intercept unpenalised: the
    multinomial loss for K > 2 and the binary logistic loss (one weight vector) for K == 2,
    exactly as scikit-learn does. Stops when the largest gradient entry is <= ``tol`` or
    after ``max_iter`` iterations (history 10, strong-Wolfe line search).

    Returns
    -------
    tuple of numpy.ndarray
        coef (K, D) and intercept (K,) float32 for softmax (binary: first row zero).
    """
    import torch
    import torch.nn.functional as F

    n, d = xs.shape
    k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)
    sw_np = (n / (k * counts.astype(np.float64)))[y]
    sw_sum = float(sw_np.sum())
    x_t = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    sw = torch.from_numpy((sw_np / sw_sum).astype(np.float32))
    l2 = 0.5 / (float(C) * sw_sum)
    rows = 1 if k == 2 else k
    with torch.enable_grad():
        w = torch.zeros((rows, d), dtype=torch.float32, requires_grad=True)
        b = torch.zeros(rows, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=int(max_iter),
            tolerance_grad=float(tol),
            tolerance_change=1e-9,
            history_size=10,
            line_search_fn="strong_wolfe",
        )
        target = y_t.to(torch.float32) if k == 2 else y_t

        def closure() -> torch.Tensor:
            opt.zero_grad()
            z = F.linear(x_t, w, b)
            if k == 2:
                per = F.binary_cross_entropy_with_logits(z[:, 0], target, reduction="none")
            else:
                per = F.cross_entropy(z, target, reduction="none")
            loss = (per * sw).sum() + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    n_iter = int(opt.state[w].get("n_iter", 0))
    if n_iter >= int(max_iter):
        log.warning("probe L-BFGS stopped at max_iter=%d before tol=%g", max_iter, tol)
    log.debug("probe L-BFGS: %d iterations on %s", n_iter, xs.shape)
    coef = w.detach().numpy().astype(np.float32)
    intercept = b.detach().numpy().astype(np.float32)
    if k == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1, np.float32), intercept])
    return np.ascontiguousarray(coef), intercept


#: Block sides (tiles) tried, largest first, for a class drawn as one annotation.
BLOCK_SIDES = (16, 8, 4, 2)


@dataclass(frozen=True)
class CVPlan:
    """How :meth:`LinearProbe.fit` cross-validates.

    Attributes
    ----------
    groups
        (n,) int64 group of each labelled tile (tiles of one group never fall on both
        sides of a split), or None for a split tile by tile.
    folds
        Number of folds; 0 when CV is skipped.
    scheme
        The split in words, for the user.
    note
        Why CV was skipped or reduced; empty otherwise.
    """

    groups: np.ndarray | None
    folds: int
    scheme: str
    note: str = ""

    @property
    def n_groups(self) -> int:
        """Distinct groups (0 for a split tile by tile)."""
        return 0 if self.groups is None else int(np.unique(self.groups).size)


def plan_cv(
    y: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    grid_rc: np.ndarray | None = None,
    cv_folds: int = 5,
    class_names: Sequence[str] | None = None,
) -> CVPlan:
    """Groups and folds for an honest cross-validation of labelled tiles.

    Folds are grouped by annotation; a class with a single annotation has it cut into
    square blocks of ``grid_rc`` (the largest side in :data:`BLOCK_SIDES` giving it
    ``cv_folds`` blocks, else the most blocks). Without groups each class counts as one
    annotation. Without ``grid_rc`` either, tiles are split at random (said in ``scheme``).

    Parameters
    ----------
    y
        (n,) int class of each labelled tile.
    groups
        (n,) int annotation of each labelled tile, or None.
    grid_rc
        (n, 2) int (row, col) of each labelled tile in the tile grid, or None.
    cv_folds
        Folds wanted; fewer when a class has fewer groups (said in ``note``).
    class_names
        Names for the messages, indexed by the values of ``y``.

    Returns
    -------
    CVPlan
    """
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or np.unique(y).size < 2:
        raise GpfmError("y must be a 1-D integer array with at least two classes: label two classes")
    y = y.astype(np.int64, copy=False)
    classes, counts = np.unique(y, return_counts=True)
    name = (lambda c: repr(str(class_names[int(c)]))) if class_names else (lambda c: f"class {c}")
    if cv_folds is None or int(cv_folds) < 2:
        return CVPlan(None, 0, "", "cross-validation not requested (cv_folds < 2)")
    want = int(cv_folds)
    if groups is None and grid_rc is None:
        small = int(counts.min())
        if small < 2:
            return CVPlan(None, 0, "", f"cross-validation skipped: a class has only {small} labelled tile")
        folds = min(want, small)
        note = f"only {folds} CV folds: the smallest class has {small} tiles" if folds < want else ""
        scheme = (
            f"{folds}-fold CV, tiles split at random (no annotations given: neighbouring "
            "tiles fall on both sides, so the score is optimistic)"
        )
        return CVPlan(None, folds, scheme, note)
    g = np.asarray(y if groups is None else groups, dtype=np.int64)
    if g.shape != y.shape:
        raise GpfmError(f"groups must have shape {y.shape}: one annotation index per labelled tile")
    rc = None if grid_rc is None else np.asarray(grid_rc, dtype=np.int64)
    if rc is not None and rc.shape != (y.size, 2):
        raise GpfmError(f"grid_rc must have shape ({y.size}, 2): one (row, col) per labelled tile")
    # groups are (class, annotation, block) so that no group straddles two classes
    key = np.stack([y, g, np.zeros_like(y), np.zeros_like(y)], axis=1)
    single = [c for c in classes if np.unique(g[y == c]).size < 2]
    side = 0
    if single and rc is not None:
        def n_blocks(c: int, s: int) -> int:
            sel = y == c
            return int(np.unique(rc[sel] // s, axis=0).shape[0])

        side = next(
            (s for s in BLOCK_SIDES if all(n_blocks(c, s) >= want for c in single)), BLOCK_SIDES[-1]
        )
        for c in single:
            sel = y == c
            key[sel, 2:] = rc[sel] // side
    gid = np.unique(key, axis=0, return_inverse=True)[1].ravel().astype(np.int64)
    per_class = {int(c): int(np.unique(gid[y == c]).size) for c in classes}
    fewest = min(per_class, key=per_class.__getitem__)
    folds = min(want, per_class[fewest])
    if folds < 2:
        why = "one annotation" if rc is None else f"one annotation of {int(counts[classes == fewest][0])} tile(s)"
        return CVPlan(
            gid, 0, "",
            f"cross-validation skipped: {name(fewest)} has {why}; draw more annotations of it",
        )  # fmt: skip
    parts = [f"{folds}-fold CV grouped by annotation (no annotation on both sides)"]
    if single and side:
        names = ", ".join(name(c) for c in single)
        parts.append(f"{names} drawn once, cut into {side}x{side}-tile blocks")
    parts.append("scaler fitted on each training fold")
    note = ""
    if folds < want:
        unit = "blocks" if int(fewest) in single and side else "annotations"
        note = f"only {folds} CV folds: {name(fewest)} has {per_class[fewest]} {unit}"
    return CVPlan(gid, folds, "; ".join(parts), note)


def _fit_weights(
    xs: np.ndarray, y: np.ndarray, *, C: float, max_iter: int, tol: float, solver: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(coef (K, D), intercept (K,)) float32 on standardised ``xs``; y in 0..K-1."""
    if solver not in ("torch", "sklearn"):
        raise GpfmError(f"solver must be 'torch' or 'sklearn', got {solver!r}")
    if solver == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:  # pragma: no cover - torch is a dependency
            log.warning("torch is not importable: fitting the probe with scikit-learn")
        else:
            return _fit_lbfgs_torch(xs, y, C=C, max_iter=max_iter, tol=tol)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        C=C, class_weight="balanced", solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed
    ).fit(xs, y)
    coef = np.asarray(model.coef_, dtype=np.float32)
    intercept = np.asarray(model.intercept_, dtype=np.float32)
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([0, z])
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([np.zeros(1, np.float32), intercept])
    return np.ascontiguousarray(coef), intercept


_CLASSIFIER: type | None = None


def _probe_classifier() -> type:
    """The probe's solver as a scikit-learn classifier (built once; sklearn imported lazily)."""
    global _CLASSIFIER
    if _CLASSIFIER is None:
        from sklearn.base import BaseEstimator, ClassifierMixin

        class ProbeClassifier(ClassifierMixin, BaseEstimator):
            """Balanced L2 logistic regression fitted by :func:`_fit_weights`."""

            def __init__(
                self, C: float = 1.0, max_iter: int = 200, tol: float = 1e-3,
                solver: str = "torch", seed: int = 0,
            ) -> None:  # fmt: skip
                self.C = C
                self.max_iter = max_iter
                self.tol = tol
                self.solver = solver
                self.seed = seed

            def fit(self, X: np.ndarray, y: np.ndarray) -> ProbeClassifier:
                self.classes_, yenc = np.unique(y, return_inverse=True)
                self.coef_, self.intercept_ = _fit_weights(
                    np.asarray(X, dtype=np.float32), yenc.astype(np.int64), C=self.C,
                    max_iter=self.max_iter, tol=self.tol, solver=self.solver, seed=self.seed,
                )  # fmt: skip
                return self

            def predict(self, X: np.ndarray) -> np.ndarray:
                z = _linear(np.asarray(X, dtype=np.float32), self.coef_, self.intercept_)
                return self.classes_[z.argmax(axis=1)]

        _CLASSIFIER = ProbeClassifier
    return _CLASSIFIER


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features.

    Parameters
    ----------
    C
        Inverse L2 strength of scikit-learn's ``LogisticRegression``.
    max_iter, tol
        L-BFGS stopping: at most ``max_iter`` iterations, or when the largest gradient entry
        of the (sample-weight averaged) objective is below ``tol`` (scikit-learn's meaning).
    solver
        ``"torch"`` (default; float32 full-batch L-BFGS) or ``"sklearn"`` (scikit-learn lbfgs).
    encoder
        Name of the encoder whose features the probe reads (stored in the file).
    weights_hash
        Hash of that encoder's weights (stored in the file; None: unknown).
    tiling
        ``{"requested_mpp", "tile_px", "overlap_px"}`` of the tiles it was trained on
        (stored in the file; None: unknown).
    class_colours
        Optional (r, g, b) 0-255 per class name, stored in the file for display.
    """

    C: float = 1.0
    max_iter: int = 200
    tol: float = 1e-3
    solver: str = "torch"
    encoder: str | None = None
    weights_hash: str | None = None
    tiling: dict[str, float | int] | None = None
    class_colours: list[tuple[int, int, int]] | None = None
    class_names: list[str] = field(default_factory=list)
    coef_: np.ndarray | None = field(default=None, repr=False)
    intercept_: np.ndarray | None = field(default=None, repr=False)
    mean_: np.ndarray | None = field(default=None, repr=False)
    scale_: np.ndarray | None = field(default=None, repr=False)
    classes_: np.ndarray | None = field(default=None, repr=False)
    report_: ProbeReport | None = None
    created_: str = ""

    # ------------------------------------------------------------------ fitting
    def _fit_weights(self, xs: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
        """(coef (K, D), intercept (K,)) float32 on standardised ``xs``; y in 0..K-1."""
        return _fit_weights(
            xs, y, C=self.C, max_iter=self.max_iter, tol=self.tol, solver=self.solver, seed=seed
        )

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        class_names: Sequence[str],
        groups: np.ndarray | None = None,
        grid_rc: np.ndarray | None = None,
        cv_folds: int = 5,
        seed: int = 0,
    ) -> ProbeReport:
        """Fit on labelled tiles (label -1 = unlabelled, ignored) and cross-validate.

        Parameters
        ----------
        features
            (N, D) float array.
        labels
            (N,) int class index into ``class_names``, or -1.
        class_names
            One name per class index.
        groups
            (N,) int annotation that labelled each tile (e.g.
            :attr:`~gpfm_core.analysis.labels.ShapeLabels.groups`): CV folds never split one.
        grid_rc
            (N, 2) int (row, col) of each tile: a class drawn as one annotation is cut into
            blocks of the grid for CV (see the module docstring). Without ``groups`` and
            ``grid_rc`` the folds split tiles at random, and the report says so.
        cv_folds
            Grouped, stratified CV folds for the report (0 or 1 skips CV).
        seed
            Seed for the CV split.

        Returns
        -------
        ProbeReport
        """
        x = as_features(features, finite=False)  # only labelled rows are checked (below)
        y = np.asarray(labels)
        names = [str(c) for c in class_names]
        if y.shape != (x.shape[0],):
            raise GpfmError(f"labels must have shape ({x.shape[0]},), got {y.shape}: one per tile")
        if not np.issubdtype(y.dtype, np.integer):
            raise GpfmError("labels must be integer class indices (-1 = unlabelled)")
        if len(names) < 2 or len(set(names)) != len(names):
            raise GpfmError("class_names must list at least two distinct names")
        if y.size and (y.max() >= len(names) or y.min() < -1):
            raise GpfmError(f"labels must lie in -1..{len(names) - 1}: one name per class index")
        keep = y >= 0
        if not keep.any():
            raise GpfmError("no labelled tiles: draw annotations over embedded tissue first")
        xl, yl = x[keep], y[keep].astype(np.int64)  # fancy indexing: xl is a fresh copy
        if not np.isfinite(xl).all():
            raise GpfmError("features contain NaN or inf: re-embed the slide or drop those tiles")
        classes, yenc, counts = np.unique(yl, return_inverse=True, return_counts=True)
        n_per_class = {name: 0 for name in names}
        for c, cnt in zip(classes, counts, strict=True):
            n_per_class[names[int(c)]] = int(cnt)
        if classes.size < 2:
            raise GpfmError(
                f"only class {names[int(classes[0])]!r} is labelled: annotate at least two classes"
            )
        if self.class_colours is not None and len(self.class_colours) != len(names):
            raise GpfmError("class_colours must have one (r, g, b) per class name")

        plan = plan_cv(
            yenc,
            groups=None if groups is None else self._per_tile(groups, keep, 1, "groups"),
            grid_rc=None if grid_rc is None else self._per_tile(grid_rc, keep, 2, "grid_rc"),
            cv_folds=cv_folds,
            class_names=[names[int(c)] for c in classes],
        )
        cv_score = None
        if plan.folds >= 2:
            cv_score = self._cross_validate(xl, yenc, plan, seed=seed)

        mean = xl.mean(axis=0, dtype=np.float64)
        scale = xl.std(axis=0, dtype=np.float64)
        scale[scale < 1e-8] = 1.0
        xs = xl  # standardise in place, float32 (xl is ours)
        xs -= mean.astype(np.float32)
        xs /= scale.astype(np.float32)
        coef, intercept = self._fit_weights(xs, yenc, seed)
        self.class_names = names
        self.coef_ = coef
        self.intercept_ = intercept
        self.mean_ = mean.astype(np.float32)
        self.scale_ = scale.astype(np.float32)
        self.classes_ = classes.astype(np.int64)
        self.created_ = datetime.now(timezone.utc).isoformat(timespec="seconds")
        train_pred = _linear(xs, coef, intercept).argmax(axis=1)  # xs is already standardised
        report = ProbeReport(
            n_per_class=n_per_class,
            cv_balanced_accuracy=cv_score,
            train_balanced_accuracy=_balanced_accuracy(yenc, train_pred),
            cv_folds=plan.folds,
            note=plan.note,
            cv_scheme=plan.scheme,
            cv_groups=plan.n_groups,
        )
        self.report_ = report
        log.info("probe fit on %d tiles: %s", yl.size, report)
        return report

    @staticmethod
    def _per_tile(values: np.ndarray, keep: np.ndarray, width: int, name: str) -> np.ndarray:
        arr = np.asarray(values)
        shape = (keep.size,) if width == 1 else (keep.size, width)
        if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer):
            raise GpfmError(f"{name} must be an integer array of shape {shape}: one per tile")
        return arr[keep]

    def _cross_validate(self, x: np.ndarray, y: np.ndarray, plan: CVPlan, *, seed: int) -> float:
        """Mean balanced accuracy over the folds of ``plan`` on raw (unscaled) features."""
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if plan.groups is None:
            splits = StratifiedKFold(plan.folds, shuffle=True, random_state=seed).split(x, y)
        else:
            cv = StratifiedGroupKFold(plan.folds, shuffle=True, random_state=seed)
            splits = cv.split(x, y, plan.groups)
        classifier = _probe_classifier()
        scores = []
        for train, test in splits:
            pipe = make_pipeline(
                StandardScaler(),
                classifier(
                    C=self.C, max_iter=self.max_iter, tol=self.tol, solver=self.solver, seed=seed
                ),
            )
            pipe.fit(x[train], y[train])
            scores.append(_balanced_accuracy(y[test], pipe.predict(x[test])))
        return float(np.mean(scores))

    # --------------------------------------------------------------- prediction
    @property
    def embed_dim(self) -> int:
        """Feature width D the probe expects."""
        self._check_fitted()
        assert self.mean_ is not None
        return int(self.mean_.shape[0])

    def _check_fitted(self) -> None:
        if self.coef_ is None:
            raise GpfmError("the probe is not trained: call fit() or LinearProbe.load() first")

    def predict_proba(self, features: np.ndarray, *, batch_size: int = 32768) -> np.ndarray:
        """Class probabilities.

        Parameters
        ----------
        features
            (N, D) float array of the same encoder.

        Returns
        -------
        numpy.ndarray
            (N, C) float32, C = len(class_names); classes absent from training get 0.
        """
        self._check_fitted()
        assert self.coef_ is not None and self.intercept_ is not None
        assert self.mean_ is not None and self.scale_ is not None and self.classes_ is not None
        x = as_features(features, finite=False)  # checked on the logits below, no (N, D) mask
        if x.shape[1] != self.embed_dim:
            raise GpfmError(
                f"features are {x.shape[1]}-d but the probe expects {self.embed_dim}-d: "
                f"embed with the probe's encoder ({self.encoder or 'unknown'})"
            )
        # fold the standardisation into the weights: one float32 matmul per batch
        w64 = self.coef_.astype(np.float64) / self.scale_.astype(np.float64)[None, :]
        b = (self.intercept_.astype(np.float64) - w64 @ self.mean_.astype(np.float64)).astype(
            np.float32
        )
        w = np.ascontiguousarray(w64, dtype=np.float32)
        out = np.zeros((x.shape[0], len(self.class_names)), dtype=np.float32)
        full = self.classes_.size == out.shape[1] and bool(
            np.array_equal(self.classes_, np.arange(out.shape[1]))
        )
        for start in range(0, x.shape[0], batch_size):
            z = _linear(x[start : start + batch_size], w, b)
            if not np.isfinite(z).all():
                raise GpfmError(
                    "features contain NaN or inf: re-embed the slide or drop those tiles"
                )
            _softmax(z)
            if full:
                out[start : start + batch_size] = z
            else:
                out[start : start + batch_size, self.classes_] = z
        return out

    def predict(
        self, features: np.ndarray, *, batch_size: int = 32768
    ) -> tuple[np.ndarray, np.ndarray]:
        """Most likely class and its probability.

        Returns
        -------
        tuple of numpy.ndarray
            labels (N,) int64 into ``class_names`` and confidence (N,) float32.
        """
        proba = self.predict_proba(features, batch_size=batch_size)
        labels = proba.argmax(axis=1)
        return labels.astype(np.int64), proba[np.arange(proba.shape[0]), labels]

    # ---------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the probe to one ``.safetensors`` file atomically.

        Returns
        -------
        pathlib.Path
            The written path.
        """
        self._check_fitted()
        from safetensors.numpy import save

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "class_names": self.class_names,
            "class_colours": [list(map(int, c)) for c in self.class_colours]
            if self.class_colours
            else None,
            "encoder": self.encoder,
            "weights_hash": self.weights_hash,
            "tiling": _plain_tiling(self.tiling),
            "embed_dim": self.embed_dim,
            "created": self.created_,
            "C": self.C,
            "report": None if self.report_ is None else self.report_.__dict__,
        }
        # safetensors writes the raw buffer: it must be C-contiguous (sklearn's coef_ is not)
        tensors = {
            k: np.ascontiguousarray(v)
            for k, v in {
                "coef": self.coef_,
                "intercept": self.intercept_,
                "scaler_mean": self.mean_,
                "scaler_scale": self.scale_,
                "classes": self.classes_,
            }.items()
        }
        blob = save(tensors, metadata={_META_KEY: json.dumps(meta)})
        return write_atomic(path, blob)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, embed_dim: int | None = None) -> LinearProbe:
        """Read a probe written by :meth:`save`, checking every shape.

        Parameters
        ----------
        path
            The ``.safetensors`` file.
        embed_dim
            When given, the probe must expect this feature width.
        """
        from gpfm_core._modelfile import read_model_file

        p = Path(path)
        t, meta = read_model_file(
            p,
            _META_KEY,
            fmt=FORMAT,
            version=FORMAT_VERSION,
            what="probe file",
            missing_fix="choose a saved .safetensors probe",
        )
        bad = f"{p} is a damaged or foreign probe file: save the probe again"
        try:
            coef, intercept = t["coef"], t["intercept"]
            mean, scale, classes = t["scaler_mean"], t["scaler_scale"], t["classes"]
            names = [str(n) for n in meta["class_names"]]
            d = int(meta["embed_dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise GpfmError(bad) from exc
        k = coef.shape[0] if coef.ndim == 2 else -1
        ok = (
            coef.ndim == 2
            and coef.shape[1] == d
            and intercept.shape == (k,)
            and mean.shape == (d,)
            and scale.shape == (d,)
            and classes.shape == (k,)
            and np.issubdtype(classes.dtype, np.integer)
            and k >= 2
            and (classes >= 0).all()
            and (classes < len(names)).all()
            and all(np.isfinite(a).all() for a in (coef, intercept, mean, scale))
            and (scale > 0).all()
        )
        if not ok:
            raise GpfmError(bad)
        if embed_dim is not None and int(embed_dim) != d:
            raise GpfmError(
                f"probe expects {d}-d features but the slide has {embed_dim}-d: "
                f"use a probe trained with the same encoder ({meta.get('encoder')})"
            )
        colours = meta.get("class_colours")
        if "weights_hash" not in meta or "tiling" not in meta:
            warnings.warn(
                f"{p.name} does not record the encoder weights and tiling it was trained on "
                f"(an older file): only the encoder name ({meta.get('encoder') or 'unknown'}) "
                "and the feature width are checked; save it again to record them",
                ProbeProvenanceWarning,
                stacklevel=3,
            )
        tiling = meta.get("tiling")
        probe = cls(
            C=float(meta.get("C", 1.0)),
            encoder=meta.get("encoder"),
            weights_hash=meta.get("weights_hash") or None,
            tiling=_plain_tiling(tiling) if isinstance(tiling, dict) else None,
            class_colours=[tuple(int(v) for v in c) for c in colours] if colours else None,
        )
        probe.class_names = names
        probe.coef_ = coef.astype(np.float32)
        probe.intercept_ = intercept.astype(np.float32)
        probe.mean_ = mean.astype(np.float32)
        probe.scale_ = scale.astype(np.float32)
        probe.classes_ = classes.astype(np.int64)
        probe.created_ = str(meta.get("created", ""))
        rep = meta.get("report")
        if isinstance(rep, dict):
            try:
                probe.report_ = ProbeReport(**rep)
            except TypeError:
                probe.report_ = None
        return probe


def _plain_tiling(tiling: dict | None) -> dict[str, float | int] | None:
    """The tiling's ``requested_mpp`` (float), ``tile_px`` and ``overlap_px`` (int), JSON-ready."""
    if not tiling:
        return None
    kinds = {"requested_mpp": float, "tile_px": int, "overlap_px": int}
    return {k: kinds[k](tiling[k]) for k in kinds if tiling.get(k) is not None}
