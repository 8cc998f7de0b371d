"""Cohort inputs and planning (issue 11, item 1): manifests, globs, and a rerun that opens nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gpfm_core.cohort import (
    CohortEntry,
    EmbedSettings,
    ManifestError,
    plan_cohort,
    read_cohort_inputs,
    read_manifest,
)
from gpfm_core.cohort.table import TableRow, settings_hash, update_table
from gpfm_core.encoders import create_encoder

SETTINGS = EmbedSettings(encoder="tiny-vit", mpp=1.0, device="cpu")


def test_manifest_columns_relative_paths_and_default_names(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = (
        "\ufeffPath,Slide_ID,MPP,notes\n"  # Excel's BOM, any case, extra columns ignored
        "a/S01.svs,case-1,,first\n"
        "b/S01.svs,,0.25,same stem\n"
        "/abs/S02.svs,,,\n"
        ",,,blank path: skipped\n"
        "a/S03.svs\n"  # short row
    )
    m = tmp_path / "m.csv"
    m.write_text(text, encoding="utf-8")
    entries = read_manifest(m)
    # b/S01.svs is a later slide of stem S01: <stem>-<id8> (a slide that cannot be opened
    # for its content id, as here, fails to embed anyway: <stem>-<folder>)
    assert entries == [
        CohortEntry(tmp_path / "a" / "S01.svs", "case-1", None),
        CohortEntry(tmp_path / "b" / "S01.svs", "S01-b", 0.25, unique_name=True, default_id=True),
        CohortEntry(Path("/abs/S02.svs"), "S02", None, default_id=True),
        CohortEntry(tmp_path / "a" / "S03.svs", "S03", None, default_id=True),
    ]


def test_same_stem_default_names_are_the_feature_file_stems(
    tmp_path: Path, small_pyramid: Path, cmu_svs: Path
) -> None:
    import shutil

    from gpfm_core.slide import open_slide

    for site, src in (("a", small_pyramid), ("b", cmu_svs), ("c", small_pyramid)):
        (tmp_path / site).mkdir()
        shutil.copyfile(src, tmp_path / site / "S01.svs")
    with open_slide(cmu_svs) as slide:
        id8 = slide.info.slide_id[:8]
    m = tmp_path / "trident.csv"
    m.write_text("wsi,mpp\nb/S01.svs,0.5\na/S01.svs,\n")
    # the first listed keeps the stem; the later one is named as its file will be
    assert [(e.slide_id, e.unique_name) for e in read_manifest(m)] == [
        ("S01", False),
        (f"S01-{_id8(tmp_path / 'a' / 'S01.svs')}", True),
    ]
    entries = read_cohort_inputs([tmp_path / "b" / "S01.svs", tmp_path / "a" / "S01.svs"])
    assert entries[0].slide_id == "S01" and entries[1].slide_id.startswith("S01-")
    later = read_cohort_inputs([tmp_path / "a" / "S01.svs", tmp_path / "b" / "S01.svs"])[1]
    assert later.slide_id == f"S01-{id8}"
    # identical copies have one content id: two names would clash, said in one line
    with pytest.raises(ManifestError, match="names two slides"):
        read_cohort_inputs([tmp_path / "b" / "S01.svs", tmp_path / "a" / "S01.svs",
                            tmp_path / "c" / "S01.svs"])  # fmt: skip


def _id8(path: Path) -> str:
    from gpfm_core.slide import open_slide

    with open_slide(path) as slide:
        return slide.info.slide_id[:8]


def test_a_missing_manifest_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        read_cohort_inputs([tmp_path / "nosuch.csv", tmp_path / "x.svs"])
    assert str(info.value) == f"manifest {tmp_path / 'nosuch.csv'} not found; check the path"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("slide,mpp\nx.svs,0.5\n", "no 'path' column"),
        ("path,mpp\nx.svs,abc\n", "line 2: mpp 'abc' is not a positive number"),
        ("path,mpp\nx.svs,-0.5\n", "mpp '-0.5' is not a positive number"),
        ("path,mpp\nx.svs,0\n", "mpp '0' is not a positive number"),
        ("path,mpp\nx.svs,nan\n", "mpp 'nan' is not a positive number"),
        ("path,slide_id\nx.svs,A\ny.svs,A\n", "slide_id 'A' names two slides (lines 2 and 3)"),
        ("path\nx.svs\n./x.svs\n", "is listed twice (lines 2 and 3)"),
        ("", "is empty"),
    ],
)
def test_bad_manifests_are_one_line_naming_the_fix(tmp_path: Path, text: str, phrase: str) -> None:
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(ManifestError) as info:
        read_manifest(m)
    msg = str(info.value)
    assert phrase in msg and "\n" not in msg


def test_inputs_mix_globs_manifests_and_paths_in_order(tmp_path: Path) -> None:
    for name in ("s2.svs", "s1.svs", "sub/s3.tif"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    m = tmp_path / "list.csv"
    m.write_text("path,slide_id,mpp\nsub/s3.tif,third,0.3\n")
    entries = read_cohort_inputs(
        [str(tmp_path / "*.svs"), m, str(tmp_path / "missing.svs")], mpp=0.5
    )
    assert [(e.path.name, e.slide_id, e.mpp) for e in entries] == [
        ("s1.svs", "s1", 0.5),
        ("s2.svs", "s2", 0.5),
        ("s3.tif", "third", 0.3),  # the manifest's µm/px wins over --slide-mpp
        ("missing.svs", "missing", 0.5),  # kept: the run lists it as failed
    ]
    assert [e.path.name for e in read_cohort_inputs([str(tmp_path / "**" / "*.tif")])] == ["s3.tif"]
    with pytest.raises(ManifestError, match="matches no file"):
        read_cohort_inputs([str(tmp_path / "*.ndpi")])
    with pytest.raises(ManifestError, match="listed twice"):
        read_cohort_inputs([str(tmp_path / "*.svs"), tmp_path / "s1.svs"])


def _row(folder: Path, slide: Path, key: str, file: str) -> TableRow:
    feat = folder / file
    feat.parent.mkdir(parents=True, exist_ok=True)
    feat.write_bytes(b"features")
    st, fst = slide.stat(), feat.stat()
    return TableRow(
        slide_id=slide.stem, file=file, slide_path=str(slide), content_id="0" * 16,
        encoder="tiny-vit", weights_hash="w", tiling="t", mpp=1.0, tile_px=112, overlap_px=0,
        n_tiles=3, embed_dim=64, dtype="float32", sha256="", settings=key,
        slide_size=st.st_size, slide_mtime_ns=st.st_mtime_ns, file_size=fst.st_size,
        file_mtime_ns=fst.st_mtime_ns, created="",
    )  # fmt: skip


def test_planning_skips_current_rows_and_opens_no_slide(tmp_path: Path) -> None:
    """The slides are text files: planning that opened one would fail; it only stats them."""
    enc = create_encoder("tiny-vit")
    slides = []
    for i in range(5):
        p = tmp_path / f"s{i}.svs"
        p.write_text(f"not a slide {i}")
        slides.append(p)
    entries = read_cohort_inputs(slides)
    out = tmp_path / "cohort"
    plan = plan_cohort(
        entries, out, meta=enc.meta, weights_hash=enc.weights_hash, settings=SETTINGS
    )
    assert [e.slide_id for e in plan.todo] == ["s0", "s1", "s2", "s3", "s4"]
    key = plan.settings[entries[0].path]
    update_table(out, [_row(out, s, key, f"f/{s.stem}.h5") for s in slides])
    # s1: the slide changed; s2: its feature file changed; s3: its feature file is gone
    os.utime(slides[1], ns=(1, 1))
    (out / "f" / "s2.h5").write_bytes(b"other features")
    (out / "f" / "s3.h5").unlink()
    plan = plan_cohort(
        entries, out, meta=enc.meta, weights_hash=enc.weights_hash, settings=SETTINGS
    )
    assert [e.slide_id for e in plan.todo] == ["s1", "s2", "s3"]
    assert [(r.slide_id, r.status, r.n_tiles) for r in plan.settled] == [
        ("s0", "skipped", 3),
        ("s4", "skipped", 3),
    ]
    # other settings (min_tissue, a µm/px override) or --no-reuse: nothing is skipped
    for settings in (replace(SETTINGS, min_tissue=0.5), replace(SETTINGS, reuse=False)):
        plan = plan_cohort(
            entries, out, meta=enc.meta, weights_hash=enc.weights_hash, settings=settings
        )
        assert len(plan.todo) == 5
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})
    overridden = [replace(e, mpp=0.3) for e in entries]
    plan = plan_cohort(
        overridden, out, meta=enc.meta, weights_hash=enc.weights_hash, settings=SETTINGS
    )
    assert len(plan.todo) == 5


def test_a_missing_slide_is_failed_by_planning(tmp_path: Path) -> None:
    enc = create_encoder("tiny-vit")
    entries = read_cohort_inputs([tmp_path / "gone.svs"])
    plan = plan_cohort(
        entries, tmp_path, meta=enc.meta, weights_hash=enc.weights_hash, settings=SETTINGS
    )
    assert plan.todo == []
    (report,) = plan.settled
    assert report.status == "failed" and "does not exist" in report.error


def test_cohort_modules_import_nothing_heavy() -> None:
    code = (
        "import sys, gpfm_core.cohort as c; c.read_cohort_inputs; c.run_cohort; c.open_cohort;"
        "c.export_anndata; import gpfm_core.cohort.distributed;"
        "print(','.join(m for m in ('torch', 'distributed', 'anndata', 'pandas', 'h5py')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
