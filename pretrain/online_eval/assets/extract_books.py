"""Re-create pretrain/online_eval/assets/books/*.txt from the Debian/Ubuntu package r-cran-tidytext.

    apt-get install -y r-cran-tidytext           # R itself is not needed
    python pretrain/online_eval/assets/extract_books.py [--out DIR]

tidytext ships four Project Gutenberg books in `extdata/books.rda` (a data frame with columns
gutenberg_id, text, title; one row per line; read by data_pipeline/r_books.py). We keep the three that
are not by Jane Austen -- the demo training corpus is Austen's novels, so Pride and Prejudice (id 1342)
is left out. Needs `pip install rdata`.
"""

from __future__ import annotations

import argparse
import os

from data_pipeline.r_books import read_rda_frame, write_books

BOOKS_RDA = "/usr/lib/R/site-library/tidytext/extdata/books.rda"
# Gutenberg id -> file name. 1342 (Pride and Prejudice) is deliberately absent: it is Austen.
BOOKS = {1400: "great_expectations", 36: "the_war_of_the_worlds", 164: "twenty_thousand_leagues_under_the_sea"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "books"))
    args = ap.parse_args()
    write_books(read_rda_frame(BOOKS_RDA, "books", BOOKS, "r-cran-tidytext"), args.out)


if __name__ == "__main__":
    main()
