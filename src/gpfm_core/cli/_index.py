"""``gpfm index build|add|remove|query|info COHORT``: the cohort-wide similarity index.

One index per feature set (encoder, weights and tiling): for a ``gpfm embed`` output folder
each ``COHORT/<tiling>/features_<encoder>-<hash8>/`` gets its own ``gpfm_index`` (where
``gpfm embed`` builds it as slides finish); for any other folder of feature files the index
is ``COHORT/gpfm_index``. ``build`` and ``add`` treat every feature set of COHORT; ``query``,
``info`` and ``remove`` need one index (COHORT, one of its feature folders, or ``--index
DIR``; a folder holding several names them in one line). ``add`` is safe to run from several
processes at once (a file lock), e.g. from each worker as it finishes a slide.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm index`` and its actions."""
    p = subparsers.add_parser(
        "index",
        help="cohort-wide similarity index over feature files (build, add, remove, query)",
        description=(
            "A similarity index over every tile of a cohort's feature files (.h5, one encoder "
            "and tiling): FAISS IVF-PQ candidates, then the exact cosine of centred features. "
            "Slides are added or removed one at a time, without rebuilding."
        ),
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("cohort", type=Path, help="cohort folder of feature files (.h5)")
        q.add_argument(
            "--index",
            type=Path,
            default=None,
            help="index folder (default: the gpfm_index of COHORT's feature set, or "
            "COHORT/gpfm_index)",
        )

    b = sub.add_parser("build", help="index every feature file under COHORT (retrains)")
    common(b)
    b.add_argument(
        "--train-min",
        type=int,
        default=None,
        help="tiles from which the quantisers are trained (below: exact search; default 50000)",
    )
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~sqrt(tiles))")
    b.add_argument("--pq-m", type=int, default=None, help="PQ bytes per tile (default D/16)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")

    a = sub.add_parser("add", help="add feature files (default: every new one under COHORT)")
    common(a)
    a.add_argument("files", nargs="*", type=Path, metavar="FILE", help="feature files or folders")
    a.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("remove", help="remove slides (by slide_id, name or feature file)")
    common(r)
    r.add_argument(
        "slides", nargs="+", metavar="SLIDE", help="slide_id, name, content id or .h5 file"
    )

    q = sub.add_parser("query", help="the tiles most similar to one tile")
    common(q)
    q.add_argument(
        "--slide",
        required=True,
        help="indexed slide: its slide_id in the cohort table (cohort.csv), file name or stem, "
        "content id or .h5; or any feature file (a name of several slides is refused)",
    )
    where = q.add_mutually_exclusive_group(required=True)
    where.add_argument("--tile", type=int, help="tile row in the slide's feature file")
    where.add_argument(
        "--xy", type=float, nargs=2, metavar=("X", "Y"), help="level-0 point inside the tile"
    )
    q.add_argument("-k", type=int, default=10, help="tiles to return (default: 10)")
    q.add_argument("--other-slides", action="store_true", help="leave out the query's own slide")
    q.add_argument("--candidates", type=int, default=None, help="candidates re-ranked")
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists visited")
    q.add_argument("--csv", type=Path, default=None, help="also write the hits to this CSV")

    i = sub.add_parser("info", help="what the index holds, and its slides")
    common(i)
    i.add_argument(
        "--all", action="store_true", help=f"list every slide (default: the first {_LISTED})"
    )
    return p


#: Slides ``gpfm index info`` lists without --all.
_LISTED = 50


def _targets(args: argparse.Namespace) -> list[tuple[Any, Path]]:
    """(sources, index folder) pairs for build / add: one per feature set of COHORT."""
    from gpfm_core.cohort import feature_sets

    if args.index is not None:
        return [(list(getattr(args, "files", None) or []) or args.cohort, args.index)]
    sets = feature_sets(args.cohort)
    files = list(getattr(args, "files", None) or [])
    if not files:
        return [(s, _default(s)) for s in sets] or [(args.cohort, _default(args.cohort))]
    # named files go to the index of the feature set they lie in
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        home = next((s for s in sets if Path(f).resolve().is_relative_to(s.resolve())), None)
        by_dir.setdefault(_default(home if home is not None else args.cohort), []).append(f)
    return [(fs, d) for d, fs in by_dir.items()]


def _default(cohort: Path) -> Path:
    """The index folder of COHORT (of a feature folder: its own ``gpfm_index``)."""
    from gpfm_core.cohort import default_index_dir

    return default_index_dir(cohort)


def _bar(args: argparse.Namespace, desc: str) -> Any:
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(
                total=total, desc=desc, unit="slide", file=sys.stderr, disable=args.quiet
            )
        state["bar"].update(done - state["bar"].n)
        if done == total:
            state["bar"].close()

    return progress


def _summary(res: Any) -> str:
    parts = [f"{len(getattr(res, k))} {k}" for k in ("added", "replaced", "skipped", "removed")]
    parts = [p for p in parts if not p.startswith("0 ")] or ["nothing changed"]
    return (
        f"{res.index_dir}: {', '.join(parts)}; {res.n_slides} slides, {res.n_tiles} tiles "
        f"({res.seconds:.1f} s)"
    )


