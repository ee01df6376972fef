"""Hostile and broken spec files: refused fast with a SpecError that names the file, the line or the rule."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from rayquant.jobs.spec import JobSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]

# the classic "billion laughs": ~430 bytes that expand to 10⁹ list items
ALIAS_BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
) + "\n"


def _spec_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_alias_bomb_is_refused_in_milliseconds_naming_the_line(tmp_path: Path):
    assert len(ALIAS_BOMB) < 500
    path = _spec_file(tmp_path, ALIAS_BOMB)
    t = time.perf_counter()
    with pytest.raises(SpecError) as err:
        load_spec(path, ["quant.bits=8"])  # a --set used to copy the expanded tree through JSON
    assert time.perf_counter() - t < 1.0
    assert str(err.value).startswith(f"spec file {path}, line 1: YAML anchors and aliases")
    assert "write the values out" in str(err.value)


@pytest.mark.parametrize("text, line", [
    ("quant: &q {bits: 8}\n", 1),
    ("base: {bits: 8}\nquant:\n  <<: *q\n", 3),  # an alias without its anchor is refused all the same
    ("name: x\nquant: {bits: 8}\ncalibration:\n  seed: 1\n  n_samples: &n 64\n", 5),
])
def test_any_anchor_or_alias_is_refused(tmp_path: Path, text: str, line: int):
    with pytest.raises(SpecError, match=f"line {line}: YAML anchors and aliases"):
        load_spec(_spec_file(tmp_path, text))


def test_alias_in_a_set_value_is_refused():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["quant.overrides=[&a {pattern: x, bits: 8}, *a]"])
    assert "--set 'quant.overrides=" in str(err.value) and "anchors and aliases" in str(err.value)


@pytest.mark.parametrize("text, key, line", [
    ("name: a\nquant:\n  bits: 4\nname: b\n", "name", 4),
    ("quant:\n  bits: 4\n  group_size: 64\n  bits: 8\n", "bits", 4),
])
def test_a_repeated_key_is_refused_naming_key_and_line(tmp_path: Path, text: str, key: str, line: int):
    with pytest.raises(SpecError) as err:
        load_spec(_spec_file(tmp_path, text))
    assert f"line {line}: key '{key}' appears twice in one section; keep one" in str(err.value)


def test_same_key_in_two_sections_is_fine(tmp_path: Path):
    spec = load_spec(_spec_file(tmp_path, "quant:\n  moe:\n    min_tokens: 3\ncalibration:\n  seed: 3\n"))
    assert (spec.quant.moe.min_tokens, spec.calibration.seed) == (3, 3)


def test_binary_file_is_refused_naming_the_file(tmp_path: Path):
    path = _spec_file(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert f"spec file {path} is not UTF-8 text (byte 0 is 0x89)" in str(err.value)
    assert "pass the path of a job spec YAML" in str(err.value)


def test_directory_and_unreadable_paths_are_refused_naming_the_fix(tmp_path: Path):
    with pytest.raises(SpecError, match=f"spec file {re.escape(str(tmp_path))} is a directory; pass the path"):
        load_spec(tmp_path)
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)  # unreadable for any user, root included
    with pytest.raises(SpecError) as err:
        load_spec(loop)
    assert f"spec file {loop} cannot be read (" in str(err.value) and "check its permissions" in str(err.value)


def test_huge_or_endless_file_is_refused_before_parsing(tmp_path: Path):
    path = _spec_file(tmp_path, "# " + "x" * (2 << 20) + "\nname: x\n")
    with pytest.raises(SpecError, match="larger than any job spec"):
        load_spec(path)
    t = time.perf_counter()
    with pytest.raises(SpecError, match="spec file /dev/zero is larger than any job spec"):
        load_spec(Path("/dev/zero"))
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("name", [
    "", "-leading-dash", "../../etc", "a/b", "two words", "# Title\n<script>alert(1)</script>", "x" * 101,
    "tiny]](javascript:alert(1))",
])
def test_unsafe_names_are_refused_naming_the_rule(tmp_path: Path, name: str):
    with pytest.raises(SpecError) as err:
        load_spec(_spec_file(tmp_path, yaml.safe_dump({"name": name})))
    assert "name: name=" in str(err.value)
    assert "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit" in str(err.value)


def test_safe_names_pass():
    for name in ("a", "Llama-3.1-8B_w4g128", "x" * 100):
        assert load_spec(None, [f"name={name}"]).name == name


def test_every_shipped_spec_and_the_readme_spec_have_valid_names():
    specs = [p for p in sorted((REPO / "jobs" / "specs").glob("*.yaml")) if "recipes" not in yaml.safe_load(p.read_text())]
    assert len(specs) >= 3  # job specs; a schedule's job names are <source>-<recipe>, checked when it is built
    names = [load_spec(path).name for path in specs]
    readme = (REPO / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)]
    names += [load_spec(None, [f"name={b['name']}"]).name for b in blocks if isinstance(b, dict) and "model" in b]
    assert "tiny-llama-w4g128" in names and "tiny-mixtral-w4g128" in names
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", n) for n in names), names


def test_trust_remote_code_is_refused_explaining_what_rayquant_runs():
    with pytest.raises(SpecError) as err:
        load_spec(None, ["model.trust_remote_code=true"])
    message = str(err.value)
    assert "model.trust_remote_code: model.trust_remote_code=true is not supported" in message
    assert "never runs model code from a checkpoint" in message and "…ForCausalLM" in message
    assert "set model.trust_remote_code: false" in message
    assert load_spec(None, ["model.trust_remote_code=false"]).model.trust_remote_code is False

