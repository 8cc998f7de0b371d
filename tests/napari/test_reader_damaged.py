"""Truncated and corrupt slides in napari: one notification line, never a traceback.

The case table of ``tests/_damaged_slides.py``: files whose damage shows at open give None
from the reader and ONE error notification naming the file (no traceback logged: the slide
layer raises SlideError, not the decoder's exception); files whose damage shows only when
the damaged tile is read open as a layer, the damaged part is white, and ONE warning says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from _damaged_slides import DAMAGED, TILE, make_damaged
from napari_gpfm._reader import napari_get_reader

OPEN_CASES = [k for k, stage in DAMAGED.items() if stage == "open"]
READ_CASES = [k for k, stage in DAMAGED.items() if stage == "read" and k != "dicom-label-cut"]


@pytest.fixture(scope="module")
def damaged(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> dict[str, tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("damaged")
    return {k: make_damaged(k, root / k, data_dir) for k in OPEN_CASES + READ_CASES}


@pytest.mark.parametrize("kind", OPEN_CASES)
def test_damaged_at_open_gives_none_and_one_line(
    damaged: dict[str, tuple[Path, Path, str]],
    notes: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    path, _, name = damaged[kind]
    with caplog.at_level(logging.DEBUG, logger="napari_gpfm"):
        assert napari_get_reader(str(path)) is None
    (msg,) = notes()
    assert msg.startswith(f"napari-gpfm cannot open {path.name}: {name} "), msg
    assert "truncated" in msg and "corrupt" in msg and "\n" not in msg
    assert "Traceback" not in msg
    # the reader took the SlideError branch: nothing logged with a traceback
    assert not [r for r in caplog.records if r.exc_info], caplog.text


@pytest.mark.parametrize("kind", READ_CASES)
def test_damaged_tile_is_white_with_one_warning(
    make_napari_viewer,
    damaged: dict[str, tuple[Path, Path, str]],
    notes: Callable[[], list[str]],
    kind: str,
) -> None:
    path, _, name = damaged[kind]
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="napari-gpfm")
    # napari may draw (and so read) the damaged part as the layer is added
    corner = np.asarray(layer.data[0][:TILE, :TILE])
    assert corner.shape == (TILE, TILE, 3) and (corner == 255).all()
    np.asarray(layer.data[0][TILE : 2 * TILE, :TILE])  # a second failing read: no new line
    (msg,) = notes()
    assert msg.startswith(f"part of {Path(layer.metadata['path']).name} cannot be read"), msg
    assert f"{name} looks truncated or corrupt: reading level 0" in msg and "\n" not in msg
    viewer.layers.clear()
    viewer.add_image(np.zeros((4, 4), np.uint8))  # the viewer is alive and usable
    assert len(viewer.layers) == 1
