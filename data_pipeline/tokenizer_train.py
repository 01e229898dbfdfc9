"""Train sentencepiece tokenizers with the GPT or BERT recipe (`pkm data tokenizer train`).

Both recipes use identity normalisation, keep whitespace as is and fall back to bytes, so
`decode(encode(doc)) == doc` for any UTF-8 document (tested on the bundled books).

- gpt:  BPE, byte fallback, digits split, `<unk>=0 <s>=1 </s>=2 <pad>=3` and an `<eod>` control symbol
        (id 4) that preprocessing appends after every document.
- bert: unigram (or BPE), byte fallback, digits split, `[PAD]=0 [UNK]=1` and the control symbols
        `[CLS]=2 [SEP]=3 [MASK]=4`.
A large corpus is sampled (`input_sentence_size` lines, reservoir sampling in sentencepiece).
The model is written under a temporary prefix and renamed at the end.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator

from data_pipeline.errors import DataError
from data_pipeline.outputs import OutputError, publish, scratch_dir

log = logging.getLogger("pkm.data")

_COMMON = dict(
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    # printable ASCII always gets its own piece, however rare in the training sample (digits!)
    required_chars="".join(chr(c) for c in range(33, 127)),
    max_sentence_length=1 << 16,
    shuffle_input_sentence=True,
    minloglevel=2,  # errors only: its warnings (e.g. "No valid symbol found") say nothing to a user
)


def _specials(**pieces: str | None) -> dict:
    """sentencepiece's unk/bos/eos/pad options: ids 0, 1, ... in the order given; None: no such token (id -1)."""
    out: dict = {}
    next_id = 0
    for name, piece in pieces.items():
        if piece is None:
            out[f"{name}_id"] = -1
        else:
            out.update({f"{name}_id": next_id, f"{name}_piece": piece})
            next_id += 1
    return out


RECIPES = {
    "gpt": dict(
        model_type="bpe", control_symbols=["<eod>"], **_specials(unk="<unk>", bos="<s>", eos="</s>", pad="<pad>")
    ),
    "bert": dict(
        model_type="unigram",
        control_symbols=["[CLS]", "[SEP]", "[MASK]"],
        **_specials(pad="[PAD]", unk="[UNK]", bos=None, eos=None),
    ),
}


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """sentencepiece trains on lines: split each document on newlines, drop blank ones."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    output_prefix: str,
    recipe: str = "gpt",
    vocab_size: int = 8192,
    input_sentence_size: int = 2_000_000,
    model_type: str | None = None,
    num_threads: int | None = None,
    seed: int = 1234,
) -> str:
    """Train on an iterable of documents; write OUTPUT_PREFIX.model/.vocab atomically.

    Returns the .model path.
    """
    import sentencepiece as spm
    from tqdm import tqdm

    if recipe not in RECIPES:
        raise DataError(f"unknown tokenizer recipe {recipe!r}: expected one of {sorted(RECIPES)}")
    kwargs = dict(_COMMON, **RECIPES[recipe])
    if model_type:
        kwargs["model_type"] = model_type
    # sentencepiece seeds its sampling from std::random_device unless told otherwise.
    spm.set_random_generator_seed(seed)
    with scratch_dir(os.path.dirname(os.path.abspath(output_prefix))) as tmp_dir:
        tmp = str(tmp_dir / "m")
        lines = tqdm(_lines(texts), desc="tokenizer: reading lines", unit=" lines", mininterval=2.0, disable=None)
        raised = []  # sentencepiece turns an exception in our iterator (Ctrl-C, a bad input) into a RuntimeError

        def sentences():
            try:
                yield from lines
            except BaseException as e:
                raised.append(e)
                raise

        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_prefix=tmp,
                vocab_size=vocab_size,
                input_sentence_size=input_sentence_size,
                num_threads=num_threads or os.cpu_count() or 1,
                **kwargs,
            )
        except RuntimeError as e:
            if raised:
                raise raised[0] from None
            raise DataError(_explain(str(e), vocab_size, output_prefix)) from None
        finally:
            lines.close()
        # the model records its (temporary) output prefix: store the final name, so that the same
        # corpus and options give a byte-identical model file (and the same identity sha256)
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(tmp + ".model", "rb") as f:
            proto.ParseFromString(f.read())
        proto.trainer_spec.model_prefix = os.path.basename(output_prefix)
        try:
            with open(tmp + ".model", "wb") as f:
                f.write(proto.SerializeToString())
        except OSError as e:
            raise OutputError(f"{output_prefix}.model: cannot write ({e.strerror})") from None
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            publish(tmp + ext, output_prefix + ext)
    log.info("wrote %s.model (%s recipe, vocab %d)", output_prefix, recipe, vocab_size)
    return output_prefix + ".model"


def _explain(message: str, vocab_size: int, output_prefix: str) -> str:
    """sentencepiece's internal errors about the vocabulary size, in the options' words."""
    small = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", message)
    if small:
        return (
            f"--vocab-size {vocab_size}: smaller than the {small.group(1)} characters and special pieces "
            f"the corpus needs; use at least {small.group(1)}"
        )
    large = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if large:
        return f"--vocab-size {vocab_size}: too large for this corpus; use at most {large.group(1)} (or more text)"
    if "output->Write" in message:  # it could not write its (temporary) model files
        return f"{output_prefix}.model: cannot write the tokenizer (disk full?)"
    detail = re.sub(r"^INTERNAL: \S+\(\d+\) \[.*?\] ", "", message.strip())
    return f"sentencepiece training for {output_prefix} failed: {detail}"
