"""Re-create data_pipeline/assets/pd_books/*.txt: public-domain prose beyond Austen, for masked-LM
pretraining (the Kim & Jung recipe, configs/recipes/kim_jung/), from Debian/Ubuntu packages:

    apt-get install -y r-cran-tokenizers jargon-text      # R itself is not needed
    python data_pipeline/assets/extract_pd_books.py [--out DIR]

- Moby-Dick (Melville, 1851; Project Gutenberg #2701): the `mobydick` character vector of the R
  package tokenizers (MIT package code), in its lazy-load database (read by data_pipeline/r_books.py).
- The Jargon File 4.4.7 (Raymond et al., placed in the public domain): `jargon.txt.gz` of jargon-text.

The online-evaluation books (tidytext's, pretrain/online_eval/assets/books) and the King James Bible are
evaluation / shift data and deliberately not here. Needs `pip install rdata`.
"""

from __future__ import annotations

import argparse
import gzip
import os

from data_pipeline.r_books import read_lazyload, write_books

TOKENIZERS_DATA = "/usr/lib/R/site-library/tokenizers/data"
JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"


def jargon_lines() -> list[str]:
    if not os.path.exists(JARGON):
        raise SystemExit(f"{JARGON} not found: apt-get install -y jargon-text")
    with gzip.open(JARGON, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def gutenberg_body(text: str) -> list[str]:
    """The book between Project Gutenberg's START and END markers (its header and licence dropped)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    return lines[start + 1 : end]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pd_books"))
    args = ap.parse_args()
    moby = read_lazyload(TOKENIZERS_DATA, {"mobydick": "moby_dick"}, "r-cran-tokenizers")["moby_dick"]
    books = {"moby_dick": gutenberg_body("\n".join(moby).lstrip("\ufeff"))}
    books["jargon_file"] = jargon_lines()
    write_books(books, args.out)


if __name__ == "__main__":
    main()
