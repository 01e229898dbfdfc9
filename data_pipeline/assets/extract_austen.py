"""Re-create data_pipeline/assets/austen/*.txt from the Debian/Ubuntu package r-cran-janeaustenr.

    apt-get install -y r-cran-janeaustenr        # R itself is not needed
    python data_pipeline/assets/extract_austen.py [--out DIR]

The package keeps the novels in an R lazy-load database: `Rdata.rdx` (a gzip-compressed serialized
R list: variable name -> (offset, length) in `Rdata.rdb`) and `Rdata.rdb` (each object is a 4-byte
length header followed by zlib-compressed serialized R data). Each novel is a character vector of
the Project Gutenberg text's lines; we write it back as one UTF-8 file per novel, lines joined by
"\\n". Needs `pip install rdata`.
"""
from __future__ import annotations

import argparse
import gzip
import os
import warnings
import zlib

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


def _parse_r(blob: bytes):
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" is expected here
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def read_novels(rdata_dir: str = RDATA_DIR) -> dict[str, list[str]]:
    """Return {file name: list of lines} for the six novels."""
    rdx, rdb = os.path.join(rdata_dir, "Rdata.rdx"), os.path.join(rdata_dir, "Rdata.rdb")
    if not os.path.exists(rdx):
        raise SystemExit(f"{rdx} not found: apt-get install -y r-cran-janeaustenr")
    with open(rdx, "rb") as f:
        index = _parse_r(gzip.decompress(f.read()))
    with open(rdb, "rb") as f:
        blob = f.read()
    novels = {}
    for var, name in NOVELS.items():
        offset, length = (int(x) for x in index["variables"][var])
        lines = _parse_r(zlib.decompress(blob[offset + 4: offset + length]))
        novels[name] = [str(line) for line in lines]
    return novels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "austen"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, lines in read_novels().items():
        path = os.path.join(args.out, f"{name}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines).strip("\n") + "\n")
        os.replace(tmp, path)
        print(f"{path}: {len(lines)} lines, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