def run(args: argparse.Namespace) -> int:
    """Run one index action."""
    from gpfm_core import cohort

    if args.action == "build":
        kwargs: dict[str, Any] = {"nlist": args.nlist, "pq_m": args.pq_m}
        if args.train_min is not None:
            kwargs["train_min"] = args.train_min
        for sources, out in _targets(args):
            res = cohort.build_index(sources, out, progress=_bar(args, "indexing"), **kwargs)
            print(_summary(res))
            _notes(res)
            print(
                "stage 1: IVF-PQ (trained)" if res.trained else "stage 1: exact (below --train-min)"
            )
        return 0
    if args.action == "add":
        for sources, out in _targets(args):
            res = cohort.add_to_index(out, sources, progress=_bar(args, "adding"))
            print(_summary(res))
            _notes(res)
            if res.trained:
                print("the cohort reached its training size: quantisers trained on it")
        return 0
    out = args.index if args.index is not None else cohort.find_index(args.cohort)
    if args.action == "remove":
        print(_summary(cohort.remove_from_index(out, args.slides)))
        return 0
    idx = cohort.CohortIndex.open(out)
    if args.action == "info":
        return _info(idx, every=args.all)
    return _query(idx, args)


def _notes(res: Any) -> None:
    for line in res.notes:
        print(f"note: {line}")


def _label(hit: Any) -> str:
    """A hit's slide as a user named it: its cohort slide_id(s), else its name."""
    return ",".join(hit.cohort_slide_ids) or hit.slide_name


def _info(idx: Any, *, every: bool) -> int:
    g = idx.group
    print(f"index:    {idx.index_dir}")
    print(f"features: {g.describe()}, {idx.dim}-d")
    print(f"slides:   {len(idx.slides)}, tiles: {idx.n_tiles}")
    if idx.trained:
        p = idx.params
        print(
            f"stage 1:  IVF{p['nlist']},PQ{p['pq_m']} trained on {p['n_train']} tiles, "
            f"nprobe {p['nprobe']}"
        )
        if idx.retrain_advised:
            print("          the cohort is 10x its training sample: `gpfm index build` retrains")
    else:
        print("stage 1:  exact (fewer tiles than the training size)")
    slides = sorted(idx.slides, key=lambda r: (r.label, str(r.file)))
    shown = slides if every else slides[:_LISTED]
    rows = [
        (
            r.cohort_slide_id or "-",
            r.name,
            r.slide_id,
            str(r.n_tiles),
            r.file.name,
            r.slide_path or "-",
        )
        for r in shown
    ]
    head = ("slide_id", "name", "content id", "tiles", "feature file", "slide")
    widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=True)]
    for row in (head, *rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if len(shown) < len(slides):
        print(f"  ... {len(slides) - len(shown)} more (--all lists every slide)")
    return 0


def _query(idx: Any, args: argparse.Namespace) -> int:
    import numpy as np

    from gpfm_core.cohort import CohortIndexError
    from gpfm_core.embed import load_embeddings

    try:
        rec = idx.slide(args.slide)
    except CohortIndexError:
        if not Path(args.slide).is_file():
            raise
        rec = None
    if rec is not None:  # named by its file from here on: the one unambiguous key
        row = args.tile if args.tile is not None else idx.tile_at(rec.file, *args.xy)
        if row is None:
            raise CohortIndexError(f"no tile of {rec.label} contains the point {tuple(args.xy)}")
        kw = {"k": args.k, "candidates": args.candidates, "nprobe": args.nprobe}
        hits = idx.search_tile(rec.file, row, other_slides_only=args.other_slides, **kw)
        name = rec.label if rec.label == rec.name else f"{rec.label} ({rec.name})"
    else:  # a feature file outside the index: its group must match
        from gpfm_core.analysis.similarity import query_from_point
        from gpfm_core.cohort import feature_group

        emb = load_embeddings(args.slide)
        if feature_group(emb.attrs) != idx.group:
            raise CohortIndexError(
                f"{Path(args.slide).name} holds features from "
                f"{feature_group(emb.attrs).describe()}, the index {idx.group.describe()}"
            )
        if args.tile is not None:
            row = args.tile
        else:
            size = int(emb.attrs.get("tile_size_level0") or 0)
            row = query_from_point(*args.xy, emb.coords, size) if size else None
        if row is None or not 0 <= row < len(emb):
            raise CohortIndexError(f"no such tile in {Path(args.slide).name}")
        hits = idx.search(
            np.asarray(emb.features[row]),
            args.k,
            candidates=args.candidates,
            nprobe=args.nprobe,
        )
        name = Path(args.slide).stem
    print(f"query: {name} tile {row}")
    print(f"{'rank':>4}  {'score':>7}  {'tile':>7}  {'x':>8}  {'y':>8}  slide")
    for i, h in enumerate(hits, 1):
        name = _label(h) if _label(h) == h.slide_name else f"{_label(h)} ({h.slide_name})"
        print(f"{i:>4}  {h.score:7.4f}  {h.row:>7}  {h.x:>8}  {h.y:>8}  {name}")
    if args.csv is not None:
        import csv
        import io

        from gpfm_core._atomic import write_atomic

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        # slide_id: the cohort table's (";"-joined for byte-identical slides indexed once),
        # else the content id; content_id always
        w.writerow(
            [
                "rank",
                "score",
                "slide_id",
                "content_id",
                "slide_name",
                "row",
                "x",
                "y",
                "file",
                "slide_path",
            ]
        )
        for i, h in enumerate(hits, 1):
            w.writerow(
                [
                    i,
                    f"{h.score:.6f}",
                    ";".join(h.cohort_slide_ids) or h.slide_id,
                    h.slide_id,
                    h.slide_name,
                    h.row,
                    h.x,
                    h.y,
                    h.file,
                    h.slide_path,
                ]
            )
        write_atomic(args.csv, buf.getvalue())
        print(f"wrote {args.csv}")
    return 0
