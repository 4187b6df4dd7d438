"""No module of ours shadows an installed distribution (issue 27).

A folder that can lead ``sys.path`` makes each of its ``*.py`` files a top-level module:
the repository root (``python -m ...`` from a checkout), ``tests/`` (pytest's rootdir
insertion: it has no ``__init__.py``) and ``scripts/`` (``python scripts/x.py``). When
one of those names is also a top-level module of an installed distribution, every import
of that name anywhere in the process -- a library's included -- finds ours:
``benchmarks/kernels.py`` once hid Hugging Face's ``kernels`` from transformers.
``benchmarks/`` is a package (``python -m benchmarks.<name>``) whose scripts refuse to run
as files, so its modules are never top-level.
"""
from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: folders whose files are top-level modules: the root, and each folder of scripts or tests that
#: is not a package (running one of its files, or pytest's rootdir insertion, puts it first)
PATH_FOLDERS = (REPO, *(REPO / f for f in ("benchmarks", "scripts", "tests")
                        if not (REPO / f / "__init__.py").exists()))
OURS = "mmm4rec"   # our own distribution (mmm4rec, data_shards, dist)


def _top_level_names(folder: Path) -> dict[str, Path]:
    """Importable top-level names that ``folder`` provides when it leads sys.path."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix == ".py" and p.stem.isidentifier():
            out[p.stem] = p
        elif p.is_dir() and p.name.isidentifier() and (any(p.glob("*.py")) or (p / "__init__.py").exists()):
            out[p.name] = p                       # a package, or a namespace package
    return out


def _installed_top_level() -> dict[str, set[str]]:
    """Top-level module -> the installed distributions (other than ours) that provide it."""
    return {name: set(dists) - {OURS} for name, dists in importlib.metadata.packages_distributions().items()
            if set(dists) - {OURS}}


def test_no_module_of_ours_shadows_an_installed_distribution():
    installed = _installed_top_level()
    clashes = [f"{path.relative_to(REPO)} is the top-level module {name!r} of {sorted(installed[name])}"
               for folder in PATH_FOLDERS for name, path in _top_level_names(folder).items() if name in installed]
    assert not clashes, "rename these (or make their folder a package run with -m):\n" + "\n".join(clashes)


def test_benchmarks_is_a_package_whose_scripts_refuse_to_run_as_files():
    assert (REPO / "benchmarks" / "__init__.py").is_file()
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
    assert len(scripts) >= 9, scripts
    for script in scripts:
        r = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2, (script, r.stderr[-2000:])
        assert r.stderr.strip() == (f"run it as a module from the repository root: python -m benchmarks.{script.stem} "
                                    "..."), r.stderr[-2000:]
        assert r.stdout == "", r.stdout[-2000:]


def _path_inserts(path: Path) -> list[str]:
    """The argument source of every ``sys.path.insert(...)`` / ``sys.path.append(...)``."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append") and ast.unparse(node.func.value) == "sys.path"):
            out.append(ast.unparse(node.args[-1]))
    return out


def test_no_test_or_benchmark_puts_a_subfolder_first_on_sys_path():
    """Only the repository root (or a baseline commit's extracted tree) may be put on
    sys.path by our code: a sub-folder there would make its files top-level modules."""
    bad = [f"{p.relative_to(REPO)}: sys.path gets {arg}" for folder in ("tests", "benchmarks", "scripts")
           for p in sorted((REPO / folder).rglob("*.py")) for arg in _path_inserts(p)
           if "/" in arg or any(s in arg for s in ('"benchmarks"', '"scripts"', '"tests"', "'benchmarks'"))]
    assert not bad, "\n".join(bad)
