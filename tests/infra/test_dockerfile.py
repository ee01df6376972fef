"""infra/Dockerfile, read with the Docker build's own parser (the `dockerfile` package wraps BuildKit's Go
parser). Building it needs docker, which the test machines do not have."""

from __future__ import annotations

import re
import tomllib

import dockerfile

from tests.infra.manifests import DOCKERFILE, ROOT

INSTRUCTIONS = dockerfile.parse_file(str(DOCKERFILE))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
IGNORE_FILE = DOCKERFILE.with_name("Dockerfile.dockerignore")  # BuildKit's per-Dockerfile ignore file
CREDENTIAL_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY", re.IGNORECASE)


def _args(cmd: str) -> list[tuple[str, ...]]:
    return [i.value for i in INSTRUCTIONS if i.cmd.upper() == cmd]


def _copy_sources() -> list[str]:
    return [src for i in INSTRUCTIONS if i.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in i.flags)
            for src in i.value[:-1]]


def test_every_instruction_is_a_dockerfile_instruction_and_from_comes_first():
    assert [i for i in INSTRUCTIONS if i.cmd.lower() not in dockerfile.all_cmds()] == []
    assert INSTRUCTIONS[0].cmd.upper() == "FROM"


def test_base_is_a_python_3_11_or_3_12_cuda_image():
    (base,) = _args("FROM")
    assert re.fullmatch(r"rayproject/ray:[0-9.]+-py31[12]-gpu", base[0]), base


def test_every_copied_path_exists_and_is_sent_with_the_build_context():
    ignore = [line.strip() for line in IGNORE_FILE.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # everything is left out but the paths re-included below
    sources = _copy_sources()
    assert [s for s in sources if not (ROOT / s).exists()] == []
    assert [s for s in sources if f"!{s}" not in ignore] == []


def test_the_image_copies_every_package_folder_pip_install_dot_needs():
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = set(setuptools["package-dir"].values()) | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    assert needed - set(_copy_sources()) == set()


def test_pip_installs_the_project_with_the_tested_cuda_torch():
    (torch_arg,) = [a[0] for a in _args("ARG") if a[0].startswith("TORCH_VERSION=")]
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.replace(" ", "").startswith("torch"))
    assert f"<={torch_arg.split('=', 1)[1]}" in torch_pin.replace(" ", "")
    (install,) = [r[0] for r in _args("RUN") if "pip install" in r[0]]
    assert re.search(r'pip install --no-cache-dir "torch==\$\{TORCH_VERSION\}" \.(\s|$)', install), install
    assert "torch.version.cuda" in install  # the build fails on a CPU wheel


def test_no_credential_is_baked_into_the_image():
    names = [word.split("=", 1)[0] for cmd in ("ENV", "ARG", "LABEL") for value in _args(cmd) for word in value]
    assert names and [n for n in names if CREDENTIAL_NAMES.search(n)] == []
    assert [s for s in _copy_sources() if s.startswith(".") and s not in {".", "./"}] == []
