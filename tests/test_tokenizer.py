"""The offline GPT-2 tokenizer gives GPT-2's ids and leaves no cache files behind."""

import os
import shutil

import pytest

from pretrain.data.tokenizer import ENCODER_FILE, MERGES_FILE, gpt2_files_dir, gpt2_tokenizer, load_tokenizer
from pretrain.errors import UserError

# Ids from OpenAI's GPT-2 encoder (the same ones tiktoken's downloaded "gpt2" encoding gives).
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " the quick brown fox": [262, 2068, 7586, 21831],
    "Hello, world!": [15496, 11, 995, 0],
    "hello": [31373],
    "\n": [198],
    "The": [464],
}


@pytest.mark.parametrize("text, ids", KNOWN_IDS.items())
def test_known_gpt2_ids(text, ids):
    assert gpt2_tokenizer().encode_ordinary(text) == ids


def test_endoftext_is_special_50256():
    enc = gpt2_tokenizer()
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257


def test_unicode_round_trip():
    text = "Ünïcödé — 日本語のテキスト, emoji 🚀 and tabs\tand\r\nnewlines"
    enc = load_tokenizer("gpt2")
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_no_tiktoken_cache_written_and_env_restored(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    gpt2_tokenizer.cache_clear()
    try:
        gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()
    assert not cache.exists()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)


def test_local_directory_tokenizer(tmp_path):
    for name in (ENCODER_FILE, MERGES_FILE):
        shutil.copy(gpt2_files_dir() / name, tmp_path / name)
    enc = load_tokenizer(str(tmp_path))
    assert enc.encode_ordinary(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert enc.eot_token == 50256


def test_mismatched_local_files_name_the_directory(tmp_path):
    shutil.copy(gpt2_files_dir() / ENCODER_FILE, tmp_path / ENCODER_FILE)
    merges = (gpt2_files_dir() / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    (tmp_path / MERGES_FILE).write_text("\n".join(merges[:100]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="'llama-nope'"):
        load_tokenizer("llama-nope")
