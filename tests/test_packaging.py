"""The repository's own top-level packages against every installed distribution's import names.

A script run from the repository root (`python train_rl.py`, pytest) has the root first on sys.path, so a folder
there named like another distribution's package shadows it for every importer. transformers 5.25 requires the
`kernels` distribution and imports it at `import transformers`: our Triton folder, then `kernels/`, shadowed it and
no entry point started (`ImportError: cannot import name 'CUDAProperties' from 'kernels'`). It is `tagpr_kernels/`
since."""

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ours() -> list[str]:
    """[tool.setuptools] packages in pyproject.toml."""
    line = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return re.findall(r'"([^"]+)"', line)


def clashes(names, owners) -> dict[str, list[str]]:
    """{our top-level name: the other distributions that install a package of that name} (empty: no clash)."""
    others = {n: sorted(d for d in owners.get(n, []) if d.lower() != "tagpr") for n in names}
    return {n: ds for n, ds in others.items() if ds}


def test_clashes_finds_a_shadowed_distribution():
    owners = {"kernels": ["kernels"], "tagpr": ["tagpr"], "yaml": ["PyYAML"]}
    assert clashes(["tagpr", "kernels"], owners) == {"kernels": ["kernels"]}
    assert clashes(["tagpr", "tagpr_kernels"], owners) == {}


def test_no_top_level_package_of_ours_shadows_an_installed_one():
    names = ours()
    assert names == ["tagpr", "tagpr_kernels"]
    assert all((ROOT / n / "__init__.py").is_file() for n in names)
    assert clashes(names, importlib.metadata.packages_distributions()) == {}


def test_transformers_imports_from_the_repository_root():
    # what every entry point does first; with a shadowed dependency this raised at import
    r = subprocess.run(
        [sys.executable, "-c", "import transformers.activations, tagpr_kernels.logprob"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
