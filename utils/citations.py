"""Check that every measured figure in the hand-written Markdown is cited to the CSV row(s) under results/ that hold it.

    python -m utils.citations [FILES]     # default: notes/*.md docs/*.md README.md; one line per problem, exit 1 if any

A citation is a bracketed reference right after the figure(s) it covers, with 1-based physical line numbers
of the CSV file (line 1 is the header):

    91.30 ± 0.10% [results/results.csv:L57-61]
    90.93 / 90.98 / 90.96 [results/seeds/ptq.csv:L2-4]
    62.71 / 58.80% [results/qat.csv:L12,L40; results/qat_sweep.csv:L7]

Rules:

- Prose is what is left outside fenced and indented code blocks, inline code spans, HTML comments and the
  generated ``<!-- begin:NAME -->`` ... ``<!-- end:NAME -->`` blocks; citations inside code are not citations.
- A citation covers the figures between it and the previous citation or the start of the sentence, list
  item, table cell, clause after a ``;`` or paragraph it is in, whichever is nearer (a sentence ends at
  ``. ``, ``! `` or ``? ``; "e.g.", "i.e.", "et al." and "vs." do not end one).
- The figures checked are the numbers with a decimal point (91.30) and the seconds ("2,204 s"); other
  integers (bits, seeds, epochs, counts, "the freeze at 60%") and numbers joined to a letter or an exponent
  (resnet8, W4A4, 1e-3, 2^15, 2.3.0) are not. The number of decimals shown is the precision: 91.3 stands
  for anything in [91.25, 91.35].
- A figure passes when it equals, at that precision, a numeric field of a cited row, or the mean, the
  sample standard deviation (two rows or more), the min or the max of one column over the cited rows.
  "A ± B" passes when A and B are the mean and the sample standard deviation of one and the same column.
  Accuracies in the CSVs are percentages (91.3 is 91.3%), so a percentage is compared as written.
- A signed figure (−0.68, +0.37, "float − 0.40") or one followed by "point(s)" may also be a difference:
  of two fields of one cited row (int_acc − float_acc), or of two values of one column (fields of
  different cited rows, or the column's mean / min / max over them). A difference is compared by its size
  (the rows do not say which value the text subtracts from which); a field is compared with its sign when
  the figure has one, by its size otherwise.
- A citation's file must exist under results/, and each line must be a data row of it: not the header,
  not past the end, not the inside of a quoted field that spans lines.
- Lint: a number with a decimal point followed by ``%``, or a number next to ``±``, that no citation covers
  is a problem too: cite the row, or drop the figure when no row holds it.

The more rows a citation names, the more values a wrong figure can match by chance: cite the fewest rows
that hold the figures.
"""
from __future__ import annotations

import csv
import math
import re
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # as utils.io's, without importing torch
DEFAULT_FILES = ("notes/*.md", "docs/*.md", "README.md")

CITATION = re.compile(r"\[(results/[^\]\n]*?\.csv:[^\]\n]*)\]")
PART = re.compile(r"(results/\S+?\.csv):(L\d+(?:-L?\d+)?(?:, ?L\d+(?:-L?\d+)?)*)$")
LINES = re.compile(r"L(\d+)(?:-L?(\d+))?")
FIGURE = re.compile(r"(?<![\w.,^/\x01])(?P<sign>[−+-] ?)?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?"
                    r"(?!\w|\.\d|,\d{3}(?!\d))(?P<pct> ?%)?(?P<seconds> s\b)?(?P<points>\s+points?\b)?")
ABBREVIATIONS = ("e.g", "i.e", "al", "vs", "cf")
MASK = "\x01"  # stands in for masked characters: neither a digit, a letter, a space nor punctuation


def prose(text: str) -> str:
    """``text`` with everything that is not prose (see the module docstring) replaced by MASK, newlines kept."""
    out, fence, generated, blank_before, in_code = [], False, False, True, False
    for line in text.split("\n"):
        stripped = line.strip()
        if generated or fence:
            keep = False
            if generated and stripped.startswith("<!-- end:"):
                generated = False
            elif fence and stripped.startswith(("```", "~~~")):
                fence = False
        elif stripped.startswith("<!-- begin:"):
            keep, generated = False, True
        elif stripped.startswith(("```", "~~~")):
            keep, fence = False, True
        else:
            in_code = bool(stripped) and (line.startswith(("    ", "\t")) and (blank_before or in_code))
            keep = not in_code and not (stripped.startswith("<!--") and stripped.endswith("-->"))
        blank_before = not stripped
        out.append(line if keep else MASK * len(line))
    masked = "\n".join(out)
    # inline code spans (they may wrap a line, not a paragraph)
    return re.sub(r"(`+)(?:(?!\n\s*\n).)+?\1", lambda m: re.sub(r"[^\n]", MASK, m.group(0)), masked, flags=re.S)


