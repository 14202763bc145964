"""Our CLIP BPE tokenizer vs transformers' CLIPTokenizer, with the bundled vocabulary and a tiny custom one."""

from __future__ import annotations

import json
import logging
import unicodedata

import pytest

from fastface.models.tokenizer import CLIPTokenizer, bundled_vocab, clean_text, pre_tokenize, write_vocab_folder

import transformers

PROMPTS = [
    "",
    "a photo of a cat",
    "anime-style drawing; person in a high school classroom daydreaming",
    "A Photo Of A Man, Portrait, 85mm, f/1.8, Bokeh",
    "  extra   spaces\t\nand\r\nnewlines  ",
    "Café naïve résumé Ångström ÉCOLE",
    "東京タワーの夜景, 서울, 北京烤鸭",
    "emoji 🙂👍🏽 and ❤️ flags 🇯🇵",
    "it's they're I'LL we've she'd I'm don't ''s 'S",
    "numbers 12345 3.14 1,000,000 ½ ² Ⅻ ٣",
    "punctuation!!! ??? ... --- (parentheses) [brackets] {braces} @#$%^&*_+=~`|\\/<>",
    "wow!!! hi! !!",
    "<|startoftext|>special<|endoftext|> tokens <|EndOfText|>'s <|STARTOFTEXT|>",
    "ΟΔΟΣ Σ İstanbul ǅ ﬁ ligature",
    "zero\u200bwidth \x00 control \x1c chars \xa0nbsp\u3000ideographic",
    "an extremely long prompt " + "with many many words, " * 30,
    "x" * 400,
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return write_vocab_folder(root / "tokenizer"), write_vocab_folder(root / "tokenizer_2", pad_token="!")


def reference_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize("which", [0, 1])
def test_bundled_vocab_matches_transformers(folders, which):
    ref = transformers.CLIPTokenizer.from_pretrained(folders[which])
    ours = CLIPTokenizer.from_folder(folders[which])
    bundled = CLIPTokenizer.bundled(pad_token="!" if which else "<|endoftext|>")
    assert ours.pad_id == ref.pad_token_id == (0 if which else 49407)
    expected = reference_ids(ref, PROMPTS)
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    assert got.tolist() == expected
    assert bundled(PROMPTS).tolist() == expected
    assert got[:, 0].eq(49406).all()


def test_vocab_shape_and_special_ids():
    vocab, merges = bundled_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0


def test_unicode_sample_matches_transformers(folders):
    """Every 37th assigned code point, in letter/number/other/space contexts (checks the class tables)."""
    ref = transformers.CLIPTokenizer.from_pretrained(folders[1])
    ours = CLIPTokenizer.from_folder(folders[1])
    chars = [chr(c) for c in range(0, 0x30000, 37) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    texts = [f"a{c}b {c}{c}1{c}'s {c}" for c in chars]
    expected = ref(texts, add_special_tokens=False).input_ids
    mismatched = [hex(ord(c)) for c, t, e in zip(chars, texts, expected) if ours.encode(t) != e]
    assert not mismatched


def test_truncation_warns_with_count(folders, caplog):
    tok = CLIPTokenizer.from_folder(folders[0])
    prompt = "red " * 80
    with caplog.at_level(logging.WARNING, logger="fastface.models.tokenizer"):
        ids = tok(prompt)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407
    assert "5 of its 80 tokens were cut" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastface.models.tokenizer"):
        tok("red " * 75)
    assert caplog.text == ""


def test_cleanup_and_pretokenize():
    assert clean_text("  A\t\nB  ") == " a b "
    assert pre_tokenize("it's 12 ab!? <|endoftext|>x") == ["it", "'s", "1", "2", "ab", "!?", "<|", "endoftext", "|>", "x"]


def test_tiny_custom_vocab_matches_transformers(tmp_path):
    symbols = ["a", "b", "c", "!"]
    tokens = ["!", *symbols[:3], *(s + "</w>" for s in symbols)]
    merges = [("a", "b"), ("ab", "c</w>"), ("b", "c</w>"), ("a", "b</w>"), ("c", "a</w>"), ("ab", "c")]
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    ref = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=12)
    ours = CLIPTokenizer.from_folder(folder, max_length=12)
    prompts = ["abc cab abca", "bc ab abcabc", "xyz abz!", "ABC  c", ""]
    assert ours(prompts).tolist() == ref(prompts, padding="max_length", max_length=12, truncation=True).input_ids


def test_bpe_cache_consistent():
    tok = CLIPTokenizer.bundled()
    first = tok("daydreaming daydreaming").tolist()[0]
    assert first[1:3] == first[3:5] and "daydreaming" in tok._cache
    assert tok("daydreaming daydreaming").tolist()[0] == first


# ---- errors ---------------------------------------------------------------------------------------------------


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no 'vocab.json' found"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match="not a valid JSON vocabulary"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="has no token '<\\|startoftext\\|>'"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="line 2 is not a merge of two symbols"):
        CLIPTokenizer.from_folder(tmp_path)


def test_bad_inputs():
    vocab, merges = bundled_vocab()
    with pytest.raises(ValueError, match="special token 'zzz_not_there'"):
        CLIPTokenizer(vocab, merges, special_tokens={"zzz_not_there": False})
    with pytest.raises(ValueError, match="merge .* not in the vocabulary"):
        CLIPTokenizer(vocab, [("zz_a", "zz_b")])
    with pytest.raises(ValueError, match="max_length"):
        CLIPTokenizer(vocab, merges, max_length=1)
    with pytest.raises(ValueError, match="prompt must be a string"):
        CLIPTokenizer.bundled()([None])


def test_long_prompt_is_one_short_line(folders, caplog):
    """A 500-word prompt: one line naming the count and the first dropped words (it used to quote every dropped token)."""
    tok = CLIPTokenizer.from_folder(folders[0])
    words = [f"word{i}" for i in range(500)]
    with caplog.at_level(logging.WARNING, logger="fastface.models.tokenizer"):
        tok(" ".join(words))
    (record,) = caplog.records
    msg = record.getMessage()
    n = len(tok.encode(" ".join(words)))
    assert "\n" not in msg and len(msg) < 250, msg
    assert msg.startswith(f"Prompt too long for CLIP: {n - 75} of its {n} tokens were cut (limit 75), the cut starts: ")
    cut = tok.decode(tok.encode(" ".join(words))[75:]).split()
    assert " ".join(cut[:8]) + " ..." in msg and "word499" not in msg


def test_sdxl_conditioner_warns_once_for_both_tokenizers(folders, caplog):
    import torch

    from fastface.models.text import CLIPTextEncoder, SDXLTextConditioner

    torch.manual_seed(0)
    cond = SDXLTextConditioner(CLIPTokenizer.from_folder(folders[0]), CLIPTokenizer.from_folder(folders[1]),
                               CLIPTextEncoder("tiny-clip-l"), CLIPTextEncoder("tiny-bigg"))
    with caplog.at_level(logging.WARNING, logger="fastface.models.tokenizer"):
        cond.encode("red " * 100)
    assert len(caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastface.models.tokenizer"):  # a different bigG prompt: its own line
        cond.encode("red " * 100, prompts_2="blue " * 90)
    assert len(caplog.records) == 2 and "of its 90 tokens" in caplog.records[1].getMessage()
