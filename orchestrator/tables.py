"""The tables bdo prints and logs (study matrix, blind-vs-oracle comparison, `bdo report`) in every format they
come in, from values already collected: nothing here reads MLflow, so a study renders its in-memory table and
`bdo report` its read-back one with the same code."""

from __future__ import annotations

import csv
import io
import math

METRICS = ("acc", "asr", "ra", "der")
# the study run's tags that list the attack runs of the columns without a defense
ATTACK_COLUMNS = {"no_defense_run_ids": "no defense", "clean_run_ids": "clean model"}


# An attack run reports papers_regime 0 when its configuration lies outside the range its papers evaluated
# (methods/attacks/configs/shared.py); its row is marked so that nobody reads the cell as that paper's attack.
PAPERS_REGIME = "papers_regime"
OUTSIDE_PAPERS_MARK = "*"
OUTSIDE_PAPERS_NOTE = (
    "* not the papers' attack: its configuration lies outside the range its papers evaluated "
    "(see the runs' papers_regime and their log)"
)


def outside_papers(regimes: list) -> bool:
    """Whether any of the attack runs behind a cell reported a configuration outside its papers' range."""
    return any(value == 0.0 for value in regimes)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; the one rule for study and report."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)


def in_order(names: set[str], order: list[str]) -> list[str]:
    return [n for n in order if n in names] + sorted(names - set(order))


def render(attacks: list[str], columns: list[str], cells: dict, metrics: list[str], fmt: str) -> str:
    def text(cell) -> str:
        if cell is None:
            return "-"
        # a metric a column cannot have (DER of a model no defense touched) shows as "-"
        parts = [
            f"{100 * cell[m][0]:.1f}±{100 * cell[m][1]:.1f}" if not math.isnan(cell[m][0]) else "-" for m in metrics
        ]
        extra = f" (seeds {cell['seeds']}" + (f", trials {cell['trials']})" if cell["trials"] else ")")
        return " / ".join(parts) + extra

    marked = {a for a in attacks if any((cells.get((a, c)) or {}).get("outside_papers") for c in columns)}
    header = ["attack"] + columns
    rows = [
        [a + (OUTSIDE_PAPERS_MARK if a in marked else "")] + [text(cells.get((a, c))) for c in columns] for a in attacks
    ]
    caption = "cells: test " + " / ".join(m.upper() for m in metrics) + " in %, mean±std over seeds"
    if marked:
        caption += "; " + OUTSIDE_PAPERS_NOTE
    if fmt == "runs-csv":  # the raw values behind every mean: one row per run
        raw = [
            [a, c, seed, run_id, *(values[m] for m in metrics)]
            for a in attacks
            for c in columns
            for seed, run_id, values in (cells.get((a, c)) or {}).get("runs", [])
        ]
        return format_rows(["attack", "defense", "seed", "run_id", *(f"test_{m}" for m in metrics)], raw, "", "csv")
    return format_rows(header, rows, caption, fmt)


def format_rows(header: list[str], rows: list[list], caption: str, fmt: str) -> str:
    """A table in one of the report's formats (md with its caption below, csv, html, latex)."""
    columns = header[1:]
    if fmt == "latex":

        def tex(value: str) -> str:
            return value.replace("±", r"$\pm$").replace("%", r"\%").replace("_", r"\_")

        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\begin{tabular}{l" + "c" * len(columns) + "}",
            r"\toprule",
            " & ".join(tex(h) for h in header) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(tex(cell) for cell in r) + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{tex(caption)}}}", r"\end{table}"]
        return "\n".join(lines) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "html":
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        head = "".join(f"<th>{h}</th>" for h in header)
        return f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n{caption}\n"
