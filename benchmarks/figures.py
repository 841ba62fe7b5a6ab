"""Figure blocks: the tables a benchmark prints for README.md and docs/*.md to quote.

A benchmark prints each documented figure between two marker lines::

    <!-- figure: serving-kernels -->
    | layer | 50 % | ... |
    <!-- /figure -->

and ``make bench`` (``tools/run_benchmarks.py``) copies the block into every README / docs file
that holds the same markers, with a line saying where and when it was measured. The docs' text
around a block refers to the table instead of repeating its numbers, so a new run cannot leave
a stale figure behind.

Example:
    >>> print(md_table(["model", "speedup"], [["MiniLM", "1.92x"]]))
    | model | speedup |
    |---|---|
    | MiniLM | 1.92x |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

START = "<!-- figure: {} -->"
END = "<!-- /figure -->"
FIGURE_ID = re.compile(r"[a-z0-9][a-z0-9-]*")
BLOCK = re.compile(r"^<!-- figure: ([a-z0-9][a-z0-9-]*) -->\n(.*?)^<!-- /figure -->$", re.S | re.M)


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells converted with ``str``; ``|`` inside a cell escaped)."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells like the header {list(header)}")

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def figure(fig_id: str, markdown: str) -> str:
    """Print ``markdown`` as the figure block ``fig_id`` (and return what was printed)."""
    if not FIGURE_ID.fullmatch(fig_id):
        raise ValueError(f"figure id {fig_id!r}: use lower-case letters, digits and '-'")
    text = f"{START.format(fig_id)}\n{markdown.strip()}\n{END}"
    print(text, flush=True)
    return text


def blocks(text: str) -> dict[str, str]:
    """Every figure block in ``text``: id -> its content (without the markers); the last block
    of an id wins (a benchmark that prints a figure twice means the later one)."""
    return {m.group(1): m.group(2).strip() for m in BLOCK.finditer(text)}


def replace_blocks(doc: str, new: dict[str, str], note: str) -> tuple[str, list[str]]:
    """``doc`` with each of its blocks whose id is in ``new`` replaced by the new content and
    ``note`` (an italic provenance line) under it; also returns the ids replaced."""
    done: list[str] = []

    def swap(m: re.Match[str]) -> str:
        fig_id = m.group(1)
        if fig_id not in new:
            return m.group(0)
        done.append(fig_id)
        return f"{START.format(fig_id)}\n{new[fig_id]}\n\n*{note}*\n{END}"

    return BLOCK.sub(swap, doc), done
