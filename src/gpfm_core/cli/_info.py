"""``gpfm info``: a slide's metadata as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "show a slide's size, levels, µm/px, vendor and id"


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
    lines = [f"{k:<10} {v}" for k, v in rows]
    for i, ((lw, lh), ds, (tw, th)) in enumerate(
        zip(d["level_dimensions"], d["level_downsamples"], d["tile_sizes"], strict=True)
    ):
        lines.append(f"  level {i}: {lw} x {lh} px, downsample {ds:.4g}, tiles {tw} x {th}")
    if properties:
        lines.append("properties:")
        lines.extend(f"  {k} = {v}" for k, v in sorted(d["properties"].items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the slide's metadata; returns 0 (a bad slide raises SlideError -> exit 1)."""
    from gpfm_core.slide import open_slide

    with open_slide(args.slide, mpp=args.slide_mpp) as slide:
        d = slide.info.to_dict()
    print(json.dumps(d, indent=2) if args.json else format_info(d, properties=args.properties))
    return 0
