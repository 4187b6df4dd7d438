"""Every ``--set KEY=VALUE`` example in the documentation (docs/, README.md, slurm/,
configs/) names a real field and parses: examples cannot drift from the config schema
(issue 10 found ``--set train.lr=...`` where the field is ``train.optimizer.lr``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist.config import load_experiment
from mmm4rec.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "tiny_finetune.yaml"
SET_RE = re.compile(r"""--set[ =]+["']?([A-Za-z_][\w.]*)=([^\s"'`)\]]*)""")
#: values that stand for "your value here" in the docs
PLACEHOLDER_RE = re.compile(r"^(\.\.\.|…|<.*|\$.*|[A-Z][A-Z_]*)$|^[A-Z][A-Z_]*/|…|\.\.\.$")
PLACEHOLDER = "<placeholder>"
STAND_INS = ("placeholder", "1", "true")    # a placeholder stands for a value of the field's type
URL_DATA = ["data.sample=null", "data.url=shards/example"]
GENERIC_KEYS = {"k", "key", "KEY"}     # the syntax itself: --set KEY=VALUE


def _doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "slurm").iterdir()),
             *sorted((REPO / "configs").glob("*.yaml"))]
    return [f for f in files if f.is_file()]


def _examples() -> list[tuple[str, list[str]]]:
    """(where, [key=value, ...]) for every line with --set examples (one line's sets together)."""
    out = []
    for f in _doc_files():
        for n, line in enumerate(f.read_text().splitlines(), 1):
            sets = []
            for key, value in SET_RE.findall(line):
                value = value.rstrip(".,;:")     # sentence punctuation after an inline example
                if key in GENERIC_KEYS:
                    continue
                if not value or PLACEHOLDER_RE.search(value):
                    value = PLACEHOLDER
                sets.append(f"{key}={value}")
            if sets:
                out.append((f"{f.relative_to(REPO)}:{n}", sets))
    return out


EXAMPLES = _examples()


def test_examples_are_found():
    where = {w.split(":")[0] for w, _ in EXAMPLES}
    assert {"README.md", "docs/training.md", "docs/slurm.md", "slurm/finetune.sh"} <= where


def _parses(sets: list[str]) -> str | None:
    """None if some stand-in for the placeholders makes ``sets`` load, else the first error."""
    first = None
    for stand_in in STAND_INS:
        try:
            load_experiment(BASE, [kv.replace(PLACEHOLDER, stand_in) for kv in sets])
            return None
        except ConfigError as e:
            first = first or str(e)
        if not any(PLACEHOLDER in kv for kv in sets):
            break
    return first


@pytest.mark.parametrize("where,sets", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_set_example_parses_against_the_schema(where, sets):
    """A line's sets are one command, or (a table row) separate examples: either parses."""
    together = _parses(sets)
    if together is None:
        return
    for one in sets:
        errors = []
        for context in ([], URL_DATA):      # the base config names a bundled sample; a url variant
            err = _parses([*context, one])
            if err is None:
                break
            errors.append(err)
        else:
            pytest.fail(f"{where}: --set {one}: {errors[0]} (together with the line's other sets: {together})")


def test_a_wrong_key_is_caught():
    with pytest.raises(ConfigError, match="train.lr"):
        load_experiment(BASE, ["train.lr=5e-4"])
