"""Task specs: a YAML file naming tasks, each with a CSV of items, labels and splits.

A spec file::

    name: my-benchmark
    seed: 0                   # seeds every split, probe, bootstrap and ABMIL run
    bootstrap: 1000           # resamples of the 95 % intervals
    tasks:
      - name: crc100k
        type: tile            # labelled images (or labelled tiles of embedded slides)
        folders: {train: NCT-CRC-HE-100K, test: CRC-VAL-HE-7K}   # one sub-folder per class
      - name: camelyon16
        type: slide           # slide classification with ABMIL
        items: camelyon16.csv # slide_id,label[,split|fold][,case_id]
        features: features/{encoder}
        splits: {folds: 5}
      - name: tcga-brca-os
        type: survival        # ABMIL with the discrete-time survival loss
        items: tcga_brca.csv  # slide_id,survival_months,censorship[,case_id]
        features: features/{encoder}

Relative paths are relative to the YAML file (or to ``root:`` when given). Item CSVs:

* ``tile`` — ``path,label[,split]`` (image files), or ``slide_id,x,y,label[,split]`` with
  ``features:`` (the tiles of embedded slides, matched on their level-0 ``x, y``); or
  ``folders:`` mapping split names to folders with one sub-folder per class.
* ``slide`` — ``slide_id,label``; ``survival`` — ``slide_id,survival_months,censorship``
  (1 = censored). Both take ``split`` (train / val / test; without val, ``splits.val`` of
  train, stratified, validates) or ``fold`` (integer) columns; without either,
  ``splits: {folds: k}`` makes stratified folds (grouped by ``case_id`` when the CSV has
  one). Fold i tests on fold i, validates on fold i+1 and trains on the rest.
  ``bag: case`` makes one bag of all the slides of a ``case_id`` (patient-level, as
  PORPOISE does for TCGA survival).

Splits values: ``train``, ``val`` (``valid``, ``validation``), ``test``. A tile task without a
validation split gets one carved from its train split (stratified, ``splits.val``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpfm_core.errors import ConfigError

__all__ = [
    "EvalSpec",
    "Fold",
    "TaskSpec",
    "load_spec",
    "read_items",
    "slide_folds",
    "tile_splits",
]

KINDS = ("tile", "slide", "survival")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_TASK_KEYS = {
    "name",
    "type",
    "items",
    "folders",
    "features",
    "label_col",
    "classes",
    "splits",
    "protocols",
    "linear",
    "knn",
    "fewshot",
    "abmil",
    "primary",
    "missing",
    "bag",
}
_SPEC_KEYS = {"name", "root", "seed", "bootstrap", "tasks", "data", "description"}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a spec file (see the module docstring for the keys)."""

    name: str
    kind: str
    items: Path | None = None
    folders: dict[str, Path] | None = None
    features: str | None = None
    label_col: str = "label"
    classes: list[str] | None = None
    splits: dict[str, Any] = field(default_factory=dict)
    protocols: list[str] = field(default_factory=lambda: ["linear", "knn", "fewshot", "retrieval"])
    linear: dict[str, Any] = field(default_factory=dict)
    knn: dict[str, Any] = field(default_factory=dict)
    fewshot: dict[str, Any] = field(default_factory=dict)
    abmil: dict[str, Any] = field(default_factory=dict)
    primary: tuple[str, str] | None = None
    missing: str = "error"
    bag: str = "slide"

    @property
    def primary_metric(self) -> tuple[str, str]:
        """(protocol, metric) that ranks the encoders on this task."""
        if self.primary is not None:
            return self.primary
        if self.kind == "tile":
            return ("linear", "balanced_accuracy")
        if self.kind == "slide":
            return ("abmil", "auroc_macro")
        return ("abmil", "c_index")

    def features_dir(self, encoder: str) -> Path:
        """The folder of this encoder's per-slide feature files."""
        if self.features is None:
            raise ConfigError(
                f"task {self.name!r} needs 'features:' (a folder of <slide>.h5 files)"
            )
        return Path(self.features.replace("{encoder}", encoder_folder_name(encoder)))


@dataclass(frozen=True)
class EvalSpec:
    """A whole spec file."""

    name: str
    root: Path
    tasks: list[TaskSpec]
    seed: int = 0
    bootstrap: int = 1000
    data: str | None = None
    path: Path | None = None


