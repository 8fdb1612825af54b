from harness.api.tokenizer import gpt2_tokenizer


def test_gpt2_bpe_known_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot_id == 50256
    assert tok.vocab_size == 50257


def test_gpt2_bpe_round_trip_and_special_token():
    tok = gpt2_tokenizer()
    text = ' = Robert Boulter = \n \n He said "it\'s 3.5 km"  twice\u2014ok?'
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
