"""Re-create data_pipeline/assets/austen/*.txt from the Debian/Ubuntu package r-cran-janeaustenr.

    apt-get install -y r-cran-janeaustenr        # R itself is not needed
    python data_pipeline/assets/extract_austen.py [--out DIR]

The package keeps each novel as a character vector of the Project Gutenberg text's lines in an R
lazy-load database (read by data_pipeline/r_books.py). Needs `pip install rdata`.
"""

from __future__ import annotations

import argparse
import os

from data_pipeline.r_books import read_lazyload, write_books

RDATA_DIR = "/usr/lib/R/site-library/janeaustenr/data"
# janeaustenr variable name -> file name
NOVELS = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "austen"))
    args = ap.parse_args()
    write_books(read_lazyload(RDATA_DIR, NOVELS, "r-cran-janeaustenr"), args.out)


if __name__ == "__main__":
    main()
