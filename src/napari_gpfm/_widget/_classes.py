"""Editable list of annotation classes (name + colour) for the Probe tab."""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QColorDialog,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_gpfm._widget._overlays import palette

log = logging.getLogger(__name__)

DEFAULT_CLASSES = ("tumour", "stroma")


class ClassList(QWidget):
    """Classes the user annotates with; row i is class index i (number key i + 1).

    Signals
    -------
    classes_changed()
        Names or colours changed (not the current class).
    removed(int)
        Class ``i`` was removed (indices above it shift down by one).
    current_changed(int)
        The current class changed.
    """

    classes_changed = Signal()
    removed = Signal(int)
    current_changed = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.list = QListWidget()
        self.list.setMaximumHeight(140)
        add, ren, rem, col = (QPushButton(t) for t in ("Add", "Rename", "Remove", "Colour"))
        add.clicked.connect(lambda: self.add_class())
        ren.clicked.connect(
            lambda: self.list.editItem(self.list.currentItem()) if self.list.currentItem() else None
        )
        rem.clicked.connect(lambda: self.remove_class(self.current))
        col.clicked.connect(self._pick_colour)
        self.add_btn, self.rename_btn, self.remove_btn, self.colour_btn = add, ren, rem, col
        row = QHBoxLayout()
        for b in (add, ren, rem, col):
            row.addWidget(b)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.list)
        lay.addLayout(row)
        self._colours: list[tuple[int, int, int]] = []
        self.list.itemChanged.connect(lambda _i: self.classes_changed.emit())
        self.list.currentRowChanged.connect(
            lambda r: self.current_changed.emit(r) if r >= 0 else None
        )
        self.set_classes(list(DEFAULT_CLASSES))

    # ------------------------------------------------------------------ state
    @property
    def names(self) -> list[str]:
        """Class names, index order."""
        return [
            self.list.item(i).text().strip() or f"class {i + 1}" for i in range(self.list.count())
        ]

    @property
    def colours(self) -> list[tuple[int, int, int]]:
        """(r, g, b) 0-255 per class."""
        return list(self._colours)

    def rgba(self) -> np.ndarray:
        """(K, 4) float32 RGBA per class."""
        return np.array(
            [(*(c / 255 for c in rgb), 1.0) for rgb in self._colours], np.float32
        ).reshape(-1, 4)

    @property
    def current(self) -> int:
        """Index of the current class (0 when none is selected)."""
        return max(self.list.currentRow(), 0)

    def set_current(self, index: int) -> None:
        """Make class ``index`` current (ignored when out of range)."""
        if 0 <= index < self.list.count():
            self.list.setCurrentRow(index)

    def _item(self, name: str, rgb: tuple[int, int, int]) -> QListWidgetItem:
        pix = QPixmap(14, 14)
        pix.fill(QColor(*rgb))
        item = QListWidgetItem(QIcon(pix), name)
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        return item

    def set_classes(
        self, names: list[str], colours: list[tuple[int, int, int]] | None = None
    ) -> None:
        """Replace all classes."""
        self.list.blockSignals(True)
        self.list.clear()
        if colours is None or len(colours) != len(names):
            colours = [tuple(int(255 * v) for v in c[:3]) for c in palette(len(names))]  # type: ignore[misc]
        self._colours = [tuple(int(v) for v in c) for c in colours]  # type: ignore[misc]
        for name, rgb in zip(names, self._colours, strict=True):
            self.list.addItem(self._item(name, rgb))
        self.list.setCurrentRow(0 if names else -1)
        self.list.blockSignals(False)
        self.classes_changed.emit()

    def add_class(self, name: str | None = None) -> int:
        """Append a class; returns its index."""
        i = self.list.count()
        rgb = tuple(int(255 * v) for v in palette(i + 1)[i][:3])
        self._colours.append(rgb)  # type: ignore[arg-type]
        self.list.blockSignals(True)
        self.list.addItem(self._item(name or f"class {i + 1}", rgb))  # type: ignore[arg-type]
        self.list.blockSignals(False)
        self.list.setCurrentRow(i)
        self.classes_changed.emit()
        return i

    def rename_class(self, index: int, name: str) -> None:
        """Rename class ``index``."""
        self.list.item(index).setText(name)

    def set_colour(self, index: int, rgb: tuple[int, int, int]) -> None:
        """Recolour class ``index``."""
        self._colours[index] = tuple(int(v) for v in rgb)  # type: ignore[assignment]
        self.list.blockSignals(True)
        name = self.list.item(index).text()
        self.list.takeItem(index)
        self.list.insertItem(index, self._item(name, self._colours[index]))
        self.list.blockSignals(False)
        self.classes_changed.emit()

    def remove_class(self, index: int) -> None:
        """Remove class ``index`` (at least one class always stays)."""
        if self.list.count() <= 1 or not 0 <= index < self.list.count():
            return
        self.list.blockSignals(True)
        self.list.takeItem(index)
        self._colours.pop(index)
        self.list.blockSignals(False)
        self.list.setCurrentRow(min(index, self.list.count() - 1))
        self.removed.emit(index)
        self.classes_changed.emit()

    def _pick_colour(self) -> None:
        i = self.current
        colour = QColorDialog.getColor(QColor(*self._colours[i]), self, "Class colour")
        if colour.isValid():
            self.set_colour(i, (colour.red(), colour.green(), colour.blue()))
