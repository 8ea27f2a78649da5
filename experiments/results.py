"""``cvlab results``: render ``docs/RESULTS.md`` from the committed records (:mod:`cvlab.records`).

``cvlab results`` writes the page; ``cvlab results --check`` exits 1, naming the first differing line, when the
committed page is not the rendering of the records (the test suite runs it)."""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from cvlab.records import RESULTS_DIR, RESULTS_PAGE, render_results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cvlab results", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--dir", default=str(RESULTS_DIR), help="the records and section prose (default docs/results)")
    p.add_argument("--out", default=str(RESULTS_PAGE), help="the page to write or check (default docs/RESULTS.md)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page differs from the rendering")
    a = p.parse_args(argv)
    page = render_results(a.dir)
    out = Path(a.out)
    if a.check:
        old = out.read_text() if out.is_file() else ""
        if old == page:
            print(f"{out} is up to date")
            return 0
        diff = next((d for d in difflib.unified_diff(old.splitlines(), page.splitlines(), lineterm="", n=0)
                     if d[:1] in "+-" and not d.startswith(("+++", "---"))), "")
        print(f"cvlab: error: {out} is not the rendering of {a.dir}/ (first difference: {diff[:160]!r}); "
              "run `uv run cvlab results`")
        return 1
    out.write_text(page)
    print(f"wrote {out} ({len(page.splitlines())} lines) from {a.dir}/")
    return 0
