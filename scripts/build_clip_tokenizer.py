"""Build CLIP's tokenizer files (vocab.json, merges.txt) from the BPE list that open_clip ships.

The result is byte-for-byte the vocabulary of OpenAI's CLIP, so token ids match real checkpoints
("a photo of a cat" -> 49406, 320, 1125, 539, 320, 2368, 49407). The files are committed under
assets/clip-tokenizer/; this script documents and reproduces them:

    pip download --no-deps open_clip_torch && unzip -p open_clip_torch-*.whl \
        open_clip/bpe_simple_vocab_16e6.txt.gz > bpe.txt.gz
    python scripts/build_clip_tokenizer.py bpe.txt.gz assets/clip-tokenizer
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

# CLIP keeps the first 49152 - 256 - 2 merges of the list (the rest were never used in training).
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table, which CLIP reuses.

    Order matters for token ids: printable bytes first (mapped to themselves), then the others
    (mapped to 256, 257, ...), exactly as CLIP enumerates them.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


def build(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = dict(special, model_max_length=77, tokenizer_class="CLIPTokenizer", do_lower_case=True)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    build(Path(sys.argv[1]), Path(sys.argv[2]))
