"""Rows (lists of flat dicts) -> ASCII and markdown tables."""

from __future__ import annotations


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None, style: str = "ascii") -> str:
    """Render rows as an ASCII grid (the reference study's style) or a markdown table.

    >>> print(format_table([{"model": "a", "ms": 1.5}], style="markdown"))
    | model | ms |
    |---|---|
    | a | 1.5 |
    """
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    if style == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+"

    def line(values):
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    return "\n".join([rule, line(columns), rule, *(line(values) for values in cells), rule])
