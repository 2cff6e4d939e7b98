"""Chat templates as transformers renders them; streaming decode never splits a character."""

from transformers import AutoTokenizer

from qt_serve.tokenizer import StreamDecoder, Tokenizer


def test_chat_template_matches_transformers(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    for gen in (True, False):
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert tokenizer.apply_chat_template(msgs, add_generation_prompt=gen) == want
    assert tokenizer.encode_chat(msgs) == hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                                 return_dict=False)
    assert Tokenizer.load(tmp_path).encode("café") == tokenizer.encode("café")


def test_stream_decoder_emits_whole_characters(tokenizer):
    text = "Ünïcödé: 東京 😀😀 café, naïve. <|im_end|> done"
    ids = tokenizer.encode(text)
    assert len(ids) > 10
    for skip in (False, True):
        dec = StreamDecoder(tokenizer, skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_single_bytes(tokenizer):
    # '😀' is 4 bytes; fed one byte-token at a time it must come out once, whole.
    (byte_chars, _), = tokenizer.tok.pre_tokenizer.pre_tokenize_str("😀")  # one symbol per byte
    byte_ids = [tokenizer.token_id(c) for c in byte_chars]
    assert len(byte_ids) == 4
    dec = StreamDecoder(tokenizer)
    assert [dec.push(i) for i in byte_ids] == ["", "", "", "😀"]
