"""The tokenizers: GPT-2 built offline (GPT-2's ids, no cache files left behind), a Hugging Face
tokenizer.json and a SentencePiece model behind one interface, their identities and the files
recorded beside the shards."""

import hashlib
import os
import shutil

import fsspec
import pytest
from helpers import train_bpe, train_sentencepiece

from pretrain.data.tokenizer import (
    ENCODER_FILE,
    MERGES_FILE,
    TokenizerSpec,
    gpt2_files_dir,
    gpt2_tokenizer,
    load_recorded_tokenizer,
    load_tokenizer,
)
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
    assert enc.decode(enc.encode(text)) == text


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
    assert enc.encode(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert enc.eos_id == 50256 and enc.identity()["sha256"] == load_tokenizer("gpt2").identity()["sha256"]


def test_mismatched_local_files_name_the_directory(tmp_path):
    shutil.copy(gpt2_files_dir() / ENCODER_FILE, tmp_path / ENCODER_FILE)
    merges = (gpt2_files_dir() / MERGES_FILE).read_text(encoding="utf-8").splitlines()
    (tmp_path / MERGES_FILE).write_text("\n".join(merges[:100]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))


def test_unknown_tokenizer_is_a_user_error():
    with pytest.raises(UserError, match="'llama-nope'"):
        load_tokenizer("llama-nope")


# --------------------------------------------------------------------------- any tokenizer

TEXT = "the quick brown fox, naïve café 日本語 🚀\n\ttabs and </s> <s> <|endoftext|> written as text"


@pytest.fixture
def hf(tmp_path):
    """A byte-level BPE tokenizer.json (vocab 300: <pad> 0, <s> 1, </s> 2) in a directory named my-bpe."""
    return train_bpe(tmp_path / "my-bpe")


@pytest.fixture
def sp(tmp_path):
    """A SentencePiece model (vocab 400: unk 0, <s> 1, </s> 2)."""
    return train_sentencepiece(tmp_path / "my-sp.model")


@pytest.mark.parametrize("kind", ["gpt2", "hf", "sp"])
def test_each_kind_round_trips_text_without_parsing_specials_in_it(kind, hf, sp):
    spec = {"gpt2": "gpt2", "hf": str(hf), "sp": str(sp)}[kind]
    tokenizer = TokenizerSpec(spec).load()
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.eos_id not in ids and all(0 <= i < tokenizer.vocab_size for i in ids)


def test_identities_record_name_kind_vocab_sha256_eos_and_bos(hf, sp):
    def sha(name, path):
        data = path.read_bytes()
        return hashlib.sha256(f"{name}\0{len(data)}\0".encode() + data).hexdigest()

    assert TokenizerSpec(str(hf)).load().identity() == {
        "name": "my-bpe",  # a tokenizer.json is named after its directory
        "kind": "hf-tokenizers",
        "vocab_size": 300,
        "sha256": sha("tokenizer.json", hf),
        "eos": 2,
        "bos": 1,
        "files": ["tokenizer.json"],
    }
    assert load_tokenizer(str(hf.parent)).identity() == load_tokenizer(str(hf)).identity()  # or its directory
    assert TokenizerSpec(str(sp)).load().identity() == {
        "name": "my-sp",
        "kind": "sentencepiece",
        "vocab_size": 400,
        "sha256": sha("tokenizer.model", sp),
        "eos": 2,
        "bos": 1,
        "files": ["tokenizer.model"],
    }
    gpt2 = TokenizerSpec().load().identity()
    assert [gpt2[k] for k in ("name", "kind", "vocab_size", "eos", "bos")] == ["gpt2", "gpt2-bpe", 50257, 50256, None]


def test_eos_and_bos_are_named_by_their_tokens(hf, tmp_path):
    tokenizer = TokenizerSpec(str(hf), eos_token="<pad>", bos_token="").load()
    assert (tokenizer.eos_id, tokenizer.bos_id) == (0, None)
    with pytest.raises(UserError, match=r"--eos-token '<end>' is not a token of tokenizer .*tokenizer\.json"):
        TokenizerSpec(str(hf), eos_token="<end>").load()
    with pytest.raises(UserError, match="BOS and EOS are the same id 2.*--bos-token ''"):
        TokenizerSpec(str(hf), bos_token="</s>").load()
    no_eos = train_bpe(tmp_path / "no-eos", specials=("<pad>", "<unk>"))
    with pytest.raises(UserError, match=f"tokenizer {no_eos} has no end-of-document token.*pass --eos-token"):
        TokenizerSpec(str(no_eos)).load()
    assert TokenizerSpec(str(no_eos), eos_token="<unk>").load().eos_id == 1


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("tokenizer.json", b"{not json", "is not a Hugging Face tokenizer.json"),
        ("tokenizer.json", b"\xff\xfe", "is not a Hugging Face tokenizer.json"),
        ("bad.model", b"not a protobuf", "is not a SentencePiece model"),
        ("vocab.txt", b"a\nb\n", "is neither 'gpt2', a tokenizer.json, a SentencePiece .model file"),
    ],
)
def test_a_bad_tokenizer_file_is_one_line_naming_it(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_recorded_tokenizer_loads_from_its_copy_and_refuses_changed_files(hf, sp, tmp_path):
    fs = fsspec.filesystem("file")
    for spec in (str(hf), str(sp)):
        tokenizer = TokenizerSpec(spec, bos_token="").load()
        copy = tmp_path / "copy" / tokenizer.kind
        tokenizer.write_files(fs, str(copy))
        recorded = load_recorded_tokenizer({**tokenizer.identity(), "url": str(copy)}, {})
        assert recorded.identity() == tokenizer.identity() and recorded.encode(TEXT) == tokenizer.encode(TEXT)
        (file,) = copy.iterdir()
        file.write_bytes(file.read_bytes() + b" ")
        with pytest.raises(UserError, match=f"tokenizer {copy} .* is not the recorded tokenizer '{tokenizer.name}'"):
            load_recorded_tokenizer({**tokenizer.identity(), "url": str(copy)}, {})
    gpt2 = TokenizerSpec().load()
    assert load_recorded_tokenizer(gpt2.identity(), {}).encode(TEXT) == gpt2.encode(TEXT)  # no url: installed
    with pytest.raises(UserError, match="has no url of its files"):
        load_recorded_tokenizer(TokenizerSpec(str(hf)).load().identity(), {})
    with pytest.raises(UserError, match="cannot read tokenizer file .*nowhere/tokenizer.json"):
        load_recorded_tokenizer({**TokenizerSpec(str(hf)).load().identity(), "url": str(tmp_path / "nowhere")}, {})
    with pytest.raises(UserError, match="has no valid tokenizer identity"):
        load_recorded_tokenizer({"name": "gpt2", "vocab_size": 50257, "eot": 50256}, {})
