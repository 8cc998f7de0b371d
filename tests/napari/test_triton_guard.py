"""Importing the plugin keeps torch from loading triton (which segfaults beside llvmpipe)."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str, **env: str) -> str:
    full_env = {k: v for k, v in os.environ.items() if k != "GPFM_ALLOW_TRITON"}
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, check=True
    )
    return out.stdout.strip()


def test_plugin_import_marks_triton_unavailable_and_torch_still_works() -> None:
    code = (
        "import sys, napari_gpfm, torch, torch.utils._triton as t;"
        "print(sys.modules['triton'] is None, t.has_triton_package(),"
        " float(torch.ones(2).sum()))"
    )
    assert _run(code) == "True False 2.0"


def test_opt_out_leaves_triton_alone() -> None:
    code = "import sys, napari_gpfm; print('triton' in sys.modules)"
    assert _run(code, GPFM_ALLOW_TRITON="1") == "False"
