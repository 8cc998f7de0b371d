"""docs/recipe_card.md and the packaged `gpfm` config agree, row by row.

The card gives every value of `gpfm train --config gpfm` with its source in GPFM's repository.
A value that drifts in the card or in a config, a config key without a row, a recipe value that
gpfm.yaml inherits instead of pinning, or a changed default that student_s does not pin, fails.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpfm_core.train.config import get_path, load_config, packaged_config

CARD = Path(__file__).resolve().parents[2] / "docs" / "recipe_card.md"
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]*)`\s*\|(.*)\|\s*$")
#: Recipe keys where default.yaml keeps a setting that runs anywhere (the card says which).
DEFAULT_DIFFERS = {
    "student.init_weights",
    "data.tile_px",
    "data.mpp",
    "data.num_workers",
    "train.strategy",
    "train.precision",
    "train.checkpoint_every",
    "train.stop_at_step",
}


@cache
def resolved(name: str = "default") -> dict[str, Any]:
    """A packaged config, resolved once per test session (the tests only read it)."""
    return load_config(name)


def _section(title: str) -> list[tuple[str, Any, list[str]]]:
    """Rows ``(key, value, other cells)`` of the table under ``## title``."""
    text = CARD.read_text(encoding="utf-8")
    body = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        m = ROW.match(line)
        if m:
            rest = [c.strip() for c in m.group(3).split("|")]
            rows.append((m.group(1), yaml.safe_load(m.group(2)), rest))
    assert rows, f"no table rows under '## {title}'"
    return rows


def value(cfg: dict[str, Any], key: str) -> Any:
    """``experts[conch].weights.cls`` addresses an expert by name; other keys are dotted."""
    m = re.match(r"^experts\[([^\]]+)\]\.(.+)$", key)
    if m:
        expert = next((e for e in cfg["experts"] if e["name"] == m.group(1)), None)
        assert expert is not None, f"no expert {m.group(1)} in the config"
        return get_path(expert, m.group(2))
    return get_path(cfg, key)


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a resolved config under the card's key names."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(leaves(v, f"{prefix}.{k}" if prefix else k))
    elif prefix == "experts":
        for e in node:
            out.update(leaves({k: v for k, v in e.items() if k != "name"}, f"experts[{e['name']}]"))
    else:
        out[prefix] = node
    return out


RECIPE = _section("Recipe")
RUN = _section("Run settings")
CHANGED = _section("Defaults that changed")


@pytest.mark.parametrize(("key", "expected"), [(k, v) for k, v, _ in RECIPE + RUN])
def test_gpfm_config_equals_the_card(key: str, expected: Any) -> None:
    assert value(resolved("gpfm"), key) == expected


@pytest.mark.parametrize(("key", "source"), [(k, rest[0]) for k, _, rest in RECIPE])
def test_every_recipe_value_is_pinned_in_gpfm_yaml_and_sourced(key: str, source: str) -> None:
    """Written in gpfm.yaml itself (a change to default.yaml cannot move it), with a source."""
    raw = yaml.safe_load(packaged_config("gpfm").read_text(encoding="utf-8"))
    if key.startswith("experts["):
        value(raw, key)  # the expert item spells the key out
    else:
        get_path(raw, key)
    assert re.search(
        r"\w+\.(py|yaml|sh|md)|\b(vitl|ssl|arch|train|fms|kd|head|groups|aug|tf):", source
    ), source


def test_every_config_key_has_exactly_one_row() -> None:
    keys = [k for k, _, _ in RECIPE + RUN]
    assert len(keys) == len(set(keys))
    assert set(leaves(resolved("gpfm"))) == set(keys)


@pytest.mark.parametrize(("key", "expected"), [(k, v) for k, v, _ in RECIPE])
def test_default_holds_the_recipe_except_its_run_settings(key: str, expected: Any) -> None:
    default = resolved()
    if key in DEFAULT_DIFFERS:
        assert value(default, key) != expected
    else:
        assert value(default, key) == expected


@pytest.mark.parametrize(("key", "before", "cells"), CHANGED)
def test_changed_defaults_are_gpfm_and_student_s_keeps_how_it_was_trained(
    key: str, before: Any, cells: list[str]
) -> None:
    now, student_s = (yaml.safe_load(c.strip("`")) if c != "—" else c for c in cells[:2])
    assert value(resolved(), key) == now == value(resolved("gpfm"), key)
    assert before != now
    if student_s != "—":
        assert value(resolved("student_s"), key) == student_s
