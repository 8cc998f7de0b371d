"""``gpfm info``: a slide's metadata as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "show a slide's size, levels (measured geometry, skipped levels), µm/px, vendor and id"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm info SLIDE [--json] [--slide-mpp X] [--properties]``."""
    p = subparsers.add_parser("info", help=HELP, description=HELP)
    p.add_argument("slide", help="slide file (.svs, .ndpi, .mrxs, .tif, .png ...)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON (all properties)")
    p.add_argument(
        "--slide-mpp", type=float, default=None, metavar="X", help="µm/px override for the slide"
    )
    p.add_argument("--properties", action="store_true", help="also list every metadata property")
    return p


def format_info(d: dict[str, Any], *, properties: bool = False) -> str:
    """Human-readable lines for a :meth:`SlideInfo.to_dict` dict."""
    w, h = d["level_dimensions"][0]
    mpp = d["mpp"]
    if mpp is None:
        mpp_txt = "unknown (pass --slide-mpp)"
    else:
        mpp_txt = f"{mpp[0]:.4g} x {mpp[1]:.4g} µm/px ({d['mpp_source']})"
        mpp_txt += f"; field {w * mpp[0] / 1000:.2f} x {h * mpp[1] / 1000:.2f} mm"
    power = d["objective_power"]
    rows = [
        ("file", d["path"]),
        ("slide id", d["slide_id"]),
        ("vendor", f"{d['vendor']} ({d['backend']} backend)"),
        ("size", f"{w} x {h} px"),
        ("µm/px", mpp_txt),
        ("objective", f"{power:g}x" if power else "unknown"),
        ("levels", str(len(d["level_dimensions"]))),
    ]
    levels = d.get("levels") or []
    skipped = [g["level"] for g in levels if not g["trusted"]]
    if skipped:
        rows.append(("skipped", f"level {', '.join(map(str, skipped))} (untrusted geometry)"))
    lines = [f"{k:<10} {v}" for k, v in rows]
    for i, ((lw, lh), ds, (tw, th)) in enumerate(
        zip(d["level_dimensions"], d["level_downsamples"], d["tile_sizes"], strict=True)
    ):
        lines.append(_level_line(i, (lw, lh), ds, (tw, th), levels[i] if i < len(levels) else None))
    if properties:
        lines.append("properties:")
        lines.extend(f"  {k} = {v}" for k, v in sorted(d["properties"].items()))
    return "\n".join(lines)


def _level_line(
    i: int,
    size: tuple[int, int],
    ds: float,
    tile: tuple[int, int],
    geom: dict[str, Any] | None,
) -> str:
    """One level: its measured geometry, and what the file says where that differs."""
    (lw, lh), (tw, th) = size, tile
    if geom is not None and not geom["trusted"]:
        fw, fh = geom["reported_size"]
        return (
            f"  level {i}: SKIPPED, untrusted: {geom['note']} (file: {fw} x {fh} px, "
            f"downsample {geom['reported_downsample']:.4g}); finer levels are read instead"
        )
    line = f"  level {i}: {lw} x {lh} px, downsample {ds:.4g}, tiles {tw} x {th}"
    if geom is not None and (
        geom["padding"] != [0, 0] or abs(geom["reported_downsample"] - ds) > 0.01 * ds
    ):
        fw, fh = geom["reported_size"]
        pad = "padding ignored; " if geom["padding"] != [0, 0] else ""
        line += (
            f" (file says {fw} x {fh} px, downsample {geom['reported_downsample']:.4g}: "
            f"{pad}factor from {geom['basis']})"
        )
    return line


def run(args: argparse.Namespace) -> int:
    """Print the slide's metadata; returns 0 (a bad slide raises SlideError -> exit 1)."""
    from gpfm_core.slide import open_slide

    with open_slide(args.slide, mpp=args.slide_mpp) as slide:
        d = slide.info.to_dict()
    print(json.dumps(d, indent=2) if args.json else format_info(d, properties=args.properties))
    return 0
