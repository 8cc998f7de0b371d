"""Demo data that proves the evaluation machinery: built from the two sample images.

Three tasks, generated in seconds and never downloaded (``make_demo_data``):

* **tissue-tiles** (tile task) — 224 px crops at 0.5 µm/px labelled by region:
  ``carcinoma`` (``he_patch_1000.png``), and from the CMU skin sample, by the tissue
  detector's fraction under the crop: ``skin`` (>= 0.9), ``skin-edge`` (0.3-0.7) and
  ``glass`` (<= 0.02). Crops are taken inside 448 px blocks and every block goes to one split,
  so no two splits share a pixel.
* **carcinoma-share** (slide task) — ``n_slides`` generated slides (8 x 8 tiles of skin
  tissue by default) that all contain a carcinoma focus; what differs is its size. Class
  ``high`` when carcinoma tiles make more than ``THRESHOLD`` (20 %) of the slide, ``low``
  otherwise (shares drawn from 3-15 % and 25-50 %). Telling the classes apart needs counting
  carcinoma tiles, not spotting one.
* **carcinoma-share-survival** (survival task) — the same slides; the time to event falls with
  the share: ``T = 60 * exp(-4 * share + 0.25 * noise)`` months, censored at a uniform
  time in 10-120 months (``censorship = 1`` when censoring came first): 8 of the 40 default
  slides (20 %); the written ``demo.yaml`` states the count of the data it goes with.

Slides are real files: Aperio-style TIFFs (JPEG, 224 px tiles, MPP 0.5) that OpenSlide and
napari open. Their features are computed once per encoder by embedding a *pool* slide made of
every distinct tile (with :func:`gpfm_core.embed.embed_slide`, no tissue detection) and
copied into one ``<slide>.h5`` per slide in the TRIDENT/CLAM layout. Each slide tile is the
same JPEG tile as in the pool, so these equal the features of embedding the slide itself
(a test checks it).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from gpfm_core._atomic import atomic_path, write_atomic
from gpfm_core.errors import GpfmError

__all__ = [
    "CLASSES",
    "THRESHOLD",
    "DemoData",
    "demo_spec_path",
    "make_demo_data",
]

log = logging.getLogger(__name__)

#: µm/px of every demo tile and slide.
MPP = 0.5
#: Tile side in px.
TILE = 224
#: Carcinoma share above which a slide is ``high``.
THRESHOLD = 0.2
#: The packaged spec's words for the censored share; a written spec states the count.
_CENSORED_NOTE = "some slides censored"
#: Slide classes, in class-index order.
CLASSES = ("low", "high")
_BLOCK = 2 * TILE  # tile-task crops stay inside one block; blocks go to one split
_POOL_COLS = 16
_SHARE_LOW, _SHARE_HIGH = (0.03, 0.15), (0.25, 0.50)


@dataclass(frozen=True)
class DemoData:
    """Where :func:`make_demo_data` put everything.

    Attributes
    ----------
    root
        The data folder; ``demo.yaml`` in it is the task spec.
    spec
        ``<root>/demo.yaml``.
    slides
        The slide files, in ``slides.csv`` order.
    features
        Encoder -> folder of its ``<slide>.h5`` files.
    """

    root: Path
    spec: Path
    slides: list[Path]
    features: dict[str, Path] = field(default_factory=dict)

    @property
    def slides_csv(self) -> Path:
        """``slide_id,label,carcinoma_share,survival_months,censorship`` per slide."""
        return self.root / "slides" / "slides.csv"

    @property
    def tile_truth(self) -> Path:
        """``slide_id,x,y,tissue`` per slide tile (``carcinoma`` or ``skin``)."""
        return self.root / "slides" / "tile_truth.csv"

    @property
    def tile_items(self) -> Path:
        """``path,label,split,source,x,y`` per tile-task image."""
        return self.root / "tiles" / "items.csv"


def demo_spec_path() -> Path:
    """The packaged spec of the demo tasks (``gpfm eval demo``)."""
    return Path(str(resources.files("gpfm_core.evaluation") / "tasks" / "demo.yaml"))


def _sample_images(sources: Mapping[str, str | os.PathLike[str]] | None) -> tuple[Path, Path]:
    if sources is not None:
        try:
            return Path(sources["skin"]), Path(sources["carcinoma"])
        except KeyError:
            raise GpfmError("sources must name a 'skin' and a 'carcinoma' image") from None
    raw = os.environ.get("GPFM_DATA_DIR")
    skin = Path(raw or ".") / "cmu_small_region.svs"
    carc = Path(raw or ".") / "he_patch_1000.png"
    if not raw or not skin.is_file() or not carc.is_file():
        raise GpfmError(
            "the demo is built from cmu_small_region.svs and he_patch_1000.png: set GPFM_DATA_DIR "
            "to the sample-data folder"
        )
    return skin, carc


@dataclass(frozen=True)
class _Crop:
    source: str  # "skin" | "carcinoma"
    x: int
    y: int
    tissue: float
    pixels: np.ndarray  # (TILE, TILE, 3) uint8


def _crops(skin: Path, carc: Path) -> tuple[list[_Crop], list[_Crop]]:
    """Every 224 px crop at stride 112 of both images (skin: with its tissue fraction)."""
    from gpfm_core.slide import open_slide
    from gpfm_core.tiling import make_tile_grid, read_tiles

    with open_slide(skin, mpp=None if skin.suffix.lower() == ".svs" else MPP) as s:
        grid = make_tile_grid(s, mpp=MPP, tile_px=TILE, overlap_px=TILE // 2, min_tissue=0.0)
        pix = read_tiles(s, grid, np.arange(len(grid)))
        skin_crops = [
            _Crop("skin", int(x), int(y), float(f), p)
            for (x, y), f, p in zip(grid.coords, grid.tissue_fraction, pix, strict=True)
        ]
    with open_slide(carc, mpp=MPP) as s:
        w, h = s.dimensions
        carc_crops = [
            _Crop("carcinoma", x, y, 1.0, s.read_region((x, y), 0, (TILE, TILE)))
            for y in range(0, h - TILE + 1, TILE // 2)
            for x in range(0, w - TILE + 1, TILE // 2)
        ]
    if len(carc_crops) < 4 or len(skin_crops) < 16:
        raise GpfmError("the sample images are too small for the demo (need ~1000 px)")
    return skin_crops, carc_crops


def _has_ink(pixels: np.ndarray, *, max_fraction: float = 1e-3) -> bool:
    """Whether a crop shows tissue-marking dye (teal: green well above red), as CMU-1 does.

    Such crops are left out of the slides' skin pool: an attention model rightly finds
    them unusual, and the demo's slides should differ by their carcinoma only.
    """
    p = pixels.astype(np.int16)
    return float(np.mean(p[..., 1] > p[..., 0] + 40)) > max_fraction


def _tile_class(c: _Crop) -> str | None:
    if c.source == "carcinoma":
        return "carcinoma"
    if c.tissue >= 0.9:
        return "skin"
    if 0.3 <= c.tissue <= 0.7:
        return "skin-edge"
    if c.tissue <= 0.02:
        return "glass"
    return None


def _write_tile_task(root: Path, crops: Sequence[_Crop], rng: np.random.Generator) -> None:
    """PNG crops in ``tiles/<class>/``, spatially disjoint splits, ``tiles/items.csv``."""
    from PIL import Image

    inside = [c for c in crops if c.x % _BLOCK + TILE <= _BLOCK and c.y % _BLOCK + TILE <= _BLOCK]
    split_of: dict[tuple[str, int, int], str] = {}
    for source in ("skin", "carcinoma"):
        blocks = sorted({(c.x // _BLOCK, c.y // _BLOCK) for c in inside if c.source == source})
        # blocks with tissue edges are few: share them out separately so every split has some
        edgy = {(c.x // _BLOCK, c.y // _BLOCK) for c in inside if _tile_class(c) == "skin-edge"}
        for group in ([b for b in blocks if b in edgy], [b for b in blocks if b not in edgy]):
            n_test = n_val = max(1, round(0.2 * len(group))) if len(group) >= 3 else 0
            for rank, i in enumerate(rng.permutation(len(group))):
                split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
                split_of[(source, *group[i])] = split
    caps = {"train": 24, "val": 8, "test": 8}
    rows = []
    for cls in ("carcinoma", "skin", "skin-edge", "glass"):
        for split, cap in caps.items():
            members = [
                c for c in inside
                if _tile_class(c) == cls and split_of[(c.source, c.x // _BLOCK, c.y // _BLOCK)] == split
            ]  # fmt: skip
            if not members:
                raise GpfmError(
                    f"demo tile task: no {cls} crop in the {split} split; change the seed"
                )
            pick = sorted(rng.choice(len(members), size=min(cap, len(members)), replace=False))
            for i in pick:
                c = members[int(i)]
                rel = Path(cls) / f"{c.source}_{c.x}_{c.y}.png"
                with atomic_path(root / "tiles" / rel, parents=True) as tmp:
                    Image.fromarray(c.pixels).save(tmp, format="PNG")
                rows.append(
                    {
                        "path": rel.as_posix(),
                        "label": cls,
                        "split": split,
                        "source": c.source,
                        "x": c.x,
                        "y": c.y,
                    }
                )
    _write_csv(root / "tiles" / "items.csv", rows)


def _write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_atomic(path, buf.getvalue(), parents=True)


def _write_mosaic(path: Path, ids: np.ndarray, pool: np.ndarray, *, quality: int = 90) -> Path:
    """An Aperio-style one-level TIFF whose 224 px JPEG tiles are ``pool[ids]`` (rows x cols)."""
    import tifffile

    rows, cols = ids.shape
    h, w = rows * TILE, cols * TILE
    desc = (
        f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB "
        f"Q={quality}|AppMag = 20|MPP = {MPP}|Generator = gpfm_core.evaluation.demo"
    )
    with atomic_path(path, parents=True) as tmp, tifffile.TiffWriter(tmp) as tw:
        tw.write(
            (pool[int(i)] for i in ids.ravel()),
            shape=(h, w, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            photometric="rgb",
            compression="jpeg",
            compressionargs={"level": quality},
            description=desc,
            metadata=None,
            software=False,
        )
    return path


def _slide_plan(
    n_slides: int, grid: int, n_carc: int, n_skin: int, rng: np.random.Generator
) -> list[dict]:
    """Per slide: class, share, the pool id of every tile and which tiles are carcinoma."""
    labels = np.array([i % 2 for i in range(n_slides)])
    rng.shuffle(labels)
    cells = np.stack(np.mgrid[0:grid, 0:grid], axis=-1).reshape(-1, 2).astype(np.float64)
    plans = []
    for i, lab in enumerate(labels):
        lo, hi = _SHARE_HIGH if lab else _SHARE_LOW
        k = int(np.clip(round(rng.uniform(lo, hi) * grid * grid), 1, grid * grid - 1))
        centre = rng.uniform(0, grid - 1, size=2)
        # a compact focus: the k cells nearest a random centre (jittered so it is not a disc)
        dist = np.linalg.norm(cells - centre, axis=1) + rng.uniform(0, 1.5, size=cells.shape[0])
        carc = np.zeros(grid * grid, bool)
        carc[np.argsort(dist, kind="stable")[:k]] = True
        ids = np.where(
            carc,
            rng.integers(0, n_carc, grid * grid),
            n_carc + rng.integers(0, n_skin, grid * grid),
        )
        share = k / (grid * grid)
        plans.append(
            {
                "slide_id": f"demo_slide_{i:02d}",
                "label": CLASSES[int(share > THRESHOLD)],
                "share": share,
                "ids": ids.reshape(grid, grid),
                "carcinoma": carc.reshape(grid, grid),
            }
        )
    return plans


def _spec_text(n_censored: int, n_slides: int) -> str:
    """The packaged spec, its survival comment stating the data's censored share.

    The share follows from the seed and ``n_slides`` (20 % for the defaults), so it is
    counted, not written into the template.
    """
    text = demo_spec_path().read_text(encoding="utf-8")
    share = 100.0 * n_censored / n_slides
    return text.replace(
        _CENSORED_NOTE, f"{n_censored} of {n_slides} slides censored ({share:.0f} %)"
    )


def _survival(shares: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    event_time = 60.0 * np.exp(-4.0 * shares + 0.25 * rng.standard_normal(shares.size))
    censor_time = rng.uniform(10.0, 120.0, shares.size)
    observed = np.minimum(event_time, censor_time)
    return np.round(observed, 2), (censor_time < event_time).astype(np.int64)


def _pool_features(
    pool_slide: Path, encoder: str, out_dir: Path, n_pool: int, device: str, tile_px: int = TILE
) -> tuple[np.ndarray, dict, dict, dict, np.ndarray]:
    """Embed the pool slide -> features (n_pool, k * k, D) by pool id and sub-tile
    (``k = TILE // tile_px`` sub-tiles per side, row-major), root/coords/features attrs."""
    import h5py

    from gpfm_core.embed import embed_slide, load_embeddings

    path = embed_slide(
        pool_slide, encoder=encoder, out_dir=out_dir, mpp=MPP, tile_px=tile_px, tissue=False,
        min_tissue=0.0, device=device, workers=1,
    )  # fmt: skip
    emb = load_embeddings(path)
    k = TILE // tile_px
    x, y = emb.coords[:, 0], emb.coords[:, 1]
    pid = (y // TILE) * _POOL_COLS + x // TILE
    sub = ((y % TILE) // tile_px) * k + (x % TILE) // tile_px
    feats = np.empty((n_pool, k * k, emb.embed_dim), np.float32)
    tissue = np.ones((n_pool, k * k), np.float32)
    sel = pid < n_pool
    feats[pid[sel], sub[sel]] = emb.features[sel]
    if emb.tissue_fraction is not None:
        tissue[pid[sel], sub[sel]] = emb.tissue_fraction[sel]
    with h5py.File(path, "r") as f:
        root = dict(f.attrs)
        coords_attrs = dict(f["coords"].attrs)
        feat_attrs = dict(f["features"].attrs)
    return feats, root, coords_attrs, feat_attrs, tissue


def _write_slide_features(
    out: Path, plan: dict, slide: Path, pool_feats: np.ndarray, attrs: tuple[dict, dict, dict]
) -> None:
    from gpfm_core.embed import EmbeddingWriter
    from gpfm_core.slide import open_slide

    root, coords_attrs, feat_attrs = (dict(a) for a in attrs)
    k = round(pool_feats.shape[1] ** 0.5)
    step = TILE // k  # the features' tile side: each slide tile is k x k feature tiles
    ids = plan["ids"]
    rows, cols = ids.shape[0] * k, ids.shape[1] * k
    rc = np.stack(np.mgrid[0:rows, 0:cols], axis=-1).reshape(-1, 2).astype(np.int64)
    coords = rc[:, ::-1] * step
    with open_slide(slide) as s:
        slide_id = s.info.slide_id
    name = slide.stem
    root.update(
        slide_id=slide_id, slide_path=str(slide.resolve()), slide_name=name,
        level0_width=cols * step, level0_height=rows * step, grid_rows=rows, grid_cols=cols,
        n_tiles=rows * cols,
        demo_note="features of the identical JPEG tiles of the demo's pool slide",
    )  # fmt: skip
    coords_attrs.update(
        name=name, savetodir=str(out), level0_width=cols * step, level0_height=rows * step
    )
    feat_attrs.update(name=name, savetodir=str(out))
    r, c = rc[:, 0], rc[:, 1]
    feats = pool_feats[ids[r // k, c // k], (r % k) * k + c % k]
    with EmbeddingWriter(
        out / f"{name}.h5", coords=coords, grid_rc=rc, tissue_fraction=np.ones(rows * cols, np.float32),
        embed_dim=feats.shape[1], attrs=root, coords_attrs=coords_attrs, features_attrs=feat_attrs,
    ) as w:  # fmt: skip
        w.write(np.arange(rows * cols), feats)
        w.commit()


def _features_current(folder: Path, slides: Sequence[Path], encoder: str) -> bool:
    """Whether every slide has a features file made by ``encoder``'s current weights."""
    from gpfm_core.embed import read_attrs
    from gpfm_core.encoders import create_encoder

    files = [folder / f"{s.stem}.h5" for s in slides]
    if not all(f.is_file() for f in files):
        return False
    want = str(getattr(create_encoder(encoder, device="cpu"), "weights_hash", None) or "none")
    return all(str(read_attrs(f).get("weights_hash")) == want for f in files)


def make_demo_data(
    root: str | os.PathLike[str],
    *,
    encoders: Sequence[str] = ("hed-texture",),
    n_slides: int = 40,
    grid: int = 8,
    seed: int = 0,
    device: str = "cpu",
    sources: Mapping[str, str | os.PathLike[str]] | None = None,
    tile_px: int = TILE,
) -> DemoData:
    """Generate the demo tasks' data into ``root`` (files that exist are kept).

    Parameters
    ----------
    root
        Data folder (created). Its ``demo.yaml`` is the spec: ``gpfm eval <root>/demo.yaml``.
    encoders
        Encoders whose slide features are made (``features/<encoder>/<slide>.h5``); the
        tile task's images are embedded by ``gpfm eval`` itself.
    n_slides, grid
        Number of slides (even, >= 10) and tiles per side of each.
    seed
        Everything random; the same arguments give the same data.
    device
        Where the pool slide is embedded.
    sources
        ``{"skin": ..., "carcinoma": ...}`` images; default: the samples in ``GPFM_DATA_DIR``.
    tile_px
        Tile side of the slide features at 0.5 µm/px: 224 (the slides' own tiles), or a
        divisor of it (e.g. 112, the tiling of ``gpfm-student``, so a slide model trained on
        them applies to slides embedded with that encoder's default tiling). Each slide tile
        then has ``(224 / tile_px)^2`` feature tiles, embedded from the pool slide's
        identical pixels; ``tile_truth.csv`` lists the feature tiles.

    Returns
    -------
    DemoData
    """
    from gpfm_core.evaluation.spec import encoder_folder_name

    if n_slides < 10 or n_slides % 2:
        raise GpfmError(
            f"n_slides must be even and >= 10 (5 folds of both classes), got {n_slides}"
        )
    if grid < 4:
        raise GpfmError(f"grid must be >= 4 tiles per side, got {grid}")
    if tile_px < 16 or TILE % tile_px:
        raise GpfmError(
            f"tile_px must divide {TILE} and be >= 16 (224, 112, 56, 32), got {tile_px}"
        )
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    params = {
        "format": "gpfm-eval-demo",
        "version": 1,
        "seed": seed,
        "n_slides": n_slides,
        "grid": grid,
    }
    if tile_px != TILE:  # folders of the default tiling keep their stamp
        params["tile_px"] = tile_px
    stamp = out / "demo.json"
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != params:
            raise GpfmError(
                f"{out} holds demo data made with other parameters ({old}): choose a new folder"
            )
    elif any(out.iterdir()):
        raise GpfmError(f"{out} is not empty and holds no demo data: choose a new or empty folder")
    skin_img, carc_img = _sample_images(sources)
    skin, carc = _crops(skin_img, carc_img)
    rng = np.random.default_rng(seed)
    if not (out / "tiles" / "items.csv").is_file():
        _write_tile_task(out, skin + carc, np.random.default_rng([seed, 1]))
    # the pool: every carcinoma crop and as many dense skin crops as fill whole pool rows
    dense = [c for c in skin if c.tissue >= 0.9 and not _has_ink(c.pixels)]
    n_skin = min(len(dense), -len(carc) % _POOL_COLS + _POOL_COLS * 3)
    skin_pool = [dense[int(i)] for i in sorted(rng.choice(len(dense), n_skin, replace=False))]
    pool = np.stack([c.pixels for c in carc + skin_pool])
    n_pool = pool.shape[0]
    pool_rows = -(-n_pool // _POOL_COLS)
    pool_ids = np.full(pool_rows * _POOL_COLS, n_pool, np.int64)
    pool_ids[:n_pool] = np.arange(n_pool)
    padded = np.concatenate([pool, np.full((1, TILE, TILE, 3), 243, np.uint8)])
    pool_slide = out / "pool" / "pool.svs"
    if not pool_slide.is_file():
        _write_mosaic(pool_slide, pool_ids.reshape(pool_rows, _POOL_COLS), padded)
    plans = _slide_plan(n_slides, grid, len(carc), n_skin, rng)
    shares = np.array([p["share"] for p in plans])
    months, censorship = _survival(shares, rng)
    slides = []
    for p in plans:
        path = out / "slides" / f"{p['slide_id']}.svs"
        if not path.is_file():
            _write_mosaic(path, p["ids"], pool)
        slides.append(path)
    _write_csv(
        out / "slides" / "slides.csv",
        [
            {
                "slide_id": p["slide_id"],
                "label": p["label"],
                "carcinoma_share": f"{p['share']:.4f}",
                "survival_months": f"{m:.2f}",
                "censorship": int(c),
            }
            for p, m, c in zip(plans, months, censorship, strict=True)
        ],
    )
    truth = []
    k = TILE // tile_px
    for p in plans:  # one row per feature tile, in the features files' (row-major) order
        for (r, c), is_carc in np.ndenumerate(np.kron(p["carcinoma"], np.ones((k, k), bool))):
            truth.append(
                {
                    "slide_id": p["slide_id"],
                    "x": c * tile_px,
                    "y": r * tile_px,
                    "tissue": "carcinoma" if is_carc else "skin",
                }
            )
    _write_csv(out / "slides" / "tile_truth.csv", truth)
    features: dict[str, Path] = {}
    for enc in encoders:
        folder = out / "features" / encoder_folder_name(enc)
        features[enc] = folder
        if _features_current(folder, slides, enc):
            continue
        log.info("demo: embedding the %d pool tiles with %s", n_pool, enc)
        feats, *attrs, _tissue = _pool_features(
            pool_slide, enc, out / "pool" / encoder_folder_name(enc), n_pool, device, tile_px
        )
        for p, path in zip(plans, slides, strict=True):
            _write_slide_features(folder, p, path, feats, tuple(attrs))  # type: ignore[arg-type]
    spec = out / "demo.yaml"
    write_atomic(spec, _spec_text(int(censorship.sum()), len(plans)))
    write_atomic(stamp, json.dumps(params) + "\n")
    return DemoData(out, spec, slides, features)
