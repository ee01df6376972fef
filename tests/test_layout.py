"""No top-level folder of the repository hides a module of an installed distribution.

`python -m pytest`, `python -m tests.bench.…` and a user's script run from a clone put the repository
root first on sys.path. A top-level folder that is a regular package (has `__init__.py`) then wins
over any installed module of the same name: `kernels/` once hid Hugging Face's `kernels`, which
transformers ≥ 5.25 imports. The folders are namespace portions instead: Python takes a regular
package or module from anywhere on sys.path before it falls back to a namespace portion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs with `root` first on sys.path, as `python -m` from the root does; prints where each name resolves.
_RESOLVE = """
import importlib.util, json, sys
root, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, root)
found = {}
for name in names:
    spec = importlib.util.find_spec(name)
    found[name] = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
print(json.dumps(found))
"""


def top_level_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isidentifier())


def shadowed_modules(root: Path) -> dict[str, list[str]]:
    """Top-level folders of `root` that win over an installed distribution's module of the same name,
    mapped to the distributions they hide."""
    installed = {name: dists for name, dists in packages_distributions().items() if "rayquant" not in dists}
    names = [name for name in top_level_folders(root) if name in installed]
    if not names:
        return {}
    out = subprocess.run([sys.executable, "-c", _RESOLVE, str(root), *names], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    resolved = json.loads(out)
    # under the folder itself: a virtual environment inside the root (.venv/) holds the installed ones
    return {name: installed[name] for name, places in resolved.items()
            if any(Path(p).resolve().is_relative_to((root / name).resolve()) for p in places)}


def test_no_top_level_folder_is_a_regular_package() -> None:
    packages = [name for name in top_level_folders(REPO) if (REPO / name / "__init__.py").exists()]
    assert packages == [], f"{packages} would shadow an installed module of that name: remove __init__.py"


def test_no_top_level_folder_hides_an_installed_module() -> None:
    assert shadowed_modules(REPO) == {}


def test_a_regular_package_folder_is_caught_and_a_namespace_folder_is_not(tmp_path: Path) -> None:
    # pyyaml's `yaml` is always installed (a rayquant dependency)
    (tmp_path / "yaml").mkdir()
    (tmp_path / "structlog").mkdir()
    assert shadowed_modules(tmp_path) == {}  # namespace portions lose to the installed packages
    (tmp_path / "yaml" / "__init__.py").write_text("")
    assert shadowed_modules(tmp_path) == {"yaml": packages_distributions()["yaml"]}
