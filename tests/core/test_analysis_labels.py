"""Annotations (polygons, rectangles, points) -> per-tile labels."""

from __future__ import annotations

import numpy as np
import pytest

from gpfm_core.analysis import labels_for_shapes
from gpfm_core.errors import GpfmError

T = 100


def _grid(rows: int = 4, cols: int = 5) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    return np.stack([c.ravel() * T, r.ravel() * T], axis=1).astype(np.int64)  # (x, y)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_rectangle_labels_tiles_whose_centre_is_inside() -> None:
    coords = _grid()
    # tile centres at 49.5, 149.5, ... ; this rectangle holds centres x in {149.5, 249.5}, y in {49.5}
    res = labels_for_shapes([_rect(120, 0, 260, 60)], [2], coords, T)
    assert res.labels.dtype == np.int64 and res.n_outside == 0
    assert np.flatnonzero(res.labels >= 0).tolist() == [1, 2]
    assert (res.labels[[1, 2]] == 2).all()


def test_triangle_and_later_shape_wins() -> None:
    coords = _grid()
    tri = np.array([[0, 0], [500, 0], [0, 400]], float)  # upper-left half of the grid
    res = labels_for_shapes([tri, _rect(0, 0, 120, 120)], [0, 1], coords, T)
    centres = coords + (T - 1) / 2
    in_tri = centres[:, 0] / 500 + centres[:, 1] / 400 < 1
    expected = np.where(in_tri, 0, -1)
    expected[0] = 1  # the later rectangle overrides tile (0, 0)
    assert res.labels.tolist() == expected.tolist()
    res = labels_for_shapes([_rect(0, 0, 120, 120), tri], [1, 0], coords, T)
    assert res.labels[0] == 0


def test_points_and_outside_count() -> None:
    coords = np.delete(_grid(), 7, axis=0)  # tile (x=200, y=100) is background, not embedded
    shapes = [_rect(1000, 1000, 1200, 1200), _rect(10, 10, 20, 20), _rect(0, 0, 500, 100)]
    pts = np.array([[250, 150], [450, 350], [10, 10], [-50, 5]], float)
    res = labels_for_shapes(shapes, [0, 0, 1], coords, T, points=pts, point_classes=[3, 3, 2, 3])
    # off-slide rectangle, a rectangle between tile centres, the missing tile and the off-slide point
    assert res.n_outside == 4
    assert res.labels[0] == 2  # point beats the polygon drawn before it
    assert res.labels[[1, 2, 3, 4]].tolist() == [1, 1, 1, 1]
    where = {tuple(c): lab for c, lab in zip(coords.tolist(), res.labels.tolist(), strict=True)}
    assert where[(400, 300)] == 3


def test_unlabelled_when_nothing_drawn() -> None:
    res = labels_for_shapes([], [], _grid(), T)
    assert (res.labels == -1).all() and res.n_outside == 0


def test_bad_input() -> None:
    coords = _grid()
    with pytest.raises(GpfmError, match="one class per shape"):
        labels_for_shapes([_rect(0, 0, 1, 1)], [], coords, T)
    with pytest.raises(GpfmError, match="K >= 3"):
        labels_for_shapes([np.array([[0, 0], [5, 5]])], [0], coords, T)
    with pytest.raises(GpfmError, match="one class per point"):
        labels_for_shapes([], [], coords, T, points=np.zeros((2, 2)), point_classes=[1])
    with pytest.raises(GpfmError, match="tile_size_level0"):
        labels_for_shapes([], [], coords, 0)


def test_geometry_holes_lines_and_groups() -> None:
    from shapely.geometry import LineString, MultiPoint, Polygon

    coords = _grid()  # 4 rows x 5 cols; centres at 49.5, 149.5, ... (pixel centres)
    ring = Polygon(_rect(0, 0, 500, 400), [_rect(100, 100, 300, 300)])  # hole: tiles 6, 7, 11, 12
    line = LineString([(20, 350), (480, 350)])  # the bottom row, crossed
    res = labels_for_shapes(
        [ring, line, MultiPoint([(260, 50)])], [0, 1, 2], coords, T, points=np.array([[460, 40]]),
        point_classes=[3],
    )  # fmt: skip
    expected = np.zeros(20, np.int64)
    expected[[6, 7, 11, 12]] = -1
    expected[15:] = 1
    expected[2] = 2
    expected[4] = 3
    assert res.labels.tolist() == expected.tolist() and res.n_outside == 0
    groups = np.zeros(20, np.int64)
    groups[[6, 7, 11, 12]] = -1
    groups[15:], groups[2], groups[4] = 1, 2, 3  # shapes 0..2, then the point (3)
    assert res.groups.tolist() == groups.tolist()


@pytest.mark.parametrize(
    ("pixel_edges", "x", "expected"),
    [(False, 99.4, 0), (False, 99.6, 1), (True, 99.9, 0), (True, 100.0, 1)],
)
def test_pixel_convention_of_points(pixel_edges: bool, x: float, expected: int) -> None:
    """napari pixel centres: tile 0 spans [-0.5, 99.5); QuPath pixel edges: [0, 100)."""
    res = labels_for_shapes([], [], _grid(1, 2), T, points=np.array([[x, 10.0]]), point_classes=[5],
                            pixel_edges=pixel_edges)  # fmt: skip
    assert res.labels.tolist() == [5 if i == expected else -1 for i in range(2)]
