"""A config file on disk: YAML read safely into a mapping, and paths in it resolved against its
folder. Every mistake becomes a :class:`ConfigError` with one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line."""


def resolve_path(path: str, folder: Path, hub_like: bool) -> str:
    """``path`` made absolute against the config file's ``folder``; with ``hub_like``, an
    ``org/model`` id that is not a local folder stays as written (a hub id)."""
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        local = folder / candidate
        if local.exists() or not (hub_like and path.count("/") == 1 and not path.startswith(".")):
            candidate = local
        else:
            return path  # a hub id such as org/model
    return str(candidate.resolve())


MAX_YAML_NODES = 100_000  # values in a config once aliases are expanded; real ones hold hundreds


def read_mapping(file: Path, kind: str) -> dict[str, Any]:
    """A YAML file holding a mapping at the top level; a ConfigError (one line) otherwise.
    ``kind`` names the file in messages ("config", "merge file"). The one reader of the
    search config and of merge files (evomerge and mergekit)."""
    try:
        raw = _load_yaml(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{kind} file not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {kind} {file}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{kind} error in {file}:{where}: not valid YAML") from None
    except (_TooLarge, RecursionError) as exc:
        why = exc if isinstance(exc, _TooLarge) else "nested too deeply"
        raise ConfigError(f"{kind} error in {file}: refused: {why}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{kind} error in {file}: expected a mapping of fields at the top level")
    return raw


class _TooLarge(ValueError):
    """A YAML document that would expand past MAX_YAML_NODES values."""


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that a document whose aliases expand past MAX_YAML_NODES
    values (a "billion laughs" file: a few lines that become gigabytes once walked or
    printed) or refer to themselves is refused before any Python object is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under ``node`` with every alias expanded, counted once per distinct node."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:
            raise _TooLarge("an alias refers to a value that contains it")
        return sizes[key]
    sizes[key] = -1  # in progress: meeting it again below is a cycle
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    if size > MAX_YAML_NODES:
        raise _TooLarge(f"its aliases expand to more than {MAX_YAML_NODES} values")
    sizes[key] = size
    return size
