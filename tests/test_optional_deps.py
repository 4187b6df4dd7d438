"""Optional dependencies (the extras of pyproject.toml) fail with their real cause.

"Install the extra" is said only when the module itself is not installed; a module that
is installed but fails to import (a dependency of it missing, a module of ours shadowing
one it imports, a binary mismatch) is reported as what it is: one line naming the module
and the error, exit 2, the traceback with ``--traceback``. Issue 27: benchmarks/kernels.py
shadowed Hugging Face's ``kernels``, transformers failed to import it, and the message sent
users to reinstall the 'features' extra that was installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmm4rec.errors import OptionalDependencyError, UserError, import_optional

REPO = Path(__file__).resolve().parents[1]
SHADOWED = "from kernels import CUDAProperties  # what transformers' hub_kernels.py imports\n"


def _fake_package(root: Path, name: str, body: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return root


def _fake_kernels(root: Path) -> None:
    """A ``kernels`` module without ``CUDAProperties``: what benchmarks/kernels.py was."""
    (root / "kernels.py").write_text("SHAPES = ()\n")


def test_a_missing_module_names_the_extra():
    with pytest.raises(OptionalDependencyError) as e:
        import_optional("no_such_module_mmm4rec_test", "features", "encoding item text")
    assert str(e.value) == ("encoding item text needs the 'features' extra: pip install \"mmm4rec[features]\" "
                            "(no_such_module_mmm4rec_test is not installed)")
    assert isinstance(e.value, UserError) and isinstance(e.value, ImportError)


def test_a_missing_parent_package_names_the_extra():
    with pytest.raises(OptionalDependencyError, match=r"needs the 'plots' extra"):
        import_optional("no_such_pkg_mmm4rec_test.pyplot", "plots", "plotting")


def test_a_module_whose_own_import_fails_is_reported_as_broken(tmp_path, monkeypatch):
    _fake_kernels(tmp_path)
    _fake_package(tmp_path, "fake_st_mmm4rec", SHADOWED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(OptionalDependencyError) as e:
        import_optional("fake_st_mmm4rec", "features", "encoding item text")
    msg = str(e.value)
    assert "extra" not in msg and "pip install" not in msg, msg
    assert msg.startswith("fake_st_mmm4rec is installed but failed to import: ImportError: cannot import name "
                          "'CUDAProperties' from 'kernels'"), msg


def test_a_missing_dependency_of_an_installed_module_is_not_called_a_missing_extra(tmp_path, monkeypatch):
    _fake_package(tmp_path, "fake_st2_mmm4rec", "import no_such_dependency_mmm4rec_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(OptionalDependencyError) as e:
        import_optional("fake_st2_mmm4rec", "features", "encoding item text")
    assert "extra" not in str(e.value) and "No module named 'no_such_dependency_mmm4rec_test'" in str(e.value)


def test_text_encoder_reports_a_broken_sentence_transformers_not_a_missing_extra(tmp_path, monkeypatch):
    from data_shards import TextEncoder

    _fake_kernels(tmp_path)
    _fake_package(tmp_path, "sentence_transformers", SHADOWED)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "sentence_transformers" or m.startswith("sentence_transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(OptionalDependencyError) as e:
        TextEncoder().model()
    assert "sentence_transformers is installed but failed to import" in str(e.value), str(e.value)
    assert "CUDAProperties" in str(e.value) and "features' extra" not in str(e.value)


def test_text_encoder_names_the_features_extra_when_sentence_transformers_is_absent(monkeypatch):
    from data_shards import TextEncoder

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)   # import raises ModuleNotFoundError
    with pytest.raises(OptionalDependencyError, match=r"encoding item text needs the 'features' extra: "
                                                      r"pip install \"mmm4rec\[features\]\""):
        TextEncoder().model()


def test_the_cli_prints_one_line_with_the_real_cause_and_exits_2(tmp_path):
    """``mmm4rec data build`` with a broken sentence_transformers (its import fails the way
    transformers' did when benchmarks/kernels.py shadowed ``kernels``), and an empty text
    cache so that the encoder must load: exit 2, one line, the real cause; the traceback
    with ``--traceback``."""
    fake = tmp_path / "site"
    fake.mkdir()
    _fake_kernels(fake)
    _fake_package(fake, "sentence_transformers", SHADOWED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               MMM4REC_CACHE=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "dist", "data", "build", "--format", "lcrec",
            "--input", str(REPO / "data" / "samples" / "office"), "--out", str(tmp_path / "shards")]
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]   # not the progress bar
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("mmm4rec data: error: sentence_transformers is installed but failed to import: "
                               "ImportError: cannot import name 'CUDAProperties' from 'kernels'"), lines[0]
    assert "extra" not in lines[0]
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").rglob("*.tar"))
    r2 = subprocess.run([*argv, "--traceback"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 2 and "Traceback (most recent call last)" in r2.stderr, r2.stderr[-3000:]
    assert r2.stderr.strip().splitlines()[-1] == lines[0]


def test_s3_without_s3fs_names_the_s3_extra(monkeypatch):
    from data_shards.storage import make_fs

    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(OptionalDependencyError, match=r"s3:// storage needs the 's3' extra"):
        make_fs("s3://bucket/shards", {})


def test_serving_without_faiss_names_the_serve_extra(monkeypatch):
    from dist.serving import index

    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(OptionalDependencyError, match=r"needs the 'serve' extra"):
        index.faiss()


def test_no_matplotlib_costs_the_plot_not_the_run(tmp_path, monkeypatch, capsys):
    from dist.curves import plot_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_curves({"a": [{"epoch": 1, "ndcg@10": 0.1}]}, ["ndcg@10"], tmp_path / "c.png", "t") is None
    assert "no plot: plotting needs the 'plots' extra" in capsys.readouterr().out
