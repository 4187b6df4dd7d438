"""One error policy for every entry point (mmm4rec/errors.py): a user error prints one line
naming the cause and exits 2; anything else keeps its traceback and exits 1; ``--traceback``
shows the traceback of a user error too. Each entry point runs as its own process."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: every entry point, as a command line prefix
ENTRY_POINTS = {
    "mmm4rec": [sys.executable, "-m", "dist"],
    "dist/train.py": [sys.executable, str(REPO / "dist" / "train.py")],
    "data_shards.cli": [sys.executable, "-m", "data_shards.cli"],
    "quickstart": [sys.executable, "-m", "dist.quickstart"],
}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)


def _user_error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """(command line, text the one line must hold) of a user error per entry point."""
    missing = tmp_path / "no-such-config.yaml"
    not_shards = tmp_path / "not-shards"
    not_shards.mkdir()
    used = tmp_path / "used-run-dir"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    return {
        "mmm4rec": ([*ENTRY_POINTS["mmm4rec"], "data", "inspect", str(not_shards)], str(not_shards)),
        "mmm4rec serving": ([*ENTRY_POINTS["mmm4rec"], "recommend", str(not_shards), str(missing)],
                            "not a retrieval export"),
        "dist/train.py": ([*ENTRY_POINTS["dist/train.py"], "--config", str(missing)], str(missing)),
        "data_shards.cli": ([*ENTRY_POINTS["data_shards.cli"], "data", "inspect", str(not_shards)], str(not_shards)),
        "quickstart": ([*ENTRY_POINTS["quickstart"], "--run-dir", str(used)], "is not empty"),
    }


@pytest.mark.parametrize("entry", ["mmm4rec", "mmm4rec serving", "dist/train.py", "data_shards.cli", "quickstart"])
def test_user_error_is_one_line_and_exit_2_and_traceback_on_request(entry, tmp_path):
    argv, names = _user_error_cases(tmp_path)[entry]
    r = _run(argv, tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert ": error: " in lines[0] and names in lines[0], lines[0]
    # --traceback: the same status and line, after the traceback
    r2 = _run([*argv, "--traceback"], tmp_path)
    assert r2.returncode == 2, r2.stderr[-3000:]
    assert "Traceback (most recent call last)" in r2.stderr, r2.stderr[-3000:]
    assert r2.stderr.strip().splitlines()[-1] == lines[0]
    if entry == "quickstart":
        assert (tmp_path / "used-run-dir" / "keep.txt").read_text() == "mine"


def test_traceback_flag_also_before_the_command(tmp_path):
    argv, _ = _user_error_cases(tmp_path)["mmm4rec"]
    r = _run([*ENTRY_POINTS["mmm4rec"], "--traceback", *argv[len(ENTRY_POINTS["mmm4rec"]):]], tmp_path)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_traceback_flag_is_documented_in_help(entry, tmp_path):
    argv = ENTRY_POINTS[entry] + (["data", "inspect", "--help"] if entry == "data_shards.cli" else ["--help"])
    r = _run(argv, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--traceback" in r.stdout and "exit status 2" in " ".join(r.stdout.split()), r.stdout


@pytest.mark.parametrize("error, status, one_line", [
    ("mmm4rec.config.ConfigError('train.epochs: must be >= 1')", 2, True),
    ("data_shards.errors.DataError('a.csv:3', 'bad id')", 2, True),
    ("FileNotFoundError('x.yaml: no such file')", 2, True),
    ("ValueError('an internal bug, not the user')", 1, False),      # was one line and exit 2 before
    ("RuntimeError('an internal bug')", 1, False),
])
def test_the_policy_tells_user_errors_from_bugs(error, status, one_line, tmp_path):
    mod = error.split("(")[0].rsplit(".", 1)[0] if "." in error.split("(")[0] else None
    code = (f"import sys{f', {mod}' if mod else ''}\n"
            "from mmm4rec.errors import run_command\n"
            "def body():\n"
            f"    raise {error}\n"
            "sys.exit(run_command('prog', body))\n")
    r = _run([sys.executable, "-c", code], tmp_path)
    assert r.returncode == status, r.stderr
    lines = r.stderr.strip().splitlines()
    if one_line:
        assert len(lines) == 1 and lines[0].startswith("prog: error: "), r.stderr
    else:
        assert lines[0] == "Traceback (most recent call last):" and "an internal bug" in lines[-1], r.stderr
