"""A light UMAP scatter panel: numpy-rasterised points in a QWidget, lasso / box / click.

No plotting library: the N points are drawn into an (H, W, 4) uint8 buffer with numpy
(a few ms for 100,000 points) and shown as one QImage, so the panel stays fluid for whole
slides. Left-drag draws a lasso (``mode="lasso"``) or a box (``mode="box"``, also with Shift
held); a click without drag picks the nearest point. The selection is emitted as an (M,)
int64 array of point indices through :attr:`ScatterPlot.selection_changed`; highlighted
points are drawn larger with a white ring.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import (
    QColor,
    QImage,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QPolygonF,
    QResizeEvent,
)
from qtpy.QtWidgets import QSizePolicy, QWidget

log = logging.getLogger(__name__)

_MARGIN = 8
_CLICK_PX = 4  # a press-release closer than this is a click
_PICK_PX = 8  # a click picks the nearest point within this radius


def _stamp(buf: np.ndarray, px: np.ndarray, colors: np.ndarray, radius: int) -> None:
    """Draw (M,) points of (M, 4) uint8 colours as (2r+1)^2 squares into buf (H, W, 4)."""
    h, w = buf.shape[:2]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            x = px[:, 0] + dx
            y = px[:, 1] + dy
            ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            buf[y[ok], x[ok]] = colors[ok]


class ScatterPlot(QWidget):
    """2-D scatter of N points coloured by label, with lasso / box / click selection.

    Signals
    -------
    selection_changed(numpy.ndarray)
        (M,) int64 indices of the points selected by the user (empty: cleared).
    """

    selection_changed = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMouseTracking(False)
        self.mode = "lasso"
        self._xy = np.zeros((0, 2), np.float32)
        self._rgba = np.zeros((0, 4), np.uint8)
        self._selected = np.zeros(0, np.int64)
        self._image: QImage | None = None
        self._base: tuple[np.ndarray, np.ndarray] | None = None
        self._px = np.zeros((0, 2), np.int64)
        self._buffer: np.ndarray | None = None
        self._path: list[QPointF] = []
        self._press: QPointF | None = None
        self._box = False
        self.renders = 0

    # ------------------------------------------------------------------ data
    @property
    def n_points(self) -> int:
        """Number of points N."""
        return int(self._xy.shape[0])

    @property
    def selected(self) -> np.ndarray:
        """(M,) int64 highlighted point indices."""
        return self._selected.copy()

    def set_data(self, xy: np.ndarray, colors: np.ndarray) -> None:
        """Show points ``xy`` (N, 2) with RGBA ``colors`` (N, 4) floats in [0, 1]."""
        xy = np.asarray(xy, dtype=np.float32).reshape(-1, 2)
        colors = np.asarray(colors, dtype=np.float32)
        if colors.shape != (xy.shape[0], 4):
            raise ValueError(f"colors must be (N, 4) for N={xy.shape[0]}, got {colors.shape}")
        self._xy = xy
        self._rgba = (np.clip(colors, 0, 1) * 255).astype(np.uint8)
        self._selected = np.zeros(0, np.int64)
        self._base = None
        self._render()

    def highlight(self, indices: np.ndarray | list[int]) -> None:
        """Highlight points ``indices`` (no signal emitted)."""
        idx = np.unique(np.asarray(indices, dtype=np.int64).ravel())
        self._selected = idx[(idx >= 0) & (idx < self.n_points)]
        self._render()

    def clear(self) -> None:
        """Remove all points."""
        self.set_data(np.zeros((0, 2)), np.zeros((0, 4)))

    # ------------------------------------------------------------------ geometry
    def to_pixels(self) -> np.ndarray:
        """(N, 2) float64 widget pixel ``(x, y)`` of every point (y grows downwards)."""
        if self.n_points == 0:
            return np.zeros((0, 2))
        lo = self._xy.min(axis=0).astype(np.float64)
        span = np.maximum(self._xy.max(axis=0) - lo, 1e-9).astype(np.float64)
        w = max(self.width() - 2 * _MARGIN, 1)
        h = max(self.height() - 2 * _MARGIN, 1)
        u = (self._xy - lo) / span
        return np.stack([_MARGIN + u[:, 0] * w, _MARGIN + (1 - u[:, 1]) * h], axis=1)

    def select_polygon(self, polygon_px: np.ndarray) -> np.ndarray:
        """Select the points inside a (K, 2) widget-pixel polygon; emits and returns them."""
        from skimage.measure import points_in_poly

        poly = np.asarray(polygon_px, dtype=np.float64).reshape(-1, 2)
        inside = (
            points_in_poly(self.to_pixels(), poly)
            if len(poly) >= 3
            else np.zeros(self.n_points, bool)
        )
        return self._emit(np.flatnonzero(inside))

    def select_box(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Select the points inside a widget-pixel rectangle; emits and returns them."""
        p = self.to_pixels()
        lo_x, hi_x = sorted((x0, x1))
        lo_y, hi_y = sorted((y0, y1))
        inside = (p[:, 0] >= lo_x) & (p[:, 0] <= hi_x) & (p[:, 1] >= lo_y) & (p[:, 1] <= hi_y)
        return self._emit(np.flatnonzero(inside))

    def select_at(self, x: float, y: float) -> np.ndarray:
        """Select the point nearest widget pixel ``(x, y)`` (within 8 px), else clear."""
        p = self.to_pixels()
        if len(p) == 0:
            return self._emit(np.zeros(0, np.int64))
        d2 = ((p - (x, y)) ** 2).sum(axis=1)
        best = int(np.argmin(d2))
        return self._emit(np.array([best]) if d2[best] <= _PICK_PX**2 else np.zeros(0, np.int64))

    def _emit(self, idx: np.ndarray) -> np.ndarray:
        self.highlight(idx)
        self.selection_changed.emit(self.selected)
        return self.selected

    # ------------------------------------------------------------------ drawing
    def _layers(self, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached BGRA rasters of all points, plain and faded (rebuilt on data / size change)."""
        if self._base is None or self._base[0].shape[:2] != (h, w):
            plain = np.empty((h, w, 4), np.uint8)
            plain[...] = (34, 30, 30, 255)  # BGRA background
            faded = plain.copy()
            if self.n_points:
                self._px = np.round(self.to_pixels()).astype(np.int64)
                bgra = self._rgba[:, [2, 1, 0, 3]]
                _stamp(plain, self._px, bgra, self._radius)
                dim = bgra.copy()
                dim[:, :3] = (dim[:, :3].astype(np.uint16) * 2 // 5).astype(np.uint8)
                _stamp(faded, self._px, dim, self._radius)
            self._base = (plain, faded)
        return self._base

    @property
    def _radius(self) -> int:
        return 2 if self.n_points <= 2000 else 1 if self.n_points <= 20000 else 0

    def _render(self) -> None:
        w, h = max(self.width(), 1), max(self.height(), 1)
        plain, faded = self._layers(w, h)
        if self._selected.size:
            buf = faded.copy()  # the rest fades so the selection stands out
            sel = self._px[self._selected]
            white = np.full((sel.shape[0], 4), 255, np.uint8)
            _stamp(buf, sel, white, self._radius + 2)
            _stamp(buf, sel, self._rgba[self._selected][:, [2, 1, 0, 3]], self._radius + 1)
        else:
            buf = plain
        self._buffer = np.ascontiguousarray(buf)  # BGRA bytes = QImage.Format_ARGB32
        self._image = QImage(self._buffer.data, w, h, 4 * w, QImage.Format.Format_ARGB32)
        self.renders += 1
        self.update()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._render()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        if self._image is not None:
            painter.drawImage(0, 0, self._image)
        if self._press is not None and self._path:
            painter.setPen(QPen(QColor(255, 255, 0), 1, Qt.PenStyle.DashLine))
            if self._box:
                painter.drawRect(QRectF(self._press, self._path[-1]))
            else:
                painter.drawPolyline(QPolygonF(self._path))
        painter.end()

    # ------------------------------------------------------------------ mouse
    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() != Qt.MouseButton.LeftButton:
            return
        self._press = event.position()
        self._path = [self._press]
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        self._box = self.mode == "box" or shift

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._press is None:
            return
        self._path.append(event.position())
        self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if self._press is None:
            return
        start, end = self._press, event.position()
        path = [*self._path, end]
        self._press, self._path = None, []
        if (end - start).manhattanLength() < _CLICK_PX and len(path) <= 3:
            self.select_at(end.x(), end.y())
        elif self._box:
            self.select_box(start.x(), start.y(), end.x(), end.y())
        else:
            self.select_polygon(np.array([(p.x(), p.y()) for p in path]))
        self.update()
