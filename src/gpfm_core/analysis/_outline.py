"""Outline of a union of grid cells as rectilinear polygons with holes (no shapely)."""

from __future__ import annotations

import numpy as np

# direction vectors in (x, y) with y pointing down; order = clockwise on screen
_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _inside(pt: tuple[float, float], ring: np.ndarray) -> bool:
    x, y = pt
    x0, y0 = ring[:, 0], ring[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > y) != (y1 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.sum(crosses & (x < xi)) % 2)


def cell_outlines(cells: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Polygons covering a set of unit cells, 4-connected cells merged.

    Parameters
    ----------
    cells
        (M, 2) int (i, j) = (column, row) cell indices; cell (i, j) spans [i, i+1) x [j, j+1).

    Returns
    -------
    list of (exterior, holes)
        exterior (K, 2) int64 (x, y) corner vertices, not closed, clockwise on screen (y down);
        holes: list of (K, 2) rings, counter-clockwise on screen.
    """
    cells = np.unique(np.asarray(cells, dtype=np.int64).reshape(-1, 2), axis=0)
    if cells.size == 0:
        return []
    lo = cells.min(axis=0)
    c = cells - lo + 1
    grid = np.zeros((c[:, 1].max() + 2, c[:, 0].max() + 2), dtype=bool)
    grid[c[:, 1], c[:, 0]] = True
    i, j = c[:, 0], c[:, 1]
    # boundary edges, interior on the right of travel (screen coordinates, y down)
    starts, dirs = [], []
    for free, sx, sy, d in (
        (~grid[j - 1, i], i, j, 0),  # top edge, going +x
        (~grid[j, i + 1], i + 1, j, 1),  # right edge, going +y
        (~grid[j + 1, i], i + 1, j + 1, 2),  # bottom edge, going -x
        (~grid[j, i - 1], i, j + 1, 3),  # left edge, going -y
    ):
        starts.append(np.stack([sx[free], sy[free]], axis=1))
        dirs.append(np.full(int(free.sum()), d))
    start = np.concatenate(starts)
    direc = np.concatenate(dirs)
    out_edges: dict[tuple[int, int], list[int]] = {}
    for e, (x, y) in enumerate(start.tolist()):
        out_edges.setdefault((x, y), []).append(e)
    used = np.zeros(len(start), dtype=bool)
    rings: list[np.ndarray] = []
    for e0 in range(len(start)):
        if used[e0]:
            continue
        verts: list[tuple[int, int]] = []
        e = prev = e0
        while not used[e]:
            used[e] = True
            d = int(direc[e])
            x, y = int(start[e, 0]), int(start[e, 1])
            if not verts or int(direc[prev]) != d:
                verts.append((x, y))
            prev = e
            nxt = (x + _DIRS[d][0], y + _DIRS[d][1])
            cands = [k for k in out_edges.get(nxt, []) if not used[k]]
            if not cands:
                break
            # at a pinch vertex turn right (towards the interior) to keep rings 4-connected
            right = (d + 1) % 4
            e = next((k for k in cands if direc[k] == right), cands[0])
        if len(verts) >= 2 and int(direc[e0]) == int(direc[prev]):
            verts = verts[1:]  # first and last edges are collinear
        rings.append(np.asarray(verts, dtype=np.int64) + lo - 1)
    exteriors = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    areas = [_signed_area(r) for r in exteriors]
    result: list[tuple[np.ndarray, list[np.ndarray]]] = [(r, []) for r in exteriors]
    order = np.argsort(areas)
    for h in holes:
        # a cell just inside the polygon next to the hole's first edge
        d = _DIRS[_dir_of(h[0], h[1])]
        mid = (h[0] + h[1]) / 2.0
        pt = (mid[0] - 0.5 * d[1], mid[1] + 0.5 * d[0])
        for k in order:
            if _inside(pt, exteriors[k]):
                result[k][1].append(h)
                break
    return result


def _dir_of(a: np.ndarray, b: np.ndarray) -> int:
    dx, dy = int(np.sign(b[0] - a[0])), int(np.sign(b[1] - a[1]))
    return _DIRS.index((dx, dy))
