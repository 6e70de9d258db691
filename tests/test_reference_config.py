"""examples/reference.yaml is true to the code: every value it states is the default that a
config leaving the field out gets (search/config.py, after presets' field-dependent defaults),
and it lists every field of the config model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from evomerge.search.config import SearchConfig, load_config
from tests.helpers import ROOT

REFERENCE = ROOT / "examples" / "reference.yaml"
# Fields the reference fills with an example because they have no default (required), or
# whose default is a list of examples' kind: the models, the tasks and where tasks live.
EXAMPLES = {("models",), ("base_model",), ("evaluation", "tasks"), ("evaluation", "task_paths")}


def _stated(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf value of the reference by its path (sections descended into)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in data.items():
        path = (*prefix, key)
        if path in EXAMPLES:
            continue
        if isinstance(value, dict) and path not in {("merge", "ranges"), ("merge", "fixed")}:
            out.update(_stated(value, path))
        else:
            out[path] = value
    return out


def _defaults(tmp_path: Path) -> dict[str, Any]:
    """The config a file with only the required fields gets, as plain data."""
    reference = yaml.safe_load(REFERENCE.read_text())
    minimal = {key: reference[key] for key in ("models", "base_model")}
    minimal["evaluation"] = {"tasks": reference["evaluation"]["tasks"]}
    file = tmp_path / "minimal.yaml"
    file.write_text(yaml.safe_dump(minimal))
    return load_config(file).model_dump(mode="json")


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and path not in EXAMPLES:
            out |= _fields(sub, path)
        else:
            out.add(path)
    return out


def test_every_stated_value_is_the_default(tmp_path: Path) -> None:
    defaults = _defaults(tmp_path)
    stated = _stated(yaml.safe_load(REFERENCE.read_text()))
    wrong = []
    for path, value in stated.items():
        default: Any = defaults
        for key in path:
            default = default[key]
        if isinstance(default, float) and isinstance(value, (int, float)):
            same = abs(default - value) < 1e-3  # the reference rounds 1/6 to 0.1667
        else:
            same = yaml.safe_load(yaml.safe_dump(default)) == value  # tuples and lists alike
        if not same:
            wrong.append(f"{'.'.join(path)}: reference {value!r}, code {default!r}")
    assert not wrong, "\n".join(wrong)


def test_the_reference_lists_every_field() -> None:
    stated = set(_stated(yaml.safe_load(REFERENCE.read_text()))) | EXAMPLES
    missing = sorted(".".join(p) for p in _fields(SearchConfig) - stated)
    assert not missing, f"fields of search/config.py missing from {REFERENCE.name}: {missing}"
