"""Centred similarity on the CMU sample with the shipped encoders: readable, and right.

The sample is skin: pink dermal stroma (collagen, eosin-dominant) and purple epidermis
(haematoxylin-dense). Tiles are labelled by a stain rule, independent of any encoder:
colour deconvolution (scikit-image ``rgb2hed``) over each tile's tissue pixels, stroma where
eosin / (haematoxylin + eosin) >= 0.40, epidermis where <= 0.30, nothing in between or on
tiles with under half tissue. The rule was checked by eye once on the sample's thumbnail
(the stroma tiles cover the pink dermis of the lower half and the left edge; the epidermis
tiles its purple ridges and the hair-follicle walls), and the retrieved tiles were drawn
on it: top hits of a stroma query in the dermis, bottom hits on epidermis, keratin and
hair shaft.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpfm_core.analysis import SimilarityIndex, neighbourhood_indices, top_k

ENCODERS = ["hed-texture", "gpfm-student"]


@pytest.fixture(scope="module")
def sample(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Features of both encoders on one grid (112 px at 0.5 µm/px) and stain labels."""
    from skimage.color import rgb2hed

    from gpfm_core.embed import embed_slide, load_embeddings
    from gpfm_core.slide import open_slide

    out = tmp_path_factory.mktemp("sim-sample")
    emb = {
        enc: load_embeddings(
            embed_slide(cmu_svs, encoder=enc, out_dir=out, mpp=0.5, tile_px=112, device="cpu")
        )
        for enc in ENCODERS
    }
    ref = emb[ENCODERS[0]]
    assert all(np.array_equal(e.coords, ref.coords) for e in emb.values())
    t = int(ref.attrs["tile_size_level0"])
    ratio, tissue = [], []
    with open_slide(cmu_svs) as slide:
        for x, y in ref.coords:
            rgb = slide.read_region((int(x), int(y)), 0, (t, t))
            fg = rgb.mean(axis=2) < 215  # not glass
            hed = rgb2hed(rgb)[fg]
            tissue.append(fg.mean())
            ratio.append(hed[:, 1].mean() / (hed[:, 0].mean() + hed[:, 1].mean()) if fg.any() else 0)
    ratio_a, tissue_a = np.array(ratio), np.array(tissue)
    stroma = (ratio_a >= 0.40) & (tissue_a >= 0.5)
    epidermis = (ratio_a <= 0.30) & (tissue_a >= 0.5)
    assert stroma.sum() >= 40 and epidermis.sum() >= 40  # both tissues are well represented
    return {"emb": emb, "grid_rc": ref.grid_rc, "stroma": stroma, "epidermis": epidermis}


def _core_stroma(sample: dict) -> list[int]:
    """Stroma tiles whose 8 neighbours are all embedded stroma tiles (unambiguous queries)."""
    rc, stroma = sample["grid_rc"], sample["stroma"]
    out = []
    for q in np.flatnonzero(stroma):
        near = neighbourhood_indices(int(q), rc, radius=1)
        if near.size == 9 and stroma[near].all():
            out.append(int(q))
    return out


@pytest.mark.parametrize("encoder", ENCODERS)
def test_top5_of_a_stroma_query_are_stroma(sample: dict, encoder: str) -> None:
    """A 3x3 stroma neighbourhood as query (the dock's averaged query): the 5 best tiles
    outside it are stroma, for every unambiguous stroma neighbourhood of the sample."""
    queries = _core_stroma(sample)
    assert len(queries) >= 10
    index = SimilarityIndex(sample["emb"][encoder].features, center=True)
    for q in queries:
        near = neighbourhood_indices(q, sample["grid_rc"], radius=1)
        scores = index.query(index.direction(near), centred=True)
        top, _ = top_k(scores, 5, exclude=near)
        assert sample["stroma"][top].all(), (encoder, q, top)
        assert not sample["epidermis"][top].any()


@pytest.mark.parametrize("encoder", ENCODERS)
def test_centred_scores_separate_top_and_bottom(sample: dict, encoder: str) -> None:
    """Top-5 and bottom-5 scores of a stroma tile's query differ clearly once centred; with
    raw cosine hed-texture scores every tile alike (all within ~0.1 of each other)."""
    feats = sample["emb"][encoder].features
    centred, raw = SimilarityIndex(feats, center=True), SimilarityIndex(feats)
    gaps_c, gaps_r = [], []
    for q in _core_stroma(sample):
        for index, gaps in ((centred, gaps_c), (raw, gaps_r)):
            s = index.query_tiles(q)
            _, top = top_k(s, 5, exclude=[q])
            _, bottom = top_k(-s, 5)
            gaps.append(top.mean() + bottom.mean())  # bottom holds -scores
        s = centred.query_tiles(q)
        # stroma tiles score clearly above epidermis tiles (measured: hed-texture >= 0.69,
        # gpfm-student >= 0.19; raw hed-texture cosine: 0.04)
        assert s[sample["stroma"]].mean() > s[sample["epidermis"]].mean() + 0.1
    assert min(gaps_c) > 0.8  # measured: hed-texture >= 1.3, gpfm-student >= 1.0
    if encoder == "hed-texture":
        assert max(gaps_r) < 0.2  # the fault: raw cosine 0.88-1.0 for every tile
