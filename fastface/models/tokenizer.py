"""CLIP byte-level BPE tokenizer (Radford et al. 2021), standard library only.

Reproduces the ids of transformers' ``CLIPTokenizer`` as SDXL pipelines call it (``padding="max_length"``,
``max_length=77``, ``truncation=True``):

1. text cleanup: Unicode NFC, every whitespace run replaced by one space, per-character lower case;
   the special strings ``<|startoftext|>``/``<|endoftext|>`` are kept as whole tokens;
2. pre-tokenisation by CLIP's pattern
   ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``,
   written here with ``unicodedata`` categories instead of the third-party ``regex`` module;
3. each piece's UTF-8 bytes mapped through GPT-2's ``bytes_to_unicode``, ``</w>`` appended to the last
   symbol, and pairs merged greedily by rank (lowest first);
4. ``[BOS] + ids[:75] + [EOS]`` padded to 77 with the pad id (49407 for SDXL's first tokenizer, 0 for the second).

The standard CLIP vocabulary (OpenAI CLIP, MIT licence) ships in ``fastface/models/data`` so single-file
checkpoints need no tokenizer folder.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CONTEXT_LENGTH = 77
BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the released file (after the "#version" header line).
_NUM_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SPECIALS = (BOS_TOKEN, EOS_TOKEN)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# White_Space characters (the ``\s`` of the Oniguruma/Rust regex engines used by the reference).
_WHITESPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def _char_class(ch: str) -> str:
    """'s' whitespace, 'L' letter, 'N' number, 'P' anything else (CLIP's pre-tokenisation classes)."""
    if ch in _WHITESPACE:
        return "s"
    cat = unicodedata.category(ch)[0]
    if cat == "L":
        return "L"
    if cat == "N":
        return "N"
    return "P"


def clean_text(text: str) -> str:
    """CLIP text cleanup: NFC, whitespace runs -> one space, per-character lower case."""
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    in_space = False
    for ch in text:
        if ch in _WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(ch.lower())
            in_space = False
    return "".join(out)


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into CLIP's pre-tokens (the pattern in the module docstring, left to right)."""
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<":
            special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
            if special is not None:
                # Matched as one piece, then split again by the byte-level (GPT-2) pattern: "<|", name, "|>".
                pieces.extend(("<|", special[2:-2], "|>"))
                i += len(special)
                continue
        if ch == "'":
            contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if contraction is not None:
                pieces.append(contraction)
                i += len(contraction)
                continue
        cls = _char_class(ch)
        if cls == "s":
            i += 1
        elif cls == "N":
            pieces.append(ch)
            i += 1
        else:  # a maximal run of letters, or of "other" characters
            j = i + 1
            while j < n and _char_class(text[j]) == cls:
                j += 1
            pieces.append(text[i:j])
            i = j
    return pieces


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length id tensors ``[B, 77]`` for SDXL's text encoders."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        pad_token: str = EOS_TOKEN,
        max_length: int = CONTEXT_LENGTH,
        special_tokens: Mapping[str, bool] | None = None,
        source: str = "<in memory>",
    ) -> None:
        for tok in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if tok not in vocab:
                raise ValueError(f"{source}: the vocabulary has no token {tok!r}; is this a CLIP tokenizer vocabulary?")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for the start and end tokens), got {max_length}")
        self.vocab = dict(vocab)
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        for a, b in self.ranks:
            if a not in vocab or b not in vocab or a + b not in vocab:
                raise ValueError(
                    f"{source}: merge {a!r} + {b!r} uses or makes a symbol not in the vocabulary; "
                    "vocab.json and merges.txt do not belong together"
                )
        self.bos_id = vocab[BOS_TOKEN]
        self.eos_id = vocab[EOS_TOKEN]
        self.unk_id = self.eos_id  # CLIP's unknown token is <|endoftext|>
        self.pad_id = vocab[pad_token]
        self.max_length = max_length
        # Added/special tokens are matched as whole tokens: those marked normalized=False in the raw text,
        # the others after the text cleanup (transformers' added-token rules). The pad token is always one.
        specials = dict(special_tokens) if special_tokens is not None else {BOS_TOKEN: True, EOS_TOKEN: False}
        specials.setdefault(pad_token, False)
        for tok in specials:
            if tok not in vocab:
                raise ValueError(f"{source}: special token {tok!r} is not in the vocabulary")
        self._raw_specials = tuple(t for t, normalized in specials.items() if not normalized)
        self._clean_specials = tuple(t for t, normalized in specials.items() if normalized)
        self._byte_map = bytes_to_unicode()
        self._cache: dict[str, tuple[int, ...]] = {}

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN, max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
        """The standard CLIP vocabulary shipped with fastface (49408 tokens)."""
        vocab, merges = bundled_vocab()
        # The same added-token rules as SDXL's tokenizer folders (see write_vocab_folder).
        specials = {BOS_TOKEN: True, EOS_TOKEN: False, pad_token: False}
        return cls(
            vocab, merges, pad_token=pad_token, max_length=max_length, special_tokens=specials,
            source=f"fastface bundled {BUNDLED_VOCAB}",
        )

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, pad_token: str | None = None, max_length: int | None = None
    ) -> CLIPTokenizer:
        """Read a diffusers/transformers tokenizer folder (``vocab.json``, ``merges.txt``; pad token and max
        length from ``special_tokens_map.json``/``tokenizer_config.json`` when present)."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
                raise ValueError(
                    f"{folder}: no '{f.name}' found (a CLIP tokenizer folder needs vocab.json and merges.txt); "
                    f"the folder holds: {present or 'nothing'}"
                )
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{vocab_file}: not a valid JSON vocabulary ({exc})") from exc
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping token strings to integer ids")
        merges = _parse_merges(merges_file.read_text(encoding="utf-8").split("\n"), source=str(merges_file))
        config = _read_tokenizer_config(folder)
        pad = pad_token or config.get("pad_token") or EOS_TOKEN
        specials = config["specials"] or {BOS_TOKEN: False, EOS_TOKEN: False}
        length = max_length or config.get("model_max_length") or CONTEXT_LENGTH
        if not isinstance(length, int) or length > 10_000:  # transformers writes a huge int for "no limit"
            length = CONTEXT_LENGTH
        return cls(vocab, merges, pad_token=pad, max_length=length, special_tokens=specials, source=str(folder))

    # ---- encoding -----------------------------------------------------------------------------------

    def bpe(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-token (cached)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        symbols = [self._byte_map[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        ids = tuple(self.vocab.get(s, self.unk_id) for s in self._merge(symbols))
        if len(self._cache) < 100_000:
            self._cache[piece] = ids
        return ids

    def _merge(self, word: list[str]) -> list[str]:
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = -1, None
            for i in range(len(word) - 1):
                r = ranks.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            first, second = word[best], word[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens, padding or truncation."""
        if not isinstance(text, str):
            raise ValueError(f"a prompt must be a string, got {type(text).__name__}")
        ids: list[int] = []
        for raw in _split_on(text, self._raw_specials):
            if raw in self._raw_specials:
                ids.append(self.vocab[raw])
                continue
            for part in _split_on(clean_text(raw), self._clean_specials):
                if part in self._clean_specials:
                    ids.append(self.vocab[part])
                    continue
                for piece in pre_tokenize(part):
                    ids.extend(self.bpe(piece))
        return ids

    def __call__(self, prompts: str | Sequence[str], *, warn: bool = True) -> torch.Tensor:
        """Ids ``[B, max_length]`` (int64): ``[BOS] + ids + [EOS]``, truncated and padded with the pad id.

        A prompt longer than the limit logs one line (with ``warn``): how many tokens were dropped and the first
        dropped words.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        room = self.max_length - 2
        rows = []
        for text in prompts:
            ids = self.encode(text)
            if len(ids) > room:
                if warn:
                    logger.warning("%s", self.truncation_note(ids, room))
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def truncation_note(self, ids: Sequence[int], room: int, words: int = 8) -> str:
        """One line saying that ``ids`` lose their tokens past ``room``, quoting the first few dropped words."""
        dropped = self.decode(ids[room : room + 4 * words]).split()
        head = " ".join(dropped[:words]) + (" ..." if len(ids) - room > 4 * words or len(dropped) > words else "")
        return (
            f"Prompt too long for CLIP: {len(ids) - room} of its {len(ids)} tokens were cut (limit {room}), "
            f"the cut starts: {head!r}"
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped); used for log messages."""
        inverse = getattr(self, "_inverse", None)
        if inverse is None:
            inverse = self._inverse = {i: t for t, i in self.vocab.items()}
        byte_decoder = {c: b for b, c in self._byte_map.items()}
        text = "".join(inverse.get(int(i), "") for i in ids if int(i) not in (self.bos_id, self.eos_id))
        raw = bytearray()
        for ch in text.replace("</w>", " "):
            raw.extend(ch.encode("utf-8") if ch == " " else bytes([byte_decoder.get(ch, ord("?"))]))
        return raw.decode("utf-8", errors="replace").strip()


