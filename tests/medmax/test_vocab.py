import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from medmax.vocab import Vocabulary, image_token_code, image_token_name, load_tokenizer


def test_tiny_tokenizer_has_the_real_chameleon_layout(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab(with_added_tokens=True)
    assert (vocab["<s>"], vocab["<pad>"], vocab["</s>"]) == (0, 1, 2)
    assert vocab["IMGIMGAZ"] == 4 and vocab[image_token_name(8191)] == 8195
    assert (vocab["<eoss>"], vocab["<racm3:break>"]) == (8196, 8197)
    assert (vocab["<reserved08706>"], vocab["<image>"]) == (8710, 8711)


def test_special_tokens_are_atomic_in_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("Is it?<image><reserved08706>Yes").ids
    assert 8711 in ids and 8710 in ids
    assert ids.index(8710) == ids.index(8711) + 1


def test_vocabulary_is_derived_from_the_tokenizer(tiny_vocab):
    assert tiny_vocab.offset == 4 and tiny_vocab.n_codes == 8192
    assert tiny_vocab.boi_id == 8197 and tiny_vocab.eoi_id == 8196 and tiny_vocab.eot_id == 8710
    codes = np.array([0, 1, 8191])
    assert tiny_vocab.codes_to_ids(codes).tolist() == [4, 5, 8195]
    assert tiny_vocab.ids_to_codes(torch.tensor([4, 8195])).tolist() == [0, 8191]


def test_name_roundtrip():
    for code in (0, 7, 10, 123, 8191):
        assert image_token_code(image_token_name(code)) == code
    assert image_token_code("IMGIMGBCDZ") == 123
    assert image_token_code("<image>") is None


def test_out_of_range_codes_and_non_image_ids_are_refused(tiny_vocab):
    with pytest.raises(ValueError, match="0..8191"):
        tiny_vocab.codes_to_ids([8192])
    with pytest.raises(ValueError, match="not image-code"):
        tiny_vocab.ids_to_codes([8197])


def test_non_constant_mapping_uses_the_lookup_table():
    names = ["<s>", "<pad>", "</s>", "<racm3:break>", "<eoss>", "<reserved08706>"]
    codes = [image_token_name(c) for c in (2, 0, 1)]  # shuffled order: no constant offset
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names + codes)}, unk_token="<pad>"))
    vocab = Vocabulary.from_tokenizer(tok)
    assert vocab.offset is None
    assert vocab.codes_to_ids([0, 1, 2]).tolist() == [7, 8, 6]
    assert vocab.ids_to_codes([6, 7, 8]).tolist() == [2, 0, 1]
    assert vocab.is_image_code(torch.tensor([3, 6, 8])).tolist() == [False, True, True]


def test_load_tokenizer_from_folder(tiny_tokenizer_path, tmp_path):
    assert load_tokenizer(tiny_tokenizer_path.parent).get_vocab_size() == load_tokenizer(tiny_tokenizer_path).get_vocab_size()
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        load_tokenizer(tmp_path)


CONTROL_STRINGS = ["<racm3:break>", "<reserved08706>", "</s>", "<s>", "<pad>", "<eoss>", "<image>"]


@pytest.mark.parametrize("typed", CONTROL_STRINGS + ["".join(CONTROL_STRINGS), "a<s>b</s>c <eoss>\n<pad>"])
def test_encode_text_reads_typed_control_strings_as_text(tiny_tokenizer, tiny_vocab, typed):
    from medmax.vocab import encode_text

    text = f"Is there a lesion? {typed} yes"
    ids = encode_text(tiny_tokenizer, text)
    control = set(tiny_vocab.special_ids().values()) | {tiny_vocab.image_placeholder_id}
    assert not control & set(ids) and not tiny_vocab.is_image_code(ids).any()
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == text
    # The tokenizer's own setting is left as it was: plain encode still parses special tokens.
    assert tiny_vocab.eot_id in tiny_tokenizer.encode("<reserved08706>").ids


def test_encode_text_matches_plain_encoding_of_ordinary_text(tiny_tokenizer):
    from medmax.vocab import encode_text, encode_texts

    texts = ["Which organ is shown? A) lung B) liver", " émoji ✓ {\"x\": [1]}", ""]
    assert [encode_text(tiny_tokenizer, t) for t in texts] == [tiny_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert encode_texts(tiny_tokenizer, texts) == [encode_text(tiny_tokenizer, t) for t in texts]


def test_split_markers_with_backslash_escape():
    from medmax.vocab import split_markers

    markers = ("<image>", "<reserved08706>")
    assert split_markers("a<image>b<reserved08706>c", markers) == [("a", None), (None, "<image>"), ("b", None), (None, "<reserved08706>"), ("c", None)]
    # \<image> is the literal text; \\<image> is one backslash and then the marker; other backslashes stay.
    assert split_markers(r"say \<image> now", markers) == [("say <image> now", None)]
    assert split_markers(r"path C:\\<image>", markers) == [("path C:\\", None), (None, "<image>")]
    assert split_markers(r"a\nb \x", markers) == [(r"a\nb \x", None)]
    assert split_markers("", markers) == []


def test_a_control_token_the_tokenizer_does_not_mark_special_is_refused_not_kept(tiny_tokenizer):
    """Special-token parsing only covers tokens marked special; a control token added as a plain token
    would still match typed text, so encode_text raises instead of returning its id."""
    import json

    from medmax.data.rows import RowError, SequenceBuilder
    from medmax.vocab import ControlTokenInText, encode_text

    layout = json.loads(tiny_tokenizer.to_str())
    for token in layout["added_tokens"]:
        token["special"] = token["special"] and token["content"] != "<eoss>"
    tok = Tokenizer.from_str(json.dumps(layout))
    with pytest.raises(ControlTokenInText, match="<eoss>"):
        encode_text(tok, "a <eoss> b")
    with pytest.raises(RowError) as err:
        SequenceBuilder(tok).build({"conversations": [{"role": "user", "content": "a <eoss>"}, {"role": "assistant", "content": "b"}]})
    assert err.value.kind == "control_token_in_text"
