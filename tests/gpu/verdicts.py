"""The verdict table every GPU test and GPU script reports in: rows of (verdict, name, detail), plus figures.

A row is PASS, FAIL, INFO (a figure or a note; never fails) or SKIP (not run here, with the reason). Rows print
as they come, and the whole table prints in one style at the end of a test, of a script and of the session.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"
VERDICTS = (PASS, FAIL, INFO, SKIP)


class Row(NamedTuple):
    verdict: str
    name: str
    detail: str


def line(row: Row) -> str:
    return f"{row.verdict:4} | {row.name:52} | {row.detail}"


def table(rows: list[Row], title: str = "") -> str:
    head = [f"=== {title} ==="] if title else []
    return "\n".join(head + [line(r) for r in rows])


@dataclass
class Verdicts:
    """The rows and figures of one test or script."""

    title: str = ""
    rows: list[Row] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # what the JSON record keeps besides the rows
    echo: bool = True  # print each row as it comes

    def row(self, name: str, ok, detail: str = "") -> Row:
        """Add a row. ``ok``: True -> PASS, False -> FAIL, None -> INFO, or a verdict; "WARN" (acceptable, worth
        a look) is INFO with the detail marked."""
        if ok == "WARN":
            ok, detail = INFO, f"warning: {detail}"
        verdict = ok if isinstance(ok, str) else {True: PASS, False: FAIL, None: INFO}.get(ok)
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {ok!r} for row {name!r}")
        r = Row(verdict, name, str(detail))
        self.rows.append(r)
        if self.echo:
            print(line(r), flush=True)
        return r

    def extend(self, rows) -> None:
        """Add rows another process reported (and printed), as (verdict, name, detail) lists."""
        echo, self.echo = self.echo, False
        try:
            for verdict, name, detail in rows:
                self.row(name, verdict, detail)
        finally:
            self.echo = echo

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == FAIL]

    def table(self) -> str:
        return table(self.rows, self.title)

    def assert_passed(self) -> None:
        """Fail (with the FAIL rows and the table) when any row failed or none was reported."""
        assert self.rows, f"{self.title}: no rows reported"
        assert not self.failed, (f"{len(self.failed)} FAIL row(s):\n" + "\n".join(map(line, self.failed))
                                 + f"\n\n{self.table()}")
