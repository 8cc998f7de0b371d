"""``gpfm encoders``: list the registered encoders (no torch import, no network)."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "list encoders: dim, input px, default tiling, licence, weights status"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gpfm encoders [NAME] [--json]``."""
    p = subparsers.add_parser("encoders", help=HELP, description=HELP)
    p.add_argument(
        "name", nargs="?", help="show every field of one encoder (name, timm:<model> or a file)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable JSON instead of a table")
    return p


def _rows() -> list[dict[str, Any]]:
    from gpfm_core.encoders._factory import weights_status
    from gpfm_core.encoders._hub import weights_env_var
    from gpfm_core.encoders._registry import list_encoders

    rows = []
    for meta in list_encoders():
        row = meta.to_dict()
        row["weights"] = weights_status(meta)
        row["weights_env"] = weights_env_var(meta.name) if meta.weights_required else None
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("name", "dim", "input", "default tiling", "licence", "weights")
    body = [
        (
            r["name"],
            str(r["embed_dim"]),
            f"{r['input_px']} px",
            f"{r['tile_px']} px @ {r['tile_mpp']:g} µm/px",
            r["license"] if len(r["license"]) <= 40 else r["license"][:39] + "…",
            r["weights"],
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in (head, *body)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON); ``NAME`` prints one encoder's full meta. Returns 0."""
    if args.name:
        from gpfm_core.encoders._factory import weights_status
        from gpfm_core.encoders._registry import get_encoder_meta, is_registered

        meta = get_encoder_meta(args.name)
        row = meta.to_dict()
        row["weights"] = weights_status(meta) if is_registered(args.name) else "from file"
        if args.json:
            print(json.dumps(row, indent=2))
        else:
            width = max(map(len, row))
            print("\n".join(f"{k.ljust(width)}  {v}" for k, v in row.items()))
        return 0
    rows = _rows()
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0
