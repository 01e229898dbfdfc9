"""Re-create pretrain/online_eval/assets/books/kjv_*.txt (distribution-shift documents) from the
Debian/Ubuntu package bible-kjv.

    apt-get install -y bible-kjv
    python pretrain/online_eval/assets/extract_kjv.py [--out DIR]

`bible -f REFS` prints one verse per line as `Ge1:1 In the beginning ...`; the reference is dropped and
each chapter gets a heading, so the document reads like the other books (one line per verse).
The King James Version is public domain; it is used for evaluation only (see books/LICENSE.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess

# file name -> (title, bible(1) range). About 25 KB each: enough for a few thousand tokens.
EXCERPTS = {
    "kjv_genesis": ("The First Book of Moses, called Genesis", "Gen1:1-Gen10:32"),
    "kjv_luke": ("The Gospel According to Saint Luke", "Luke1:1-Luke5:39"),
}
VERSE = re.compile(r"^\S+?(\d+):(\d+) (.*)$")


def excerpt(title: str, refs: str) -> str:
    out = subprocess.run(["bible", "-f", refs], check=True, capture_output=True, text=True).stdout
    lines, chapter = [title, ""], None
    for line in out.splitlines():
        m = VERSE.match(line.strip())
        if not m:
            continue
        if m.group(1) != chapter:
            chapter = m.group(1)
            lines += ["", f"Chapter {chapter}", ""]
        lines.append(m.group(3))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "books"))
    args = ap.parse_args()
    for name, (title, refs) in EXCERPTS.items():
        path = os.path.join(args.out, f"{name}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(excerpt(title, refs))
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
