"""Books that Debian ships inside R packages (janeaustenr, tidytext), read without R, and written as
UTF-8 text files. Used by the scripts that re-create the bundled corpora:
`data_pipeline/assets/extract_austen.py` (training) and `pretrain/online_eval/assets/extract_books.py`
(evaluation). Needs `pip install rdata`.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib


def _quiet_rdata():
    import rdata

    warnings.simplefilter("ignore")  # rdata warns about R classes it does not model (tbl_df, RDS headers)
    return rdata


def read_lazyload(rdata_dir: str, variables: dict[str, str], package: str) -> dict[str, list[str]]:
    """{file name: lines} of character vectors in an R lazy-load database (`Rdata.rdx`: a gzip-compressed
    serialized list of variable -> (offset, length) in `Rdata.rdb`, where each object is a 4-byte header
    then zlib-compressed serialized R data). `variables`: R variable name -> file name."""
    rdx, rdb = os.path.join(rdata_dir, "Rdata.rdx"), os.path.join(rdata_dir, "Rdata.rdb")
    if not os.path.exists(rdx):
        raise SystemExit(f"{rdx} not found: apt-get install -y {package}")
    with warnings.catch_warnings():
        rdata = _quiet_rdata()

        def parse(blob: bytes):
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

        with open(rdx, "rb") as f:
            index = parse(gzip.decompress(f.read()))
        with open(rdb, "rb") as f:
            blob = f.read()
        out = {}
        for var, name in variables.items():
            offset, length = (int(x) for x in index["variables"][var])
            out[name] = [str(line) for line in parse(zlib.decompress(blob[offset + 4 : offset + length]))]
    return out


def read_rda_frame(path: str, frame: str, ids: dict[int, str], package: str) -> dict[str, list[str]]:
    """{file name: lines} of the books in an `.rda` data frame with columns gutenberg_id and text (one
    row per line). `ids`: Gutenberg id -> file name."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: apt-get install -y {package}")
    with warnings.catch_warnings():
        table = _quiet_rdata().read_rda(path)[frame]
    out = {}
    for gid, name in ids.items():
        rows = table[table["gutenberg_id"] == gid]
        if rows.empty:
            raise SystemExit(f"{path}: Gutenberg id {gid} ({name}) not found")
        out[name] = [str(t) if isinstance(t, str) else "" for t in rows["text"]]
    return out


def write_books(books: dict[str, list[str]], out_dir: str) -> None:
    """One `NAME.txt` per book, lines joined by "\\n", each written under a temporary name and renamed."""
    os.makedirs(out_dir, exist_ok=True)
    for name, lines in books.items():
        path = os.path.join(out_dir, f"{name}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines).strip("\n") + "\n")
        os.replace(tmp, path)
        print(f"{path}: {len(lines)} lines, {os.path.getsize(path)} bytes")