def encoder_folder_name(encoder: str) -> str:
    """The ``{encoder}`` of a features template: the name, or a checkpoint file's stem."""
    return (
        Path(encoder).stem
        if os.sep in encoder or encoder.endswith((".pth", ".pt", ".safetensors", ".bin"))
        else encoder
    )


def _resolve(root: Path, value: Any, what: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{what} must be a path, got {value!r}")
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else root / p


def _task(raw: Any, root: Path, index: int) -> TaskSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"tasks[{index}] must be a mapping with name, type and items")
    unknown = set(raw) - _TASK_KEYS
    name = str(raw.get("name") or f"task{index}")
    if unknown:
        raise ConfigError(
            f"task {name!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TASK_KEYS)}"
        )
    kind = str(raw.get("type", ""))
    if kind not in KINDS:
        raise ConfigError(f"task {name!r}: type must be one of {list(KINDS)}, got {kind!r}")
    items = _resolve(root, raw["items"], f"task {name!r} items") if raw.get("items") else None
    folders = None
    if raw.get("folders") is not None:
        if not isinstance(raw["folders"], Mapping) or kind != "tile":
            raise ConfigError(
                f"task {name!r}: folders must map split names to folders (tile tasks)"
            )
        folders = {
            _split_name(k, name): _resolve(root, v, f"task {name!r} folder")
            for k, v in raw["folders"].items()
        }
    if (items is None) == (folders is None):
        raise ConfigError(f"task {name!r}: give exactly one of items (a CSV) or folders")
    features = raw.get("features")
    if features is not None:
        features = str(_resolve(root, str(features), f"task {name!r} features"))
    if kind != "tile" and features is None:
        raise ConfigError(
            f"task {name!r}: slide tasks need features: a folder of <slide>.h5 files, e.g. features/{{encoder}}"
        )
    protocols = raw.get("protocols")
    if kind != "tile":
        protocols = ["abmil"]
    elif protocols is None:
        protocols = ["linear", "knn", "fewshot", "retrieval"]
    elif not isinstance(protocols, list):
        raise ConfigError(f"task {name!r}: protocols must be a list")
    primary = raw.get("primary")
    if primary is not None:
        if not isinstance(primary, Mapping) or set(primary) != {"protocol", "metric"}:
            raise ConfigError(f"task {name!r}: primary must be {{protocol: ..., metric: ...}}")
        primary = (str(primary["protocol"]), str(primary["metric"]))
    missing = str(raw.get("missing", "error"))
    if missing not in ("error", "skip"):
        raise ConfigError(f"task {name!r}: missing must be 'error' or 'skip'")
    bag = str(raw.get("bag", "slide"))
    if bag not in ("slide", "case"):
        raise ConfigError(f"task {name!r}: bag must be 'slide' or 'case' (one bag per patient)")
    for key in ("splits", "linear", "knn", "fewshot", "abmil"):
        if raw.get(key) is not None and not isinstance(raw[key], Mapping):
            raise ConfigError(f"task {name!r}: {key} must be a mapping")
    classes = raw.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) < 2):
        raise ConfigError(f"task {name!r}: classes must list at least two class names")
    return TaskSpec(
        name=name,
        kind=kind,
        items=items,
        folders=folders,
        features=features,
        label_col=str(raw.get("label_col", "label")),
        classes=[str(c) for c in classes] if classes else None,
        splits=dict(raw.get("splits") or {}),
        protocols=[str(p) for p in protocols],
        linear=dict(raw.get("linear") or {}),
        knn=dict(raw.get("knn") or {}),
        fewshot=dict(raw.get("fewshot") or {}),
        abmil=dict(raw.get("abmil") or {}),
        primary=primary,
        missing=missing,
        bag=bag,
    )


