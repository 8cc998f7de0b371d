"""Sample data: found in GPFM_DATA_DIR or the pooch cache, hash-checked, clear offline."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gpfm_core.errors import GpfmError
from napari_gpfm._sample import CMU_SHA256, cmu_small_region, find_cmu_small_region, sha256_file

#: Nothing listens there: a download fails at once, like a machine without network.
DEAD_URL = "http://127.0.0.1:9/CMU-1-Small-Region.svs"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, an empty pooch cache; returns an empty data folder."""
    monkeypatch.setenv("GPFM_SAMPLE_URL", DEAD_URL)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("GPFM_DATA_DIR", str(empty))
    return empty


def test_found_in_gpfm_data_dir(data_dir: Path) -> None:
    path = find_cmu_small_region(data_dir=data_dir, url=DEAD_URL)
    assert path == data_dir / "cmu_small_region.svs"
    assert sha256_file(path) == CMU_SHA256


def test_openslide_file_name_is_accepted(tmp_path: Path, cmu_svs: Path) -> None:
    shutil.copy(cmu_svs, tmp_path / "CMU-1-Small-Region.svs")
    assert find_cmu_small_region(data_dir=tmp_path, url=DEAD_URL).name == "CMU-1-Small-Region.svs"


def test_hash_mismatch_is_refused_with_fix(tmp_path: Path, offline: Path) -> None:
    (tmp_path / "cmu_small_region.svs").write_bytes(b"not the slide" * 100)
    with pytest.raises(GpfmError) as err:
        find_cmu_small_region(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "wrong SHA-256" in msg and "GPFM_DATA_DIR" in msg and "\n" not in msg


def test_offline_without_copy_says_how_to_provide_it(offline: Path, tmp_path: Path) -> None:
    with pytest.raises(GpfmError) as err:
        find_cmu_small_region(cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "GPFM_DATA_DIR" in msg and "openslide.cs.cmu.edu" in msg and "127.0.0.1:9" in msg


def test_verified_copy_in_pooch_cache_is_used_offline(
    offline: Path, tmp_path: Path, cmu_svs: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(cmu_svs, cache / "CMU-1-Small-Region.svs")
    assert find_cmu_small_region(cache_dir=cache) == cache / "CMU-1-Small-Region.svs"


def test_corrupt_copy_in_pooch_cache_is_not_used(offline: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "CMU-1-Small-Region.svs").write_bytes(b"x" * 1000)
    with pytest.raises(GpfmError, match="download"):
        find_cmu_small_region(cache_dir=cache)


def test_open_sample_in_napari(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open_sample("napari-gpfm", "cmu_small_region")
    assert layer.multiscale and layer.rgb
    assert layer.metadata["slide_info"]["vendor"] == "aperio"
    np.testing.assert_allclose(layer.scale, [0.499, 0.499])


def test_sample_offline_notifies_one_line(offline: Path, notes: Callable[[], list[str]]) -> None:
    assert cmu_small_region() == []
    msgs = notes()
    assert len(msgs) == 1 and "GPFM_DATA_DIR" in msgs[0] and "\n" not in msgs[0]
