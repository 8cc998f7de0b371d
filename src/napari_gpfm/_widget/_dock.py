"""``GpfmDock``: the napari dock widget, five tabs over one :class:`SessionStore`.

The dock owns one viewer mouse callback. A click (press and release without dragging) on
the slide is mapped to level-0 pixels through the slide layer's ``world_to_data`` and to a
tile with :func:`~gpfm_core.analysis.similarity.query_from_point`; the active tab decides
what happens (Explore: highlight the tile's point and cluster; Retrieve: similarity query).
Dragging keeps panning the view. Clicks off the embedded tiles only set a status message.

Each tab has one overlay per slide (Embed: coverage, Explore: clusters, Retrieve:
similarity, Probe: prediction, Slide model: attention). Opening a tab, or a tab producing its result, shows that
overlay of the active slide and hides the slide's other analysis overlays; the eye icons
still turn any back on, and :data:`TOGGLE_KEY` toggles the current tab's overlay.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from gpfm_core.analysis import query_from_point
from napari_gpfm._widget import _overlays as ov
from napari_gpfm._widget._embed_tab import EmbedTab
from napari_gpfm._widget._explore_tab import ExploreTab
from napari_gpfm._widget._probe_tab import ProbeTab
from napari_gpfm._widget._retrieve_tab import RetrieveTab
from napari_gpfm._widget._session import SessionStore, SlideSession
from napari_gpfm._widget._slide_model_tab import SlideModelTab
from napari_gpfm._widget._workers import notify_error

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)

_DRAG_PX = 4.0
#: Viewer key that shows / hides the current tab's overlay of the active slide.
TOGGLE_KEY = "Shift-O"


class GpfmDock(QWidget):
    """GPFM slide analysis: Embed, Explore, Retrieve, Probe and Slide model tabs.

    Parameters
    ----------
    napari_viewer
        The viewer (npe2 passes it by this name).
    """

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.store = SessionStore()
        self.embed_tab = EmbedTab(napari_viewer, self.store)
        self.explore_tab = ExploreTab(napari_viewer, self.store)
        self.retrieve_tab = RetrieveTab(napari_viewer, self.store)
        self.probe_tab = ProbeTab(napari_viewer, self.store)
        self.slide_model_tab = SlideModelTab(napari_viewer, self.store)
        self.tabs = QTabWidget()
        for tab, title in ((self.embed_tab, "Embed"), (self.explore_tab, "Explore"),
                           (self.retrieve_tab, "Retrieve"), (self.probe_tab, "Probe"),
                           (self.slide_model_tab, "Slide model")):  # fmt: skip
            self.tabs.addTab(tab, title)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.tabs)
        self.retrieve_tab.embed_tab = self.embed_tab  # opens cohort hits' slides through it
        self.embed_tab.embedded.connect(self.set_active)
        self.embed_tab.forget.connect(self.forget)
        self.tabs.currentChanged.connect(self._tab_changed)
        self.tabs.setToolTip(f"{TOGGLE_KEY} in the viewer shows / hides this tab's overlay")
        napari_viewer.mouse_drag_callbacks.append(self._on_mouse)
        napari_viewer.bind_key(TOGGLE_KEY, self._toggle_key, overwrite=True)
        napari_viewer.layers.events.removed.connect(self._layer_removed)
        self.destroyed.connect(lambda *_: self._disconnect())

    # ------------------------------------------------------------------ sessions
    @property
    def session(self) -> SlideSession | None:
        """The active embedded slide."""
        return self.store.active

    def set_active(self, session: SlideSession) -> None:
        """Make ``session`` active in every tab (after embedding or from the demo)."""
        self.store.add(session)
        self.explore_tab.set_session(session)
        self.probe_tab.set_session(session)
        self.slide_model_tab.set_session(session)
        if self.tabs.currentWidget() is self.probe_tab:
            self.probe_tab.ensure_layers()  # the new slide's own annotation layers

    def forget(self, key: str) -> None:
        """Drop slide ``key``'s session (its layer was closed or its µm/px changed)."""
        if self.store.get(key) is None:
            return
        self.store.remove(key)
        active = self.store.active
        if self.explore_tab.session is not None and self.explore_tab.session.key == key:
            self.explore_tab.set_session(active)
        if self.probe_tab.session is not None and self.probe_tab.session.key == key:
            self.probe_tab.set_session(active)
        self.slide_model_tab.set_session(active)  # the combo lists the slides left

    def _tab_changed(self, _index: int) -> None:
        if self.tabs.currentWidget() is self.probe_tab and self.probe_tab.session is not None:
            self.probe_tab.ensure_layers()  # annotation layers appear when the user opens Probe
        self.show_tab_overlay()

    # ------------------------------------------------------------------ overlays
    def tab_overlay(self) -> str:
        """Overlay kind (``ov.CLUSTERS`` ...) of the current tab."""
        return {
            self.embed_tab: ov.COVERAGE,
            self.explore_tab: ov.CLUSTERS,
            self.retrieve_tab: ov.SIMILARITY,
            self.probe_tab: ov.PREDICTION,
            self.slide_model_tab: ov.ATTENTION,
        }[self.tabs.currentWidget()]

    def show_tab_overlay(self) -> Any:
        """Show the current tab's overlay of the active slide alone (if it has one yet)."""
        session = self.store.active
        if session is None or ov.find(self.viewer, self.tab_overlay(), session) is None:
            return None
        return ov.show_only(self.viewer, session, self.tab_overlay())

    def toggle_overlay(self) -> bool | None:
        """Show (alone) or hide the current tab's overlay of the active slide.

        Returns its new visibility, None when the slide has no such overlay yet.
        """
        session = self.store.active
        name = self.tab_overlay()
        layer = None if session is None else ov.find(self.viewer, name, session)
        if layer is None:
            self.viewer.status = f"no {name.removeprefix('gpfm: ')} overlay yet"
            return None
        if layer.visible:
            layer.visible = False
        else:
            ov.show_only(self.viewer, session, name)
        return bool(layer.visible)

    def _toggle_key(self, _viewer: Any) -> None:
        self.toggle_overlay()

    def _layer_removed(self, event: Any) -> None:
        """A slide layer was closed: drop its session and the layers the dock made for it.

        Tissue, ink, grid, coverage, overlays, tiles and the query outline go with the
        slide. Annotation layers are the user's work: an empty one goes, one holding shapes
        or points stays, still tagged with the slide (opening it again finds them), and a
        notification says so. Nothing happens while another layer of the same slide is still open.
        """
        from napari_gpfm._widget._embed_tab import slide_ref

        layer = event.value
        ref = slide_ref(layer)
        name = getattr(layer, "name", None)
        for s in self.store:
            if s.name == name and (ref is None or s.key != ref.slide_id):
                self.forget(s.key)  # a session made for a layer of that name (the demo's)
        if ref is None or any(r.slide_id == ref.slide_id for r in self.embed_tab.slide_refs()):
            return
        self.forget(ref.slide_id)
        kept = []
        for own in ov.layers_of(self.viewer, ref.slide_id):
            kind = ov.info(own).get("kind")
            if kind in ("annotations", "annotation_points") and len(own.data):
                kept.append(own.name)
                continue
            self.viewer.layers.remove(own)
        if kept:
            from napari_gpfm._notify import notify_info

            notify_info(
                f"{ref.layer_name} closed: its annotations were kept ({', '.join(kept)}); "
                "delete them yourself if you no longer need them"
            )

    @property
    def jobs(self) -> list[Any]:
        """Every background job of the dock."""
        return [
            self.embed_tab.job, self.explore_tab.job, self.retrieve_tab.thumbs, self.probe_tab.job,
            self.slide_model_tab.job, self.slide_model_tab.thumbs,
        ]  # fmt: skip

    def _disconnect(self) -> None:
        """The dock is going away: stop its jobs (their results would land nowhere)."""
        for job in self.jobs:
            job.cancel()
        with contextlib.suppress(ValueError):
            self.viewer.mouse_drag_callbacks.remove(self._on_mouse)
        with contextlib.suppress(Exception):  # the viewer may be gone already
            self.viewer.bind_key(TOGGLE_KEY, None)

    # ------------------------------------------------------------------ clicks
    def level0_at(self, session: SlideSession, position: Sequence[float]) -> tuple[float, float]:
        """Level-0 ``(x, y)`` pixel-centre coordinates of world ``position`` on ``session``'s slide."""
        layer = ov.find(self.viewer, session.name)
        pos = np.asarray(position, dtype=float)
        if layer is not None:
            data = np.asarray(
                layer.world_to_data(pos[-layer.ndim :] if len(pos) >= layer.ndim else pos)
            )
            return float(data[-1]), float(data[-2])
        return float(pos[-1] / session.mpp[0]), float(pos[-2] / session.mpp[1])

    def tile_at(self, position: Sequence[float]) -> tuple[SlideSession | None, int | None]:
        """The embedded slide and tile under world ``position`` (active slide first)."""
        ordered = [s for s in (self.store.active,) if s is not None] + [
            s for s in self.store if s is not self.store.active
        ]
        for session in ordered:
            x, y = self.level0_at(session, position)
            index = query_from_point(x, y, session.coords, session.tile_size_xy)
            if index is not None:
                return session, index
        return None, None

    def click(self, position: Sequence[float]) -> int | None:
        """Handle a click at world ``position`` for the current tab; returns the tile index."""
        tab = self.tabs.currentWidget()
        if tab not in (self.explore_tab, self.retrieve_tab) or len(self.store) == 0:
            return None
        if tab is self.retrieve_tab and not self.retrieve_tab.armed:
            return None
        session, index = self.tile_at(position)
        if session is None or index is None:
            msg = "No embedded tile here: click on embedded tissue."
            self.viewer.status = msg
            (self.retrieve_tab if tab is self.retrieve_tab else self.explore_tab).status.setText(
                msg
            )
            if tab is self.explore_tab:
                self.explore_tab.click_tile(
                    self.explore_tab.session, None
                ) if self.explore_tab.session else None
            return None
        try:
            if tab is self.retrieve_tab:
                self.retrieve_tab.query_tile(session, index)
            else:
                if session is not self.explore_tab.session:
                    self.set_active(session)
                self.explore_tab.click_tile(session, index)
        except Exception as exc:  # never a traceback in the viewer
            notify_error(exc, what="click")
            return None
        self.viewer.status = f"{session.name}: tile {index}"
        return index

    def _on_mouse(self, viewer: Any, event: Any) -> Generator[None, None, None]:
        if getattr(event, "button", 1) != 1 or self.tabs.currentWidget() not in (
            self.explore_tab,
            self.retrieve_tab,
        ):
            return
        start = np.asarray(getattr(event, "pos", (0, 0)), dtype=float)
        dragged = False
        yield
        while event.type == "mouse_move":
            pos = np.asarray(getattr(event, "pos", start), dtype=float)
            dragged = dragged or float(np.abs(pos - start).max()) > _DRAG_PX
            yield
        if not dragged:
            self.click(event.position)
