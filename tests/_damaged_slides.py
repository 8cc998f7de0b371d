"""Damaged slide files built in code: truncated at chosen points of their structure, or zeroed.

Every case starts from a small intact file (a 3-level JPEG-tiled pyramid of the real H&E
sample, generic TIFF or Aperio SVS; a strip TIFF, PNG or JPEG; the real CMU sample; a DICOM
series) and damages it where its own layout says: inside the first directory, inside the
first tile, halfway through level 0, through a coarse level, the last byte, or one tile's
bytes zeroed. :data:`DAMAGED` says, per case, whether the damage shows when the file is opened
(``"open"``) or only when the damaged pixels are read (``"read"``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

#: case -> where :func:`~gpfm_core.slide.open_slide` users meet the damage.
DAMAGED: dict[str, str] = {
    "tif-in-header": "open",
    "tif-in-first-tile": "open",  # the new user's truncated.tif (cut at a third)
    "tif-level0-half": "open",
    "tif-in-coarse-level": "open",
    "tif-in-coarsest-level": "open",
    "tif-last-byte": "open",
    "tif-zeroed-tile": "read",
    "svs-in-header": "open",
    "svs-in-first-tile": "open",
    "svs-in-coarse-level": "open",
    "svs-zeroed-tile": "read",
    "cmu-cut": "open",
    "strip-zeroed": "open",  # a plain TIFF is decoded at open
    "strip-cut": "open",
    "png-cut": "open",
    "jpeg-cut": "open",
    "dicom-level0-cut": "read",
    "dicom-label-cut": "read",
}

#: Level-0 size of the pyramids (3 x 4 tiles of 256 px) and their tile.
SIZE = (1000, 768)
TILE = 256


def source_rgb(data_dir: Path) -> np.ndarray:
    """``(768, 1000, 3)`` uint8: the top-left of the real H&E sample."""
    from PIL import Image

    with Image.open(data_dir / "he_patch_1000.png") as img:
        return np.asarray(img.convert("RGB"))[: SIZE[1], : SIZE[0]].copy()


def write_intact(kind: str, folder: Path, data_dir: Path) -> Path:
    """The intact file a case damages (a DICOM case: the series' folder)."""
    import tifffile
    from PIL import Image

    from _dicom_wsi import write_dicom_wsi
    from gpfm_core.synth import write_pyramid_tiff

    rgb = source_rgb(data_dir)
    fmt = kind.split("-")[0]
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("tif", "svs"):
        style = "generic" if fmt == "tif" else "aperio"
        return write_pyramid_tiff(
            folder / f"slide.{fmt}", rgb, mpp=0.5, factors=(1, 2, 4), tile=TILE, style=style
        )
    if fmt == "cmu":
        return Path(shutil.copy(data_dir / "cmu_small_region.svs", folder / "cmu.svs"))
    if fmt == "strip":
        path = folder / "plain.tif"
        tifffile.imwrite(path, rgb, photometric="rgb", compression="jpeg", rowsperstrip=64)
        return path
    if fmt in ("png", "jpeg"):
        path = folder / f"plain.{'png' if fmt == 'png' else 'jpg'}"
        Image.fromarray(rgb).save(path)
        return path
    if fmt == "dicom":
        write_dicom_wsi(folder / "S01", rgb[:512, :768], mpp=0.5)
        return folder / "S01"
    raise ValueError(kind)


def _pages(path: Path) -> list[tuple[int, int, int, int, int]]:
    """``(ifd offset, data start, data end, first tile offset, its bytes)`` of every page."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        out = []
        for page in tf.pages:
            offs, counts = page.dataoffsets, page.databytecounts
            ends = [o + c for o, c in zip(offs, counts, strict=True)]
            out.append((page.offset, min(offs), max(ends), offs[0], counts[0]))
        return out


def make_damaged(kind: str, folder: Path, data_dir: Path) -> tuple[Path, Path, str]:
    """Build case ``kind`` in ``folder``.

    Returns
    -------
    (Path, Path, str)
        The damaged file (what a user opens; a DICOM case: the series' folder), the intact
        original, and how errors name the slide.
    """
    intact = write_intact(kind, folder / "intact", data_dir)
    out = folder / "damaged"
    if kind.startswith("dicom"):
        shutil.copytree(intact, out)
        member = out / ("level0.dcm" if kind == "dicom-level0-cut" else "label.dcm")
        raw = member.read_bytes()
        member.write_bytes(raw[: len(raw) // 2])  # inside the pixel data
        return out, intact, f"DICOM series {out.name}"
    out.mkdir()
    path = out / intact.name
    raw = intact.read_bytes()
    cut = _cut_point(kind, intact, raw)
    if cut is not None:
        path.write_bytes(raw[:cut])
    else:  # zero the bytes of level 0's first tile (or strip)
        *_, start, count = _pages(intact)[0]
        path.write_bytes(raw[:start] + bytes(count) + raw[start + count :])
    return path, intact, path.name


def _cut_point(kind: str, intact: Path, raw: bytes) -> int | None:
    """Bytes kept by a truncation case; None for a zeroed case."""
    place = kind.split("-", 1)[1]
    if place.startswith("zeroed"):
        return None
    if place == "cut":
        return len(raw) // 2
    if place == "last-byte":
        return len(raw) - 1
    pages = _pages(intact)
    ifd0, start0, end0, first0, count0 = pages[0]
    if place == "in-header":
        return ifd0 + 40  # inside the first directory's tag list
    if place == "in-first-tile":
        return first0 + count0 // 2
    if place == "level0-half":
        return (start0 + end0) // 2
    if place == "in-coarse-level":
        return (pages[1][1] + pages[1][2]) // 2
    if place == "in-coarsest-level":
        return (pages[-1][1] + pages[-1][2]) // 2
    raise ValueError(kind)
