"""Tokenizer files for an exported model: an HF tokenizer directory is re-saved as it is; a sentencepiece
`.model` (our own BPE/unigram recipes) becomes an equivalent `tokenizers` fast tokenizer.

The sentencepiece conversion mirrors how those models were trained (`add_dummy_prefix`, identity
normalisation, whitespace kept, byte fallback): pieces and ids are the sentencepiece model's own, and
`check_same_ids` verifies the converted tokenizer on sample text before anything is written.
"""

from __future__ import annotations

import os

from model.errors import ModelError


def load_tokenizer_for_export(src: str):
    """A transformers tokenizer object for `src` (HF tokenizer directory or sentencepiece .model)."""
    if os.path.isdir(src):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(src, local_files_only=True)
        except Exception as e:  # transformers raises many types for a broken directory
            raise ModelError(f"{src}: cannot load the HF tokenizer ({type(e).__name__}: {e})") from None
    if os.path.isfile(src):
        return sentencepiece_to_fast(src)
    raise ModelError(f"tokenizer {src!r}: no such file or directory")


def sentencepiece_to_fast(path: str):
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(path, "rb") as f:
        try:
            proto.ParseFromString(f.read())
        except Exception:
            raise ModelError(f"{path}: not a sentencepiece model") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        raise ModelError(
            f"{path}: sentencepiece normalizer {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) has no exact fast-tokenizer equivalent here"
        )
    vocab_scores = [(p.piece, p.score) for p in proto.pieces]
    if trainer.model_type == 2:  # BPE
        merges = _bpe_merges(vocab_scores)
        model = BPE(
            {p: i for i, (p, _) in enumerate(vocab_scores)},
            merges,
            unk_token=trainer.unk_piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
            dropout=None,
        )
    elif trainer.model_type == 1:  # unigram
        model = Unigram(vocab_scores, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    else:
        raise ModelError(f"{path}: sentencepiece model type {trainer.model_type} is not BPE or unigram")
    tok = Tokenizer(model)
    steps = [normalizers.Prepend("\u2581")] if norm.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    # control (3) and user-defined (4) symbols are whole tokens; control ones are special
    tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True) for p in proto.pieces if p.type == 3])
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == 4])
    pieces = [p.piece for p in proto.pieces]
    if "[CLS]" in pieces and "[SEP]" in pieces:  # BERT inputs, as megatron's BERT dataset builds them
        from tokenizers import processors

        cls, sep = ("[CLS]", pieces.index("[CLS]")), ("[SEP]", pieces.index("[SEP]"))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep]
        )
    sp = spm.SentencePieceProcessor(model_file=path)

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    names = {p.piece for p in proto.pieces}
    special = {
        "unk_token": piece(sp.unk_id()),
        "bos_token": piece(sp.bos_id()),
        "eos_token": piece(sp.eos_id()),
        "pad_token": piece(sp.pad_id()),
        "cls_token": "[CLS]" if "[CLS]" in names else None,
        "sep_token": "[SEP]" if "[SEP]" in names else None,
        "mask_token": "[MASK]" if "[MASK]" in names else None,
    }
    if "<eod>" in names:  # the data pipeline ends documents with <eod>: that is what the model learned
        special["eos_token"] = "<eod>"
    names_in = (
        ["input_ids", "token_type_ids", "attention_mask"] if special["cls_token"] else ["input_ids", "attention_mask"]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_input_names=names_in, **{k: v for k, v in special.items() if v}
    )
    check_same_ids(fast, lambda text: sp.encode(text), path)
    return fast


def _bpe_merges(vocab_scores: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """sentencepiece BPE stores pieces, not merges: every split of a piece into two pieces is a merge,
    ranked by the merged piece's score (higher first), then by the parts' ids."""
    ids = {p: i for i, (p, _) in enumerate(vocab_scores)}
    merges = []
    for piece, score in vocab_scores:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


_SAMPLE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.  However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families "
    "(in 1811, 1812 or 1813), that he is considered the rightful property of some one or other of their "
    'daughters.\n"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield '
    'Park is let at last?" -- Café, naïve, 東京, emoji \U0001f600.'
)


def check_same_ids(fast, encode, where: str, text: str = _SAMPLE) -> None:
    ours = fast(text, add_special_tokens=False)["input_ids"]
    ref = list(encode(text))
    if ours != ref:
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        raise ModelError(
            f"{where}: the converted fast tokenizer differs from sentencepiece at token {first} "
            f"({ours[first : first + 5]} vs {ref[first : first + 5]})"
        )