def load_spec(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> EvalSpec:
    """Read and check a spec file.

    Parameters
    ----------
    path
        The YAML file.
    root
        Folder that relative paths start from (default: the spec's ``root:``, else the
        YAML file's folder).

    Raises
    ------
    ConfigError
        Unreadable YAML, unknown keys, a missing name / type / items, duplicate task names.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task spec {p} not found: pass a YAML file (or 'demo')")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise ConfigError(f"{p}: expected a mapping with a non-empty 'tasks:' list")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    base = (
        Path(root)
        if root is not None
        else _resolve(p.parent.resolve(), raw.get("root", "."), "root")
    )
    tasks = [_task(t, base, i) for i, t in enumerate(raw["tasks"])]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ConfigError(f"{p}: task names must be unique, got {names}")
    if raw.get("data") not in (None, "demo"):
        raise ConfigError(f"{p}: data may only be 'demo' (the generated demo tasks)")
    try:
        seed, boot = int(raw.get("seed", 0)), int(raw.get("bootstrap", 1000))
    except (TypeError, ValueError):
        raise ConfigError(f"{p}: seed and bootstrap must be integers") from None
    return EvalSpec(
        name=str(raw.get("name") or p.stem),
        root=base,
        tasks=tasks,
        seed=seed,
        bootstrap=boot,
        data=str(raw["data"]) if raw.get("data") else None,
        path=p,
    )


# ------------------------------------------------------------------------------- items
def _split_name(value: Any, task: str) -> str:
    key = str(value).strip().lower()
    if key not in _SPLIT_NAMES:
        raise ConfigError(f"task {task!r}: split {value!r} is not one of train, val, test")
    return _SPLIT_NAMES[key]


def read_items(task: TaskSpec) -> list[dict[str, str]]:
    """The task's items as rows of strings (CSV rows, or one row per image of ``folders``).

    Image rows have an absolute ``path``; ``folders`` rows also get ``split``.

    Raises
    ------
    ConfigError
        Missing file or folder, missing columns, empty CSV.
    """
    if task.folders is not None:
        rows = []
        for split, folder in task.folders.items():
            if not folder.is_dir():
                raise ConfigError(f"task {task.name!r}: folder {folder} not found")
            for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
                for f in sorted(class_dir.iterdir()):
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        rows.append(
                            {"path": str(f), task.label_col: class_dir.name, "split": split}
                        )
        if not rows:
            raise ConfigError(
                f"task {task.name!r}: no images in the class sub-folders of {list(task.folders.values())}"
            )
        return rows
    assert task.items is not None
    if not task.items.is_file():
        raise ConfigError(f"task {task.name!r}: items file {task.items} not found")
    with open(task.items, newline="", encoding="utf-8-sig") as fh:
        rows = [
            {k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(fh)
        ]
    if not rows:
        raise ConfigError(f"task {task.name!r}: {task.items} has no rows")
    cols = set(rows[0])
    if "slide" in cols and "slide_id" not in cols:
        for r in rows:
            r["slide_id"] = r["slide"]
        cols.add("slide_id")
    need = {
        "tile": {task.label_col} | ({"slide_id", "x", "y"} if "path" not in cols else {"path"}),
        "slide": {"slide_id", task.label_col},
        "survival": {"slide_id", "survival_months", "censorship"},
    }[task.kind]
    lacking = need - cols
    if lacking:
        raise ConfigError(
            f"task {task.name!r}: {task.items.name} lacks column(s) {sorted(lacking)}"
        )
    if "path" in cols:
        base = task.items.parent
        for r in rows:
            p = Path(r["path"])
            r["path"] = str(p if p.is_absolute() else base / p)
    if "split" in cols:
        for r in rows:
            r["split"] = _split_name(r["split"], task.name)
    return rows


def class_index(task: TaskSpec, rows: Sequence[Mapping[str, str]]) -> tuple[list[str], np.ndarray]:
    """Class names (the spec's ``classes`` or the sorted labels) and each row's index."""
    labels = [r[task.label_col] for r in rows]
    names = task.classes or sorted(set(labels))
    lookup = {n: i for i, n in enumerate(names)}
    bad = sorted(set(labels) - set(lookup))
    if bad:
        raise ConfigError(f"task {task.name!r}: label(s) {bad[:5]} are not in classes {names}")
    if len(names) < 2:
        raise ConfigError(f"task {task.name!r}: needs at least two classes, found {names}")
    return names, np.array([lookup[v] for v in labels], dtype=np.int64)


def _stratified_pick(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ~``fraction`` of the items of each class (at least one when >= 2)."""
    mask = np.zeros(y.size, bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = round(fraction * idx.size)
        if idx.size >= 2:
            k = min(max(k, 1), idx.size - 1)
        mask[rng.choice(idx, size=k, replace=False)] = True
    return mask


def tile_splits(
    task: TaskSpec, rows: Sequence[Mapping[str, str]], y: np.ndarray, *, seed: int
) -> np.ndarray:
    """Split of each tile item: ``"train"``, ``"val"`` or ``"test"`` -> (N,) str array.

    The CSV's ``split`` column when present (a missing ``val`` is carved from ``train``),
    else stratified random fractions ``splits: {test: 0.2, val: 0.1}``.
    """
    rng = np.random.default_rng(seed)
    val_frac = float(task.splits.get("val", 0.1))
    if rows and "split" in rows[0]:
        split = np.array([r["split"] for r in rows], dtype=object)
    else:
        split = np.full(y.size, "train", dtype=object)
        split[_stratified_pick(y, float(task.splits.get("test", 0.2)), rng)] = "test"
    if "test" not in set(split):
        raise ConfigError(f"task {task.name!r}: no test items; add a split column or splits.test")
    if "val" not in set(split):
        train = np.flatnonzero(split == "train")
        pick = _stratified_pick(y[train], val_frac, rng)
        split[train[pick]] = "val"
    return split.astype(str)


@dataclass(frozen=True)
class Fold:
    """Slide indices of one train / validation / test split."""

    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def slide_folds(
    task: TaskSpec, rows: Sequence[Mapping[str, str]], strata: np.ndarray, *, seed: int
) -> list[Fold]:
    """The task's folds: the CSV's ``split`` or ``fold`` column, else stratified k-fold.

    Parameters
    ----------
    task
        Its ``splits: {folds: k}`` (default 5) applies when the CSV has no split column.
    rows
        CSV rows (``case_id`` groups the slides of one patient into one fold).
    strata
        (N,) int stratification label (class; survival: censorship).
    seed
        Shuffles the folds.
    """
    n = len(rows)
    cols = set(rows[0]) if rows else set()
    if "split" in cols:
        split = np.array([r["split"] for r in rows], dtype=object)
        if "val" not in set(split):  # e.g. CAMELYON16's official train / test
            train = np.flatnonzero(split == "train")
            pick = _stratified_pick(
                strata[train], float(task.splits.get("val", 0.1)), np.random.default_rng(seed)
            )
            split[train[pick]] = "val"
        f = Fold(0, *(np.flatnonzero(split == s) for s in ("train", "val", "test")))
        if min(f.train.size, f.val.size, f.test.size) == 0:
            raise ConfigError(
                f"task {task.name!r}: the split column needs train and test slides (val optional)"
            )
        return [f]
    if "fold" in cols:
        try:
            fold_of = np.array([int(r["fold"]) for r in rows])
        except ValueError:
            raise ConfigError(f"task {task.name!r}: the fold column must hold integers") from None
    else:
        k = int(task.splits.get("folds", 5))
        if k < 3:
            raise ConfigError(
                f"task {task.name!r}: splits.folds must be >= 3 (test, val and train folds)"
            )
        fold_of = _assign_folds(rows, strata, k, seed, task.name)
    ids = np.unique(fold_of)
    if ids.size < 3:
        raise ConfigError(f"task {task.name!r}: needs at least 3 folds, found {ids.size}")
    folds = []
    for i, f in enumerate(ids):
        g = ids[(i + 1) % ids.size]
        folds.append(
            Fold(
                i,
                np.flatnonzero((fold_of != f) & (fold_of != g)),
                np.flatnonzero(fold_of == g),
                np.flatnonzero(fold_of == f),
            )
        )
    if n and any(min(f.train.size, f.val.size, f.test.size) == 0 for f in folds):
        raise ConfigError(f"task {task.name!r}: too few slides for {ids.size} folds")
    return folds


def _assign_folds(
    rows: Sequence[Mapping[str, str]], strata: np.ndarray, k: int, seed: int, name: str
) -> np.ndarray:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n = len(rows)
    if n < k:
        raise ConfigError(f"task {name!r}: {n} slides cannot make {k} folds")
    fold_of = np.empty(n, np.int64)
    if "case_id" in rows[0]:
        groups = np.array([r["case_id"] for r in rows])
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(n), strata, groups)
    else:
        counts = np.bincount(strata)
        if counts[counts > 0].min() < k:
            raise ConfigError(
                f"task {name!r}: a class has fewer than {k} slides; lower splits.folds"
            )
        parts = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(n), strata
        )
    for i, (_, test) in enumerate(parts):
        fold_of[test] = i
    return fold_of