def _split_on(text: str, tokens: Sequence[str]) -> list[str]:
    """Split ``text`` around whole occurrences of ``tokens`` (leftmost match, longest on ties), keeping them."""
    if not tokens:
        return [text] if text else []
    out: list[str] = []
    i = 0
    while i < len(text):
        best, best_tok = len(text), ""
        for tok in tokens:
            j = text.find(tok, i)
            if j != -1 and (j < best or (j == best and len(tok) > len(best_tok))):
                best, best_tok = j, tok
        if not best_tok:
            out.append(text[i:])
            break
        if best > i:
            out.append(text[i:best])
        out.append(best_tok)
        i = best + len(best_tok)
    return out


def _parse_merges(lines: Sequence[str], source: str) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if not line.strip() or (n == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n + 1} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_config(folder: Path) -> dict:
    """pad token, model max length and added tokens (content -> normalized) from the transformers config files."""
    out: dict = {"specials": {}}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{f}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{f}: expected a JSON object")
        for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tok = data.get(role)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                out["specials"].setdefault(tok, False)
                if role == "pad_token":
                    out["pad_token"] = tok
        for entry in (data.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                out["specials"][entry["content"]] = bool(entry.get("normalized", False))
        if isinstance(data.get("model_max_length"), int):
            out["model_max_length"] = data["model_max_length"]
    return out


@lru_cache(maxsize=1)
def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The standard CLIP vocab (49408 ids) and merges (48894), built from the bundled merges file as CLIP does."""
    data = resources.files("fastface.models").joinpath("data", BUNDLED_VOCAB).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : _NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_vocab_folder(folder: str | os.PathLike, pad_token: str = EOS_TOKEN) -> Path:
    """Write the bundled vocabulary as a folder laid out like SDXL's ``tokenizer/`` (or ``tokenizer_2/`` with
    ``pad_token="!"``): ``vocab.json``, ``merges.txt``, ``special_tokens_map.json``, ``tokenizer_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    flags = {"lstrip": False, "rstrip": False, "single_word": False}
    added = {
        str(vocab[BOS_TOKEN]): {"content": BOS_TOKEN, "normalized": True, "special": False, **flags},
        str(vocab[EOS_TOKEN]): {"content": EOS_TOKEN, "normalized": False, "special": False, **flags},
    }
    if pad_token not in (BOS_TOKEN, EOS_TOKEN):
        added[str(vocab[pad_token])] = {"content": pad_token, "normalized": False, "special": True, **flags}
    config = {
        **special, "added_tokens_decoder": added, "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
        "add_prefix_space": False, "errors": "replace", "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder
