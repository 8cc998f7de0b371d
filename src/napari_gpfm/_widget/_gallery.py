"""Gallery of the top-k retrieved tiles: thumbnail, slide and score; click to go there.

Hits come from the open slides (``key`` is an open session) or from a cohort index (they
carry their slide file, feature file and level-0 box, so the tile can be shown and its
slide opened without a session). A hit whose slide file cannot be read gets a placeholder
thumbnail, not an error.
"""

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
    """One retrieved tile: slide ``key`` / ``name``, tile ``index`` and similarity ``score``.

    Attributes
    ----------
    key, name : str
        The slide's id and display name.
    index : int
        The tile's row (in the open session, or in ``file`` for a cohort hit).
    score : float
        Similarity to the query.
    slide_path, file : str
        Cohort hits: the slide file and the feature file the row belongs to ("" otherwise).
    xy, size : (int, int) or None
        Cohort hits: level-0 top-left corner and (width, height) of the tile.
    """

    key: str
    name: str
    index: int
    score: float
    slide_path: str = ""
    file: str = ""
    xy: tuple[int, int] | None = None
    size: tuple[int, int] | None = None

    @property
    def from_cohort(self) -> bool:
        """Whether the hit came from a cohort index (its slide may not be open)."""
        return bool(self.file)


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


def _missing_pixmap() -> QPixmap:
    """A grey square with a cross: the tile's slide file could not be read."""
    from qtpy.QtGui import QColor, QPainter, QPen

    pix = QPixmap(THUMB_PX, THUMB_PX)
    pix.fill(QColor(90, 90, 90))
    painter = QPainter(pix)
    painter.setPen(QPen(QColor(200, 200, 200), 2))
    m = THUMB_PX // 4
    painter.drawLine(m, m, THUMB_PX - m, THUMB_PX - m)
    painter.drawLine(m, THUMB_PX - m, THUMB_PX - m, m)
    painter.end()
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
        #: buttons whose slide could not be read (a placeholder is shown)
        self.thumbnails_missing: set[int] = set()
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
                where = "\nin the cohort: click to open the slide there" if hit.from_cohort else ""
                b.setToolTip(
                    f"{hit.name}\ntile {hit.index} · {self.score_name} {hit.score:.4f}{where}"
                )
                b.setIcon(blank)
            b.setVisible(i < len(self.hits))
        self.buttons = self._pool[: len(self.hits)]
        self.thumbnails_shown = set()
        self.thumbnails_missing = set()

    def _clicked(self, i: int) -> None:
        if i < len(self.hits):
            self.tile_clicked.emit(self.hits[i])

    def set_thumbnail(self, i: int, rgb: np.ndarray | None, *, why: str = "") -> None:
        """Put the (H, W, 3) uint8 tile image on button ``i``; None: a placeholder (the
        slide could not be read, ``why`` says how, in the tooltip)."""
        if not 0 <= i < len(self.buttons):
            return
        b = self.buttons[i]
        if rgb is None:
            b.setIcon(QIcon(_missing_pixmap()))
            self.thumbnails_missing.add(i)
            if why:
                b.setToolTip(f"{b.toolTip()}\nno thumbnail: {why}")
        else:
            b.setIcon(QIcon(rgb_pixmap(rgb)))
        self.thumbnails_shown.add(i)
