"""The library never imports napari or Qt, and stays light to import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gpfm_core"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_core_source_has_no_gui_import(path: Path) -> None:
    text = path.read_text()
    for banned in ("import napari", "from napari", "qtpy", "PyQt", "PySide", "magicgui"):
        assert banned not in text, f"{path} mentions {banned!r}: gpfm_core must stay GUI-free"


def test_import_gpfm_core_is_light() -> None:
    code = (
        "import sys, gpfm_core, gpfm_core.cli; gpfm_core.cli.build_parser();"
        "heavy = [m for m in ('torch', 'umap', 'napari', 'timm', 'sklearn', 'numba') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing gpfm_core pulled in: {out.stdout.strip()}"
