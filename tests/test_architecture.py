"""The layering of the packages (docs/architecture.md) and the lint/type-check coverage.

    mmm4rec leaf (config, paths, errors)  <-  mmm4rec (models, kernels, losses, metrics)
                 ^                                   ^
                 +------------  data_shards  <----  dist (training, serving, quickstart, the CLI)

Static: the import statements of every module, read as text (ast). Dynamic: imports in
a fresh interpreter, so that nothing this test process loaded earlier counts.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mmm4rec", "data_shards", "dist")
#: the leaf: what every package may import (no torch, nothing else of the project)
LEAF = ("mmm4rec.config", "mmm4rec.errors", "mmm4rec.log", "mmm4rec.paths")
#: the typed batch: data_shards builds it (torch, but no model, no kernel, nothing else of the project)
BATCH = "mmm4rec.contract"
#: what each package must not import
FORBIDDEN = {"mmm4rec": ("data_shards", "dist"), "data_shards": ("dist",), "dist": ()}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
    if path.name == "__init__.py":
        mod = mod.rsplit(".", 1)[0] + "._"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = mod.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _module_imports() -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p, pkg)
            for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def test_no_package_imports_upwards():
    bad = [f"{path} imports {name}" for path, names in _module_imports().items()
           for name in sorted(names) for top in FORBIDDEN[path.split("/")[0]]
           if name == top or name.startswith(top + ".")]
    assert not bad, "\n".join(bad)


def test_data_shards_uses_only_the_leaf_and_the_batch_type_of_mmm4rec():
    allowed = (*LEAF, BATCH)
    bad = [f"{path} imports {name}" for path, names in _module_imports().items() if path.startswith("data_shards/")
           for name in sorted(names) if name.startswith("mmm4rec") and name != "mmm4rec"
           and not any(name == ok or name.startswith(ok + ".") for ok in allowed)]
    assert not bad, "\n".join(bad)
    batch = _imports(REPO / "mmm4rec" / "contract.py", "mmm4rec")
    assert not [n for n in batch if n.split(".")[0] in PACKAGES and not n.startswith(LEAF)], batch


def test_the_leaf_imports_nothing_of_the_project():
    for leaf in LEAF:
        path = REPO / (leaf.replace(".", "/") + ".py")
        names = _imports(path, "mmm4rec")
        project = sorted(n for n in names if n.split(".")[0] in PACKAGES and not n.startswith(LEAF)
                         and n not in ("mmm4rec",))
        assert not project, f"{path.name} imports {project}"


def _fresh_modules(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys\n"
                          "print(json.dumps(sorted(m for m in sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_data_shards_loads_neither_the_models_nor_the_kernels():
    mods = _fresh_modules("import data_shards, data_shards.cli")
    assert "data_shards.loader" in mods       # the import really happened
    heavy = sorted(m for m in mods if m.startswith(("mmm4rec.models", "mmm4rec.kernels", "triton", "dist")))
    assert not heavy, heavy


def test_the_leaf_loads_without_torch():
    mods = _fresh_modules("import " + ", ".join(LEAF))
    assert set(LEAF) <= mods
    assert not [m for m in mods if m == "torch" or m.startswith(("torch.", "mmm4rec.models", "data_shards"))]


def test_the_package_still_exports_the_models_on_first_use():
    import mmm4rec

    assert mmm4rec.MMM4Rec.__module__ == "mmm4rec.models.mmm4rec"
    with pytest.raises(AttributeError):
        mmm4rec.NoSuchName  # noqa: B018


def test_ruff_checks_every_python_file_including_dist():
    """ruff's default excludes hold "dist" (a build-output name): our dist/ package must be linted."""
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--show-files", "."], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = {str(Path(line.strip()).resolve().relative_to(REPO)) for line in out.stdout.splitlines()
             if line.strip().endswith(".py")}
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    dist_files = [f for f in tracked if f.startswith("dist/")]
    assert len(dist_files) >= 15
    missing = sorted(set(tracked) - shown)
    assert not missing, f"ruff does not check: {missing}"


def test_the_type_checker_runs_in_the_suite_over_the_core_packages():
    import tomllib

    script = (REPO / "scripts" / "run_tests.sh").read_text()
    assert "$PY -m mypy" in script
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    files = conf["tool"]["mypy"]["files"]
    for core in (*[leaf.replace(".", "/") + ".py" for leaf in LEAF], "data_shards", "mmm4rec/models",
                 "mmm4rec/losses.py", "mmm4rec/metrics.py", "dist"):
        assert core in files, core
    dev = " ".join(conf["project"]["optional-dependencies"]["dev"])
    assert "mypy==" in dev   # pinned
