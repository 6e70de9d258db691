"""Bad input: one clear line on stderr, exit status 2, and nothing written to the database."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.search.config import ConfigError, load_config, read_mapping
from evomerge.search.app.merge_file import load_merge_file
from tests.helpers import run_evomerge, write_config
from evomerge.workers.sources import SourceError, SourceModel, load_tensors, validate_sources


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_evomerge(*args, cwd=cwd, timeout=timeout)


def _assert_usage_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("patch, fragments", [
    ({"merge": {"method": "frobnicate"}}, ["merge.method", "unknown merge method 'frobnicate'"]),
    ({"budget": {"max_trials": 0}}, ["budget.max_trials"]),
    ({"colour": "blue"}, ["colour", "unknown field"]),
    ({"base_model": "nobody"}, ["base_model 'nobody' is not one of the models"]),
    ({"merge": {"method": "ties", "ranges": {"gamma": [0, 1]}}}, ["ties has no parameter 'gamma'"]),
    ({"space": "ps+dfs", "dfs": {"models": ["a", "base"]}}, ["dfs.models", "add 'ps'"]),
    ({"space": "dfs", "dfs": {"models": ["a", "ghost"]}}, ["dfs.models", "'ghost' is not one of the models"]),
])
def test_bad_config(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path,
                    patch: dict[str, object], fragments: list[str]) -> None:
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks, **patch)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, str(cfg), *fragments)
    assert not (tmp_path / "x.db").exists()


def test_not_yaml_and_missing_config(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("models: [unclosed\n")
    _assert_usage_error(run_cli("search", "c.yaml", cwd=tmp_path), "not valid YAML")
    _assert_usage_error(run_cli("search", "nope.yaml", cwd=tmp_path), "config file not found")


def test_missing_model_folder(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"base": tiny_models["base"], "gone": tmp_path / "no-such-model"},
                       tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "model 'gone'", "folder not found")
    assert not (tmp_path / "x.db").exists()


def test_models_of_different_shapes(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", {"base": tiny_models["base"], "wide": tiny_models["wide"]}, tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "'base'", "'wide'", "hidden_size")
    assert not (tmp_path / "x.db").exists()


def test_missing_task_data(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(tiny_tasks, tasks)
    (tasks / "data" / "tiny_sub_heldout.jsonl").unlink()
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", cwd=tmp_path)
    _assert_usage_error(proc, "task 'tiny_sub'", "data file not found")
    assert not (tmp_path / "x.db").exists()


def test_bad_storage_url_and_unknown_study(tmp_path: Path) -> None:
    from evomerge.storage.repository import Repository

    _assert_usage_error(run_cli("status", "--storage", "nosuchdb://x", cwd=tmp_path), "not a usable SQLAlchemy URL")
    Repository(f"sqlite:///{tmp_path / 'e.db'}").create_study("other", "{}")
    _assert_usage_error(run_cli("status", "--storage", f"sqlite:///{tmp_path / 'e.db'}", "--study", "s",
                                cwd=tmp_path), "no study 's'")


def test_source_checks(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    # Same architecture but a tensor missing.
    lacking = tmp_path / "lacking"
    shutil.copytree(tiny_models["a"], lacking)
    tensors = load_tensors("a", lacking, torch.float32)
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, lacking / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=f"model 'lacking' lacks tensor {dropped}"):
        validate_sources([SourceModel("base", str(tiny_models["base"])), SourceModel("lacking", str(lacking))])
    # A truncated file.
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["a"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="corrupt safetensors file"):
        validate_sources([SourceModel("base", str(tiny_models["base"])), SourceModel("broken", str(broken))])
    # A pickle checkpoint is refused, not loaded.
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["a"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safetensors only"):
        validate_sources([SourceModel("pickled", str(pickled))])
    # Non-finite weights are refused at load.
    nan = tmp_path / "nan"
    shutil.copytree(tiny_models["a"], nan)
    tensors = load_tensors("a", nan, torch.float32)
    key = sorted(tensors)[0]
    tensors[key][0] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SourceError, match=f"tensor {key} holds NaN"):
        load_tensors("nan", nan, torch.float32)


def test_stored_config_that_no_longer_validates(tmp_path: Path) -> None:
    """A study row whose config this version cannot read (another version wrote it): replay
    says so in one line, exit 2, and writes nothing."""
    from evomerge.storage.repository import Repository

    Repository(f"sqlite:///{tmp_path / 's.db'}").create_study("old", '{"study": "old", "models": [], "colour": 1}')
    proc = run_cli("replay", "--storage", f"sqlite:///{tmp_path / 's.db'}", "--out", str(tmp_path / "m"), cwd=tmp_path)
    _assert_usage_error(proc, "stored config of study 'old' does not validate", "models")
    assert not (tmp_path / "m").exists()


def test_nan_source_is_refused_before_anything_is_written(tmp_path: Path, tiny_models: dict[str, Path],
                                                          tiny_tasks: Path) -> None:
    """A finite-weights scan at prepare time: one line naming the tensor, no study, no
    candidate (it used to write a study and 5 candidates, then exit 1 with a cut Ray message)."""
    nan = tmp_path / "nan"
    shutil.copytree(tiny_models["a"], nan)
    tensors = load_tensors("a", nan, torch.float32)
    key = sorted(tensors)[-1]
    tensors[key].view(-1)[-1] = float("nan")
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    cfg = write_config(tmp_path / "c.yaml", {"base": tiny_models["base"], "nan": nan}, tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--max-trials", "2",
                   cwd=tmp_path)
    _assert_usage_error(proc, f"model 'nan': tensor {key} holds NaN or inf")
    assert not (tmp_path / "x.db").exists()


BAD_STUDY_NAMES = [
    ("demo:heldout", "ends with ':heldout', reserved for the companion studies"),
    ("demo:dfs", "ends with ':dfs', reserved for the companion studies"),
    ("s" * 300, "study name of 300 characters; at most 251"),
]


@pytest.mark.parametrize("study, fragment", [BAD_STUDY_NAMES[0], BAD_STUDY_NAMES[2]])
def test_bad_study_option(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, study: str,
                          fragment: str) -> None:
    """--study demo:heldout used to write search trials into the held-out companion; 300
    characters were a raw DataError with SQL on PostgreSQL (and accepted by SQLite)."""
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks)
    proc = run_cli("search", str(cfg), "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--study", study,
                   "--max-trials", "2", cwd=tmp_path)
    _assert_usage_error(proc, "--study", fragment)
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("study, fragment", BAD_STUDY_NAMES)
def test_bad_study_field(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, study: str,
                         fragment: str) -> None:
    with pytest.raises(ConfigError, match=r"s\.yaml: study: .*" + fragment.replace("(", r"\(")):
        load_config(write_config(tmp_path / "s.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks,
                                 study=study))


@pytest.mark.parametrize("section, field, value", [
    ("evaluation", "batch_size", True), ("evaluation", "limit", 2.0), ("workers", "count", True),
    ("workers", "threads", "2"), ("workers", "num_gpus", True),
])
def test_numbers_are_strict(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, section: str,
                            field: str, value: object) -> None:
    """YAML's `true` is not the number 1 (batch_size: true used to become 1), nor 2.0 an int."""
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks)
    raw = yaml.safe_load(cfg.read_text())
    raw[section][field] = value
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=f"{section}.{field}: Input should be a valid"):
        load_config(cfg)