def boundaries(text: str) -> list[int]:
    """Positions where a span of figures ends: sentence ends, paragraph breaks, list items, table cells."""
    found = [m.start() for m in re.finditer(r"\n\s*\n|\n\s*(?:[-*+]|\d+\.) |\n#|[|;]", text)]
    for m in re.finditer(r"[.!?](?=\s)", text):
        word = re.search(r"[\w.]*$", text[:m.start()]).group(0)
        if word not in ABBREVIATIONS:
            found.append(m.start())
    return sorted(found)


class Table:
    """The data rows of one CSV file, keyed by the physical line each record starts on."""

    def __init__(self, path: Path):
        with open(path, newline="") as f:
            reader = csv.reader(f)
            self.header = next(reader, [])
            self.rows: dict[int, dict[str, str]] = {}
            start = reader.line_num + 1
            for record in reader:
                if record:
                    self.rows[start] = dict(zip(self.header, record))
                start = reader.line_num + 1
        self.lines = len(path.read_text().splitlines())


def numeric(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def shown_value(figure: re.Match) -> tuple[float, float, bool]:
    """(the value FIGURE matched, half a unit of its last decimal, whether it carries a sign)."""
    decimals = len(figure["frac"] or "")
    value = float(figure["int"].replace(",", "") + "." + (figure["frac"] or "0"))
    sign = (figure["sign"] or "").strip()
    return (-value if sign in ("−", "-") else value), 0.5 * 10 ** -decimals + 1e-9, bool(sign)


class Cited:
    """What the figures of one citation may equal: the rows' numeric fields and per column the mean, sample
    std, min and max (``values``), the groups within which a difference may be taken (``groups``: each
    row's fields; each column's values with its mean), and each column's (mean, std) (``spreads``)."""

    def __init__(self, rows: list[dict[str, str]]):
        self.values: set[float] = set()
        self.groups: list[list[float]] = []
        self.spreads: list[tuple[float, float]] = []
        for row in rows:
            fields = [x for x in map(numeric, row.values()) if x is not None]
            self.values.update(fields)
            self.groups.append(fields)
        for column in dict.fromkeys(k for row in rows for k in row):
            xs = [x for x in (numeric(row.get(column, "")) for row in rows) if x is not None]
            if len(xs) >= 2:
                mean, std = statistics.fmean(xs), statistics.stdev(xs)
                self.values.update((mean, std))
                self.groups.append(xs + [mean])
                self.spreads.append((mean, std))

    def holds(self, figure: re.Match) -> bool:
        """Whether the figure FIGURE matched is one of these values by the module docstring's rules."""
        target, tol, signed = shown_value(figure)

        def near(x: float) -> bool:
            return abs(x - target) <= tol if signed else abs(abs(x) - target) <= tol

        if any(near(x) for x in self.values):
            return True
        if not signed and not figure["points"]:
            return False
        size, decimals = abs(target), len(figure["frac"] or "")
        return any(abs(abs(a - b) - size) <= tol or abs(abs(round(a, decimals) - round(b, decimals)) - size) <= tol
                   for group in self.groups for i, a in enumerate(group) for b in group[i + 1:])

    def holds_spread(self, mean: re.Match, std: re.Match) -> bool:
        """Whether "MEAN ± STD" is the mean and the sample std of one column of the cited rows."""
        (m, m_tol, _), (s, s_tol, _) = shown_value(mean), shown_value(std)
        return any(abs(mu - m) <= m_tol and abs(sd - s) <= s_tol for mu, sd in self.spreads)


def parse_citation(body: str) -> list[tuple[str, list[int]]] | None:
    """[(CSV path, [line, ...]), ...] from the inside of a citation's brackets; None when malformed."""
    parts = []
    for part in re.split(r"; ?", body):
        m = PART.match(part.strip())
        if not m or ".." in m.group(1).split("/"):
            return None
        lines: list[int] = []
        for lo, hi in LINES.findall(m.group(2)):
            lines += range(int(lo), int(hi or lo) + 1)
        parts.append((m.group(1), lines))
    return parts


def cited_rows(body: str, root: Path, tables: dict[Path, Table]) -> tuple[list[dict[str, str]], list[str]]:
    """(the rows a citation names, its problems)."""
    parts = parse_citation(body)
    if parts is None:
        return [], [f"malformed citation [{body}]; write [results/FILE.csv:L12-14,L20]"]
    rows, problems = [], []
    for rel, lines in parts:
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel} does not exist")
            continue
        if path not in tables:
            tables[path] = Table(path)
        table = tables[path]
        for n in lines:
            if n == 1:
                problems.append(f"{rel}:L1 is the header, not a data row")
            elif n < 1:
                problems.append(f"{rel}:L{n} is no line: lines count from 1, the header")
            elif n > table.lines:
                problems.append(f"{rel}:L{n} is past the end of the file ({table.lines} lines)")
                break  # and so are the rest of its range
            elif n not in table.rows:
                problems.append(f"{rel}:L{n} does not start a data row (blank, or inside a quoted field)")
            else:
                rows.append(table.rows[n])
    return rows, problems


