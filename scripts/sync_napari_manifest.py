"""Regenerate ``napari.yaml``'s reader ``filename_patterns`` from gpfm_core's one list of suffixes.

``python scripts/sync_napari_manifest.py [napari.yaml]`` (``make manifest``) rewrites the list
in place; ``--check`` only says whether it is current (exit 1 when not).
``tests/napari/test_manifest_formats.py`` fails when the two differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from gpfm_core._atomic import write_atomic
from gpfm_core.slide._formats import napari_filename_patterns

MANIFEST = Path(__file__).resolve().parents[1] / "napari.yaml"
_PATTERNS = re.compile(r"(?m)^(?P<indent>[ \t]*)filename_patterns:\n(?:(?P=indent)[ \t]+- .*\n)*")


def rewrite_manifest(text: str) -> str:
    """``text`` with the reader's ``filename_patterns`` list replaced by the library's."""
    m = _PATTERNS.search(text)
    if m is None:
        raise ValueError("the manifest has no 'filename_patterns:' list to regenerate")
    indent = m.group("indent")
    items = "".join(f'{indent}  - "{p}"\n' for p in napari_filename_patterns())
    return f"{text[: m.start()]}{indent}filename_patterns:\n{items}{text[m.end() :]}"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [a for a in argv if a != "--check"]
    path = Path(paths[0]) if paths else MANIFEST
    old = path.read_text(encoding="utf-8")
    new = rewrite_manifest(old)
    if new == old:
        print(f"{path}: filename patterns are current ({len(napari_filename_patterns())})")
        return 0
    if check:
        print(f"{path}: filename patterns differ from gpfm_core's; run `make manifest`")
        return 1
    write_atomic(path.resolve(), new)  # napari_gpfm/napari.yaml links here: write the file itself
    print(f"{path}: wrote {len(napari_filename_patterns())} filename patterns")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