def _alias_bomb(top: str) -> str:
    """Nine levels of nine aliases: 9**9 (387 M) strings once expanded, a few hundred bytes here."""
    lines = [top, "anchors:", '  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "\n".join([*lines, "base_model: *a8", "models: [{model: x}]"]) + "\n"


def test_yaml_alias_bomb_is_refused_by_the_one_reader(tmp_path: Path) -> None:
    """read_mapping, the reader of search configs and merge files (evomerge and mergekit),
    refuses a document whose aliases expand past a bound, before building it; `evomerge
    merge` used to build a 226 MB error line and 1.35 GB of memory from such a file."""
    for name, kind in (("merge.yaml", "merge file"), ("c.yaml", "config")):
        (tmp_path / name).write_text(_alias_bomb("merge_method: linear" if kind == "merge file" else "study: s"))
        with pytest.raises(ConfigError, match=f"{kind} error in .*{name}: refused: its aliases expand to more than"):
            read_mapping(tmp_path / name, kind)
    (tmp_path / "loop.yaml").write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="an alias refers to a value that contains it"):
        read_mapping(tmp_path / "loop.yaml", "config")
    shared = read_mapping(_write(tmp_path / "ok.yaml", "x: &x {a: 1}\ny: [*x, *x]\n"), "config")
    assert shared == {"x": {"a": 1}, "y": [{"a": 1}, {"a": 1}]}  # a few aliases are fine
    proc = run_cli("merge", str(tmp_path / "merge.yaml"), "--out", str(tmp_path / "m"), cwd=tmp_path)
    _assert_usage_error(proc, "refused: its aliases expand to more than")
    assert len(proc.stderr) < 500 and not (tmp_path / "m").exists()
    # Below the bound, a mergekit error quoting a long value is still one short line.
    long = _write(tmp_path / "long.yaml", f"merge_method: linear\nbase_model: [{', '.join(['lol'] * 50_000)}]\n"
                  "models: [{model: x}]\n")
    with pytest.raises(ConfigError, match="unsupported model reference") as info:
        load_merge_file(long)
    assert len(str(info.value)) < 500


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
