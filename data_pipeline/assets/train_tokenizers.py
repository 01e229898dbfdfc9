"""Re-create the bundled demo tokenizers from the bundled Austen novels (deterministic, ~5 s):

python data_pipeline/assets/train_tokenizers.py
"""

from __future__ import annotations

import glob
import os

from data_pipeline.tokenizer_train import train_sentencepiece

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    books = sorted(glob.glob(os.path.join(HERE, "austen", "*.txt")))
    for recipe in ("gpt", "bert"):
        texts = (open(b, encoding="utf-8").read() for b in books)
        print(
            train_sentencepiece(texts, os.path.join(HERE, "tokenizer", f"austen_{recipe}"), recipe, 8192, num_threads=2)
        )


if __name__ == "__main__":
    main()
