import numpy as np
import pytest

from medmax.data.rows import IGNORE_INDEX, LengthDrop, RowError, SequenceBuilder, SequenceConfig, detect_format

EOT = "<reserved08706>"


def medmax_published(tokenizer, text: str, image_codes: list[int]) -> tuple[list[int], list[int]]:
    """MedMax's published src/tokenization.py algorithm, written independently of medmax.data.rows.

    ids = [bos] + encode(text).ids + [eos]; the <image> id becomes [boi] + [code + 4] + [eoi];
    labels are -100 up to and including the first end-of-turn, the ids after it.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    bos, eos, boi, eoi = vocab["<s>"], vocab["</s>"], vocab["<racm3:break>"], vocab["<eoss>"]
    image_id, eot_id = vocab["<image>"], vocab[EOT]
    ids = [bos] + tokenizer.encode(text).ids + [eos]
    out = []
    for token in ids:
        out += [boi] + [c + 4 for c in image_codes] + [eoi] if token == image_id else [token]
    cut = out.index(eot_id)
    labels = [IGNORE_INDEX] * (cut + 1) + out[cut + 1 :]
    return out, labels


MEDMAX_ROWS = [
    "Is there a lesion in the image?<image>" + EOT + "Yes.",
    "<image>Which organ is shown? A) lung B) liver C) brain D) kidney." + EOT + "Answer: B",
    "Describe the image. <image> " + EOT + "The image shows a bright round lesion, upper left.",
    "Generate an image of a chest radiograph with a small nodule in the right lung." + EOT + "<image>",
    "What modality is this?\n<image>\n" + EOT + " CT {\"x\": [1, 2]} émoji ✓",
]


@pytest.fixture
def builder(tiny_tokenizer):
    return SequenceBuilder(tiny_tokenizer, SequenceConfig())


def codes(seed: int, n: int = 16, high: int = 8192) -> list[int]:
    return np.random.default_rng(seed).integers(0, high, n).tolist()


@pytest.mark.parametrize("index", range(len(MEDMAX_ROWS)))
def test_medmax_rows_match_the_published_algorithm_id_for_id(tiny_tokenizer, builder, index):
    text, image = MEDMAX_ROWS[index], codes(index)
    built = builder.build({"text": text, "image_tokens": image, "image_path": "x.png"})
    ids, labels = medmax_published(tiny_tokenizer, text, image)
    assert built.input_ids.tolist() == ids
    assert built.labels.tolist() == labels
    assert built.input_ids.dtype == np.int32 and built.format == "medmax"


def test_batch_and_single_row_builds_agree(tiny_tokenizer):
    rows = [{"text": t, "image_tokens": codes(i)} for i, t in enumerate(MEDMAX_ROWS)]
    batched = SequenceBuilder(tiny_tokenizer).build_batch(rows)
    for row, built in zip(rows, batched):
        assert built.input_ids.tolist() == SequenceBuilder(tiny_tokenizer).build(row).input_ids.tolist()


def test_each_placeholder_gets_its_own_image(builder, tiny_vocab):
    first, second = codes(1), codes(2)
    built = builder.build({"text": "Compare <image> and <image>" + EOT + "No.", "image_tokens": [first, second]})
    boi = np.flatnonzero(built.input_ids == tiny_vocab.boi_id)
    assert len(boi) == 2
    assert tiny_vocab.ids_to_codes(built.input_ids[boi[0] + 1 : boi[0] + 17]).tolist() == first
    assert tiny_vocab.ids_to_codes(built.input_ids[boi[1] + 1 : boi[1] + 17]).tolist() == second


def test_multi_turn_conversation_trains_every_assistant_turn(tiny_tokenizer, builder, tiny_vocab):
    turns = [("human", "<image>Is there a lesion?"), ("gpt", "Yes."), ("human", "Where?"), ("gpt", "upper left")]
    image = codes(3)
    built = builder.build({"conversations": [{"from": r, "value": c} for r, c in turns], "images": [image]})
    enc = lambda s: tiny_tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    v = tiny_vocab
    image_block = [v.boi_id, *v.codes_to_ids(image).tolist(), v.eoi_id]
    context1 = [v.bos_id, *image_block, *enc("Is there a lesion?"), v.eot_id]
    answer1 = [*enc("Yes."), v.eot_id]
    context2 = [*enc("Where?"), v.eot_id]
    answer2 = [*enc("upper left"), v.eot_id, v.eos_id]
    assert built.input_ids.tolist() == context1 + answer1 + context2 + answer2
    mask = lambda n: [IGNORE_INDEX] * n  # noqa: E731
    assert built.labels.tolist() == mask(len(context1)) + answer1 + mask(len(context2)) + answer2


def test_system_and_user_turns_carry_no_loss_and_roles_are_checked(builder, tiny_vocab):
    row = {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it CT?"},
                             {"role": "assistant", "content": "No."}]}
    built = builder.build(row)
    trained = built.input_ids[built.labels != IGNORE_INDEX]
    assert trained[-2:].tolist() == [tiny_vocab.eot_id, tiny_vocab.eos_id]
    assert (built.labels == IGNORE_INDEX).sum() > len(trained)
    with pytest.raises(RowError, match="unknown role 'doctor'") as err:
        builder.build({"conversations": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]})
    assert err.value.kind == "unknown_role"


def test_pretraining_rows_train_every_token_after_bos(builder, tiny_vocab):
    built = builder.build({"text": "The image shows <image> a lesion.", "modalities": [{"type": "image", "value": codes(4)}]})
    assert built.format == "pretraining"
    assert built.labels[0] == IGNORE_INDEX
    assert built.labels[1:].tolist() == built.input_ids[1:].tolist()
    assert built.input_ids[-1] == tiny_vocab.eos_id


def test_image_loss_switch_masks_image_blocks_in_answers_only(tiny_tokenizer, tiny_vocab):
    row = {"text": "Generate an image of a lesion." + EOT + "Here: <image> done", "image_tokens": codes(5)}
    with_loss = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_loss=True)).build(row)
    without = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_loss=False)).build(row)
    assert with_loss.input_ids.tolist() == without.input_ids.tolist()
    in_image = tiny_vocab.is_image_code(with_loss.input_ids)
    assert (with_loss.labels[in_image] != IGNORE_INDEX).all()
    assert (without.labels[in_image] == IGNORE_INDEX).all()
    text_answer = (~in_image) & (with_loss.labels != IGNORE_INDEX)
    text_answer &= ~np.isin(with_loss.input_ids, [tiny_vocab.boi_id, tiny_vocab.eoi_id])
    assert (without.labels[text_answer] == with_loss.labels[text_answer]).all() and text_answer.sum() > 2


def test_attachment_token_is_a_placeholder(tiny_tokenizer, tiny_vocab):
    token = "<|reserved_special_token_0|>"
    b = SequenceBuilder(tiny_tokenizer, SequenceConfig(placeholders=("<image>", token)))
    row = {"conversations": [{"role": "user", "content": f"{token} and <image>?"}, {"role": "assistant", "content": "Yes."}],
           "images": [codes(6), codes(7)]}
    assert (b.build(row).input_ids == tiny_vocab.boi_id).sum() == 2


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"text": "a <image> <image>" + EOT + "b", "image_tokens": [codes(1)]}, "placeholder_mismatch"),
        ({"text": "a" + EOT + "b", "image_tokens": [codes(1)]}, "placeholder_mismatch"),
        ({"text": "a <image>" + EOT + "b", "image_tokens": codes(1)[:-1] + [8192]}, "bad_codes"),
        ({"text": "a <image>" + EOT + "b", "image_tokens": [-1] + codes(1)[1:]}, "bad_codes"),
        ({"text": "a <image>" + EOT + "b", "image_tokens": codes(1, n=15)}, "wrong_code_count"),
        ({"text": "a <image>" + EOT + "b", "image_path": "x.png"}, "missing_image"),
        ({"text": "a <image> b", "image_tokens": codes(1)}, "no_end_of_turn"),
        ({"text": 5, "image_tokens": codes(1)}, "untokenizable"),
        ({"question": "a"}, "unknown_format"),
        ({"conversations": [{"role": "user", "content": "a"}]}, "bad_field"),
        ({"text": "x <image>", "modalities": [{"type": "audio", "value": "a.wav"}]}, "bad_field"),
    ],
)
def test_bad_rows_raise_with_their_kind(tiny_tokenizer, row, kind):
    b = SequenceBuilder(tiny_tokenizer, SequenceConfig(codes_per_image=16))
    with pytest.raises(RowError) as err:
        b.build(row)
    assert err.value.kind == kind


def test_codebook_size_narrows_the_code_range(tiny_tokenizer):
    b = SequenceBuilder(tiny_tokenizer, SequenceConfig(codebook_size=512))
    with pytest.raises(RowError, match=r"0\.\.511"):
        b.build({"text": "a<image>" + EOT + "b", "image_tokens": [600] * 16})


def test_first_image_fixes_the_code_count(tiny_tokenizer):
    b = SequenceBuilder(tiny_tokenizer)
    b.build({"text": "a<image>" + EOT + "b", "image_tokens": codes(1, n=9)})
    assert b.codes_per_image == 9
    with pytest.raises(RowError, match="expected 9"):
        b.build({"text": "a<image>" + EOT + "b", "image_tokens": codes(1, n=16)})


def test_max_length_truncates_answer_text_and_drops_cuts_through_images(tiny_tokenizer, tiny_vocab):
    row = {"text": "Is there a lesion?<image>" + EOT + "The image shows a bright round lesion.", "image_tokens": codes(8)}
    full = SequenceBuilder(tiny_tokenizer).build(row)
    answer_start = int(np.flatnonzero(full.input_ids == tiny_vocab.eot_id)[0]) + 1
    cut = answer_start + 2
    short = SequenceBuilder(tiny_tokenizer, SequenceConfig(max_length=cut)).build(row)
    assert short.truncated and short.input_ids.tolist() == full.input_ids[:cut].tolist()
    assert short.labels.tolist() == full.labels[:cut].tolist()
    boi = int(np.flatnonzero(full.input_ids == tiny_vocab.boi_id)[0])
    with pytest.raises(LengthDrop, match="through an image"):
        SequenceBuilder(tiny_tokenizer, SequenceConfig(max_length=boi + 5)).build(row)
    with pytest.raises(LengthDrop, match="before the answer"):
        SequenceBuilder(tiny_tokenizer, SequenceConfig(max_length=answer_start)).build(row)
    same = SequenceBuilder(tiny_tokenizer, SequenceConfig(max_length=len(full))).build(row)
    assert not same.truncated and len(same) == len(full)


def test_detect_format():
    assert detect_format({"text": "a" + EOT + "b"}) == "medmax"
    assert detect_format({"text": "a", "image_path": "x"}) == "medmax"
    assert detect_format({"text": "a", "modalities": []}) == "pretraining"
    assert detect_format({"text": "plain text"}) == "pretraining"
    assert detect_format({"conversations": [], "text": "a"}) == "conversation"
    with pytest.raises(RowError, match="fits no input format"):
        detect_format({"text": None, "other": 1})


def test_llava_row_with_one_image_path_uses_the_resolver(tiny_tokenizer, tiny_vocab):
    table = {"coco/1.jpg": np.array(codes(9))}
    b = SequenceBuilder(tiny_tokenizer, resolve_image=table.__getitem__)
    row = {"id": "1", "image": "coco/1.jpg", "images": None,
           "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A lung."}]}
    built = b.build(row)
    assert built.format == "conversation" and built.n_images == 1
    assert tiny_vocab.ids_to_codes(built.input_ids[tiny_vocab.is_image_code(built.input_ids)]).tolist() == codes(9)


TYPED = "<racm3:break> <reserved08706> </s> <s> <pad> <eoss> <reserved08000>"


def _structure_ids(vocab) -> set:
    return {vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.boi_id, vocab.eoi_id, vocab.eot_id, vocab.image_placeholder_id}


def test_typed_control_strings_in_conversations_stay_text(tiny_tokenizer, builder, tiny_vocab):
    v = tiny_vocab
    row = {"conversations": [{"role": "system", "content": f"sys {TYPED}"}, {"role": "user", "content": f"<image> q {TYPED}"},
                             {"role": "assistant", "content": f"a {TYPED}"}], "images": [codes(1)]}
    built = builder.build(row)
    ids = built.input_ids.tolist()
    # Structure only: bos, one image block, three end-of-turns, eos.
    assert ids.count(v.bos_id) == 1 and ids.count(v.boi_id) == 1 and ids.count(v.eoi_id) == 1
    assert ids.count(v.eot_id) == 3 and ids.count(v.eos_id) == 1 and v.pad_id not in ids
    text = [i for i in ids if i not in _structure_ids(v) and not v.is_image_code([i])[0]]
    assert tiny_tokenizer.decode(text, skip_special_tokens=False) == f"sys {TYPED}" + f" q {TYPED}" + f"a {TYPED}"


def test_typed_control_strings_in_pretraining_rows_stay_text(tiny_tokenizer, builder, tiny_vocab):
    # A text row with an unescaped end-of-turn is a MedMax row; a pretraining row writes it escaped.
    assert detect_format({"text": f"caption {TYPED}"}) == "medmax"
    typed = TYPED.replace("<reserved08706>", "\\<reserved08706>")
    built = builder.build({"text": f"caption {typed}"})
    assert built.format == "pretraining"
    ids = built.input_ids.tolist()
    assert ids[0] == tiny_vocab.bos_id and ids[-1] == tiny_vocab.eos_id
    assert not _structure_ids(tiny_vocab) & set(ids[1:-1])
    assert tiny_tokenizer.decode(ids[1:-1], skip_special_tokens=False) == f"caption {TYPED}"


def test_medmax_rows_with_typed_control_strings_differ_from_the_published_algorithm_on_purpose(tiny_tokenizer, builder, tiny_vocab):
    """MedMax's src/tokenization.py encodes the whole text with special-token parsing on, so a typed
    ``</s>`` or ``<racm3:break>`` becomes end-of-sequence / begin-of-image. Here only ``<image>`` and the
    end-of-turn ``<reserved08706>`` are structure in a MedMax row; every other control string is text."""
    v = tiny_vocab
    typed = "<racm3:break> </s> <s> <pad> <eoss>"
    text = f"Is there a lesion {typed}?<image>" + EOT + f"Yes {typed}."
    image = codes(2)
    built = builder.build({"text": text, "image_tokens": image})
    published, _ = medmax_published(tiny_tokenizer, text, image)
    assert published.count(v.boi_id) == 3 and published.count(v.eos_id) == 3  # two typed of each: the injection we refuse
    ids = built.input_ids.tolist()
    assert ids.count(v.boi_id) == 1 and ids.count(v.eoi_id) == 1 and ids.count(v.eos_id) == 1 and ids.count(v.bos_id) == 1
    assert ids.count(v.eot_id) == 1 and v.pad_id not in ids
    boi = ids.index(v.boi_id)
    eot = ids.index(v.eot_id)
    prompt, answer = ids[1:boi], ids[eot + 1 : -1]
    assert tiny_tokenizer.decode(prompt, skip_special_tokens=False) == f"Is there a lesion {typed}?"
    assert tiny_tokenizer.decode(answer, skip_special_tokens=False) == f"Yes {typed}."
    assert built.labels[: eot + 1].tolist() == [IGNORE_INDEX] * (eot + 1) and built.labels[eot + 1 :].tolist() == ids[eot + 1 :]


@pytest.mark.parametrize("row", [
    {"text": r"Write \<image> literally." + EOT + "ok", "image_tokens": []},
    {"conversations": [{"role": "user", "content": r"Write \<image> literally."}, {"role": "assistant", "content": "ok"}]},
    {"text": r"Write \<image> literally."},
])
def test_escaped_placeholder_is_literal_text(tiny_tokenizer, builder, tiny_vocab, row):
    built = builder.build(row)
    assert tiny_vocab.boi_id not in built.input_ids and tiny_vocab.image_placeholder_id not in built.input_ids
    assert "Write <image> literally." in tiny_tokenizer.decode(built.input_ids.tolist(), skip_special_tokens=False)
    assert built.n_images == 0


def test_hf_datasets_image_structs_and_bytes_reach_the_resolver(tiny_tokenizer, tiny_vocab):
    seen = []

    def resolve(ref):
        seen.append(ref)
        return np.array(codes(len(seen)))

    b = SequenceBuilder(tiny_tokenizer, resolve_image=resolve)
    conv = [{"role": "user", "content": "<image><image><image> Which?"}, {"role": "assistant", "content": "B"}]
    images = [{"bytes": b"PNG1", "path": "x.png"}, {"bytes": None, "path": "y.png"}, b"PNG3"]
    built = b.build({"conversations": conv, "images": images})
    assert seen == [b"PNG1", "y.png", b"PNG3"] and built.n_images == 3
    with pytest.raises(RowError, match="neither bytes nor a path") as err:
        b.build({"conversations": conv, "images": [{"bytes": None, "path": None}] * 3})
    assert err.value.kind == "missing_image"


def test_medmax_text_with_an_image_column_is_a_medmax_row(tiny_tokenizer, tiny_vocab):
    """A MedMax row shipped Hugging Face style: ``text`` with the end-of-turn, the image as a bytes struct."""
    assert detect_format({"text": "Q<image>" + EOT + "A", "image": {"bytes": b"x", "path": None}}) == "medmax"
    b = SequenceBuilder(tiny_tokenizer, resolve_image=lambda ref: np.array(codes(3)))
    built = b.build({"text": "Q<image>" + EOT + "A", "image": {"bytes": b"x", "path": None}})
    assert built.format == "medmax" and built.n_images == 1
    eot = built.input_ids.tolist().index(tiny_vocab.eot_id)
    assert (built.labels[: eot + 1] == IGNORE_INDEX).all()


def test_a_post_processor_stays_around_medmax_text_on_both_paths(tiny_tokenizer, tiny_vocab):
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tiny_tokenizer.to_str())
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    b = SequenceBuilder(tok)
    image = codes(1)
    plain = "Is it?<image>" + EOT + "Yes."
    assert b.build({"text": plain, "image_tokens": image}).input_ids.tolist() == medmax_published(tok, plain, image)[0]
    ids = b.build({"text": "Is </s> it?<image>" + EOT + "Yes.", "image_tokens": image}).input_ids.tolist()
    assert ids[:2] == [tiny_vocab.bos_id, tiny_vocab.bos_id] and ids.count(tiny_vocab.eos_id) == 1
