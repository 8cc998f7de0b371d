"""Prepare the GPU device run of ``benchmarks/gpu_check.sh`` here, on a machine with PyPI
(``gpu_check.sh --prepare`` calls this).

The device machine (one H200, 16 cores, Python 3.12, no network) has torch, timm, h5py,
tifffile, scikit-image, pandas ... (its package list is the ``Packages:`` line of the
workplace's device KINDS.md, ``$GPFM_DEVICE_KINDS``) but none of OpenSlide, imagecodecs or
dask.distributed, and its timm may differ from ours. This script

1. downloads the wheels of :data:`WHEELS`, at the versions installed in this Python (the
   project's environment), for CPython 3.12 manylinux x86-64, into ``.whl/`` (old ones removed:
   two versions of one package stop the install there);
2. optionally builds a wheel of the authors' CONCH code from a source checkout
   (``--conch-src DIR``), so that the training check distils from the real CONCH tower (its
   fallback is a CONCH-shaped tower, see ``gpu_train_check.py``);
3. checks that every requirement of those wheels is either carried or on the device's list;
4. copies the sample images into ``bench_out/gpu_data/`` (the device cannot see ../shared);
5. checks that what travels (tracked and untracked-not-ignored files plus the carried
   folders) stays under the 64 MiB limit, and prints the one ``run`` call to make.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIR = ROOT / ".whl"
DATA_DIR = ROOT / "bench_out" / "gpu_data"
CARRY = [".whl", "bench_out/gpu_data"]
#: What the device image lacks (or has at another version) for the three checks.
WHEELS = [
    "openslide-python", "openslide-bin", "imagecodecs",  # slides
    "timm",  # the version the project is tested with
    "dask", "distributed", "partd", "locket", "tblib", "tornado", "zict",  # cohort runs
]  # fmt: skip
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
    "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64",
]  # fmt: skip
#: Declared but never imported by what the checks run (conch 0.1.0 declares ftfy).
UNUSED = {"ftfy"}
SAMPLES = ["cmu_small_region.svs", "he_patch_1000.png"]
LIMIT_MIB = 64
#: One device call: the parts' budgets in gpu_check.sh (450 s), 10 s kill grace per part, slack.
TIMEOUT_S = 500
KINDS = Path(os.environ.get("GPFM_DEVICE_KINDS", "/work/.library/device/KINDS.md"))


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(names: list[str]) -> list[Path]:
    """Wheels of ``names`` at this environment's versions, for CPython 3.12 x86-64 Linux."""
    WHEEL_DIR.mkdir(exist_ok=True)
    for old in WHEEL_DIR.glob("*.whl"):
        old.unlink()
    specs = [f"{n}=={md.version(n)}" for n in names]
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp", "-d", str(WHEEL_DIR),
    ]  # fmt: skip
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + specs, check=True)
    return sorted(WHEEL_DIR.glob("*.whl"))


def build_conch(src: Path) -> Path:
    """A wheel of the authors' CONCH code from a source checkout (pure Python)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEEL_DIR), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)  # setuptools warns at length
    if done.returncode != 0:
        raise SystemExit(f"gpu_prepare: building CONCH's wheel failed:\n{done.stderr[-2000:]}")
    return next(WHEEL_DIR.glob("conch-*.whl"))


def requirements(wheel: Path) -> set[str]:
    """Names a wheel requires on CPython 3.12 Linux (extras left out)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode("utf-8")
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "extra": ""}  # fmt: skip
    out = set()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.partition(":")[2].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.add(_norm(req.name))
    return out


def device_packages() -> set[str] | None:
    """The device image's package names (KINDS.md's ``Packages:`` line), or None if unknown."""
    if not KINDS.is_file():
        return None
    m = re.search(r"nvidia-h200:.*?Packages: (.*?)\.\s*$", KINDS.read_text(), re.M | re.S)
    return {_norm(n.strip()) for n in m.group(1).split(",")} if m else None


def travelling_bytes() -> int:
    """Bytes that travel: tracked and untracked-not-ignored files, plus the carried folders."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    files = [ROOT / f for f in listed.split("\0") if f]
    for folder in CARRY:
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conch-src", type=Path, default=None, help="CONCH source checkout")
    p.add_argument(
        "--data", type=Path, default=None, help="sample images (default: $GPFM_DATA_DIR)"
    )
    args = p.parse_args(argv)
    wheels = download(WHEELS)
    if args.conch_src is not None:
        wheels.append(build_conch(args.conch_src))
    carried = {_norm(w.name.split("-")[0]) for w in wheels}
    needed = set().union(*(requirements(w) for w in wheels)) - carried - UNUSED
    known = device_packages()
    if known is None:
        print(
            f"device package list not found ({KINDS}): requirements not checked: {sorted(needed)}"
        )
    elif missing := sorted(needed - known):
        print(f"gpu_prepare: the device lacks {missing}: add them to WHEELS", file=sys.stderr)
        return 1
    data = args.data or Path(os.environ.get("GPFM_DATA_DIR", ROOT.parent / "shared" / "data"))
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        shutil.copy2(data / name, DATA_DIR / name)
    size = travelling_bytes() / 2**20
    print(f"{len(wheels)} wheels in .whl/ ({', '.join(w.name for w in wheels)})")
    print(f"what travels: {size:.1f} MiB of {LIMIT_MIB} MiB")
    if size > LIMIT_MIB:
        print("gpu_prepare: over the limit: ignore or carry less", file=sys.stderr)
        return 1
    call = {"command": "bash benchmarks/gpu_check.sh", "carry": CARRY, "timeout_s": TIMEOUT_S}
    print("ready. From this checkout, make ONE device call:\n  run " + json.dumps(call))
    print("then read $OUT's gpu_summary.md and gpu_check.log (they come back); to rerun only "
          "some parts: bash benchmarks/gpu_check.sh --only train,cohort")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
