"""Re-create pretrain/online_eval/assets/books/*.txt from the Debian/Ubuntu package r-cran-tidytext.

    apt-get install -y r-cran-tidytext           # R itself is not needed
    python pretrain/online_eval/assets/extract_books.py [--out DIR]

tidytext ships four Project Gutenberg books in `extdata/books.rda` (an R data file: a data frame
with columns gutenberg_id, text, title; one row per line of the book). We keep the three that are
not by Jane Austen -- the demo training corpus is Austen's novels, so Pride and Prejudice (id 1342)
is left out -- and write each as one UTF-8 file, lines joined by "\\n". Needs `pip install rdata`.
"""
from __future__ import annotations

import argparse
import os
import warnings

BOOKS_RDA = "/usr/lib/R/site-library/tidytext/extdata/books.rda"
# Gutenberg id -> file name. 1342 (Pride and Prejudice) is deliberately absent: it is Austen.
BOOKS = {
    1400: "great_expectations",
    36: "the_war_of_the_worlds",
    164: "twenty_thousand_leagues_under_the_sea",
}


def read_books(path: str = BOOKS_RDA) -> dict[str, list[str]]:
    """Return {file name: list of lines} for the three evaluation books."""
    import rdata

    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: apt-get install -y r-cran-tidytext")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Missing constructor for R class tbl_df" is expected
        frame = rdata.read_rda(path)["books"]
    books = {}
    for gid, name in BOOKS.items():
        rows = frame[frame["gutenberg_id"] == gid]
        if rows.empty:
            raise SystemExit(f"{path}: Gutenberg id {gid} ({name}) not found")
        books[name] = [str(t) if isinstance(t, str) else "" for t in rows["text"]]
    return books


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "books"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, lines in read_books().items():
        path = os.path.join(args.out, f"{name}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines).strip("\n") + "\n")
        os.replace(tmp, path)
        print(f"{path}: {len(lines)} lines, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
