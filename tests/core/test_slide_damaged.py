"""Truncated and corrupt slide files are one-line SlideErrors, at open and on every later read.

A new user's ``truncated.tif`` (the first third of a pyramidal JPEG TIFF) gave
``imagecodecs.Jpeg8Error`` and a traceback from ``gpfm info``. The kind of fault: a decoder's
exception escaping the slide layer. Every backend (OpenSlide, the tifffile / Pillow image
path, DICOM through OpenSlide) now turns it into a :class:`SlideError` naming the file and
saying it looks truncated or corrupt; the cohort runner then tries such a slide once (a
GpfmError is the same every time). Cases are real files built in code and damaged where their
own layout says (``tests/_damaged_slides.py``), read by real OpenSlide, tifffile and Pillow.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _damaged_slides import DAMAGED, TILE, make_damaged
from gpfm_core.cli import main
from gpfm_core.errors import GpfmError, SlideError
from gpfm_core.slide import open_slide

#: Both wordings: OpenSlide cannot even recognise it / a decoder failed on its bytes.
DAMAGE = re.compile(r"truncated(,| or) corrupt")
OPEN_CASES = [k for k, stage in DAMAGED.items() if stage == "open"]
READ_CASES = [k for k, stage in DAMAGED.items() if stage == "read"]


@pytest.fixture(scope="module")
def damaged(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> dict[str, tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("damaged")
    return {k: make_damaged(k, root / k, data_dir) for k in DAMAGED}


def _assert_one_line(exc: BaseException, name: str) -> None:
    msg = str(exc)
    assert isinstance(exc, SlideError) and isinstance(exc, GpfmError)
    assert "\n" not in msg and msg.startswith(name), msg
    assert DAMAGE.search(msg), msg


def _first_failure(path: Path) -> tuple[str, BaseException | None]:
    """Open, read every level whole and every associated image: where it failed, and how."""
    stage = "open"
    try:
        with open_slide(path) as s:
            stage = "read"
            for level, size in enumerate(s.level_dimensions):
                s.read_region((0, 0), level, size)
            for name in s.associated_names:
                s.read_associated(name)
    except Exception as exc:  # anything but a one-line SlideError fails the caller
        return stage, exc
    return "none", None


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damage_is_one_slide_error_where_it_shows(
    damaged: dict[str, tuple[Path, Path, str]], kind: str
) -> None:
    path, intact, name = damaged[kind]
    assert _first_failure(intact) == ("none", None)  # the damage, not the file, fails
    stage, exc = _first_failure(path)
    assert stage == DAMAGED[kind] and exc is not None
    _assert_one_line(exc, name)


@pytest.mark.parametrize("kind", ["tif-zeroed-tile", "svs-zeroed-tile"])
def test_zeroed_tile_fails_only_where_it_is_read(
    damaged: dict[str, tuple[Path, Path, str]], kind: str
) -> None:
    path, intact, name = damaged[kind]
    region = ((2 * TILE, TILE), 0, (TILE, TILE))  # tile (2, 1), far from the zeroed (0, 0)
    with open_slide(path) as s, open_slide(intact) as ok:
        np.testing.assert_array_equal(s.read_region(*region), ok.read_region(*region))
        with pytest.raises(SlideError) as err:
            s.read_region((0, 0), 0, (TILE, TILE))
        _assert_one_line(err.value, name)
        assert "reading level 0 at (0, 0)" in str(err.value)
        # the thumbnail reads the coarsest level (OpenSlide's error state is sticky)
        with pytest.raises(SlideError) as err:
            s.get_thumbnail(64)
        _assert_one_line(err.value, name)


@pytest.mark.parametrize("kind", OPEN_CASES)
def test_gpfm_info_on_a_damaged_file_is_one_line_and_exit_1(
    damaged: dict[str, tuple[Path, Path, str]], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, name = damaged[kind]
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpfm info: error: {name} "), err
    assert DAMAGE.search(lines[0])


def test_the_new_users_truncated_tif_in_a_fresh_process(
    damaged: dict[str, tuple[Path, Path, str]],
) -> None:
    # the report's exact command: stderr is the one line, nothing from tifffile's log
    path, _, _ = damaged["tif-in-first-tile"]
    done = subprocess.run(
        [sys.executable, "-m", "gpfm_core", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr and "Jpeg8Error" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("gpfm info: error: slide.tif looks truncated or corrupt: ")


def test_a_damaged_slide_is_tried_once_by_the_cohort_runner(
    damaged: dict[str, tuple[Path, Path, str]], tmp_path: Path
) -> None:
    """A GpfmError is the same every time: even with retries, each damaged slide runs once.

    At 0.5 µm/px the tiles come from level 0, where the zeroed tile lies.
    """
    from gpfm_core.cohort import EmbedSettings, read_cohort_inputs, run_cohort

    kinds = ["tif-in-first-tile", "strip-zeroed", "tif-zeroed-tile", "dicom-level0-cut"]
    rows = [f"{damaged[k][0]},{k}" for k in kinds] + [f"{damaged[kinds[0]][1]},intact"]
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("path,slide_id\n" + "\n".join(rows) + "\n")
    entries = read_cohort_inputs([manifest])
    settings = EmbedSettings(encoder="tiny-vit", mpp=0.5, batch_size=16, device="cpu", workers=1)
    run = run_cohort(entries, out_dir=tmp_path / "cohort", settings=settings, retries=2)
    *bad, good = run.reports
    assert good.status == "embedded" and good.n_tiles > 0
    for kind, report in zip(kinds, bad, strict=True):
        name = damaged[kind][2]
        assert report.status == "failed", kind
        assert report.attempts == 1 and not report.retryable, (kind, report.error)
        assert report.error.startswith(name) and DAMAGE.search(report.error), report.error
        assert "\n" not in report.error
