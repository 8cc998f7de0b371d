"""Gallery of the top-k retrieved tiles: thumbnail, slide and score; click to go there."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QGridLayout, QScrollArea, QToolButton, QVBoxLayout, QWidget

log = logging.getLogger(__name__)

THUMB_PX = 80


@dataclass(frozen=True)
class Hit:
    """One retrieved tile: slide ``key`` / ``name``, tile ``index`` and similarity ``score``."""

    key: str
    name: str
    index: int
    score: float


def rgb_pixmap(rgb: np.ndarray, size: int = THUMB_PX) -> QPixmap:
    """QPixmap of a (H, W, 3) uint8 image scaled to ``size`` px."""
    arr = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = arr.shape[:2]
    img = QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(img).scaled(
        size, size, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation
    )


def elide_middle(widget: QWidget, text: str, width: int) -> str:
    """``text`` shortened in the middle ("TCGA-A1…-01Z") to fit ``width`` px of ``widget``'s font."""
    return widget.fontMetrics().elidedText(text, Qt.TextElideMode.ElideMiddle, width)


def _blank_pixmap() -> QPixmap:
    pix = QPixmap(THUMB_PX, THUMB_PX)
    pix.fill(Qt.GlobalColor.transparent)
    return pix


class TileGallery(QWidget):
    """Grid of buttons, one per hit.

    Signals
    -------
    tile_clicked(Hit)
        The user clicked a hit.
    """

    tile_clicked = Signal(object)

    def __init__(
        self, parent: QWidget | None = None, *, columns: int = 3, score_name: str = "similarity"
    ) -> None:
        super().__init__(parent)
        self.columns = columns
        #: What a hit's score is, in its tooltip ("similarity", "attention" ...).
        self.score_name = score_name
        self.hits: list[Hit] = []
        self.buttons: list[QToolButton] = []
        self._pool: list[QToolButton] = []
        self.thumbnails_shown: set[int] = set()
        inner = QWidget()
        self._grid = QGridLayout(inner)
        self._grid.setSpacing(4)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        scroll.setMinimumHeight(2 * THUMB_PX + 60)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(scroll)

    def set_hits(self, hits: list[Hit]) -> None:
        """Show ``hits`` (best first) with empty thumbnails; buttons are reused, not rebuilt."""
        self.hits = list(hits)
        while len(self._pool) < len(self.hits):
            i = len(self._pool)
            b = QToolButton()
            b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextUnderIcon)
            b.setIconSize(QSize(THUMB_PX, THUMB_PX))
            b.setFixedSize(THUMB_PX + 12, THUMB_PX + 40)
            b.clicked.connect(lambda _=False, i=i: self._clicked(i))
            self._grid.addWidget(b, i // self.columns, i % self.columns)
            self._pool.append(b)
        blank = QIcon(_blank_pixmap())
        for i, b in enumerate(self._pool):
            if i < len(self.hits):
                hit = self.hits[i]
                b.setText(f"{hit.score:.3f}\n{elide_middle(b, hit.name, THUMB_PX + 8)}")
                # the full slide name: slides of one study often differ only in the middle
                b.setToolTip(f"{hit.name}\ntile {hit.index} · {self.score_name} {hit.score:.4f}")
                b.setIcon(blank)
            b.setVisible(i < len(self.hits))
        self.buttons = self._pool[: len(self.hits)]
        self.thumbnails_shown: set[int] = set()

    def _clicked(self, i: int) -> None:
        if i < len(self.hits):
            self.tile_clicked.emit(self.hits[i])

    def set_thumbnail(self, i: int, rgb: np.ndarray) -> None:
        """Put the (H, W, 3) uint8 tile image on button ``i``."""
        if 0 <= i < len(self.buttons):
            self.buttons[i].setIcon(QIcon(rgb_pixmap(rgb)))
            self.thumbnails_shown.add(i)
