"""Offline tokenizers for the tiny world, built from vocab files that ship inside installed packages.

Nothing can be downloaded, so the HF CLIP tokenizer (used by the PickScore / CLIP reward, and by the
tiny FLUX's CLIP text encoder in pipeline/tiny.py) is rebuilt from open_clip's bundled BPE file. The vocabulary is laid out exactly as open_clip's SimpleTokenizer
lays it out, so both give the same ids (the real CLIP vocab has the same layout).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import transformers

CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # open_clip/OpenAI keep the first 48894 merges of the BPE file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (same as open_clip.tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as "a b" lines) from open_clip's bpe_simple_vocab_16e6.txt.gz."""
    from open_clip.tokenizer import default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is the "#version" header
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"built a CLIP vocab of {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_clip_tokenizer(out_dir: str | Path) -> "transformers.CLIPTokenizer":
    """Write an HF CLIP tokenizer (vocab.json, merges.txt, tokenizer files) to ``out_dir`` and load it.

    Same ids as ``open_clip.get_tokenizer("ViT-H-14")`` for ordinary text; pads with <|endoftext|>
    (as openai/clip-vit-* do) where open_clip pads with 0.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    tok.save_pretrained(str(out))
    return CLIPTokenizer.from_pretrained(str(out), local_files_only=True)
