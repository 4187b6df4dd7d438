"""The Markdown result table every benchmark prints (and writes with ``--markdown FILE``)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def markdown_report(intro: str, header: Sequence[str], rows: Sequence[Sequence[str]], path: str | None) -> str:
    """``intro``, a blank line and the table; printed, and written to ``path`` when given."""
    lines = [intro, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if path:
        Path(path).write_text(text + "\n")
    return text