def signed(text: str, figure: re.Match) -> bool:
    """Whether FIGURE's sign is one: joined to the number (−0.68), or a spaced minus after a word
    ("float − 0.40"), not a list bullet."""
    sign = figure["sign"] or ""
    return bool(sign) and (not sign.endswith(" ") or re.search(r"[\w)] $", text[:figure.start()]) is not None)


def check_text(text: str, name: str, root: Path = REPO_ROOT, tables: dict[Path, Table] | None = None) -> list[str]:
    """The problems of one Markdown text, as 'name:line: what'."""
    tables = {} if tables is None else tables
    masked = prose(text)

    def line_of(pos: int) -> int:
        return masked.count("\n", 0, pos) + 1

    problems: list[str] = []
    citations = list(CITATION.finditer(masked))
    cited: list[Cited | None] = []
    for c in citations:
        rows, found = cited_rows(c.group(1), root, tables)
        problems += [f"{name}:{line_of(c.start())}: {p}" for p in found]
        cited.append(None if found else Cited(rows))
    text_only = CITATION.sub(lambda m: MASK * len(m.group(0)), masked)
    ends = boundaries(text_only)
    starts = [c.start() for c in citations]
    figures = []
    for f in FIGURE.finditer(text_only):
        if not signed(text_only, f) and f["sign"]:  # a bullet or a range: the number alone
            f = FIGURE.match(text_only, f.start("int"))
        if f["frac"] or f["seconds"]:
            figures.append(f)
    spread_of = {id(f): g for f, g in zip(figures, figures[1:]) if text_only[f.end():g.start()].strip() == "±"}
    spreads = {id(g) for g in spread_of.values()}
    for f in figures:
        shown = f.group(0).strip()
        near = text_only[max(0, f.start() - 3):f.end() + 3]
        i = next((i for i, s in enumerate(starts) if s >= f.end()), None)
        where = f"{name}:{line_of(f.start())}"
        if i is None or any(f.end() <= e < starts[i] for e in ends):
            if (f["frac"] and f["pct"]) or "±" in near:
                problems.append(f"{where}: {shown} has no citation; cite the CSV row that holds it, or drop the figure")
        elif cited[i] is None or id(f) in spreads:
            continue  # a bad citation is reported once; a ± spread is checked with its mean
        elif id(f) in spread_of:
            std = spread_of[id(f)]
            if not cited[i].holds_spread(f, std):
                problems.append(f"{where}: {shown} ± {std.group(0).strip()} is not the mean ± sample std of one "
                                f"column of [{citations[i].group(1)}]")
        elif not cited[i].holds(f):
            problems.append(f"{where}: {shown} is not in [{citations[i].group(1)}]: no field, mean, std, min or max "
                            "of the cited rows (nor a difference, for a signed figure) equals it")
    return problems


def check_files(paths: list[Path], root: Path = REPO_ROOT) -> list[str]:
    tables: dict[Path, Table] = {}
    problems = []
    for path in paths:
        try:
            name = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            name = str(path)
        problems += check_text(path.read_text(), name, root, tables)
    return problems


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [p for pattern in DEFAULT_FILES for p in sorted(REPO_ROOT.glob(pattern))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    problems = check_files(paths)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
