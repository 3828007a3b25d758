"""Fitting a tokenizer to one's own corpus (tokenization.train_tokenizer, medmax.tokenizer_training, medmax.data.corpus):
domain words get fewer tokens, Chameleon's layout ids stay, sequences round-trip, typed control names stay text,
bad rows are counted and named, and the output is refused or replaced as the flags say."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from medmax.data.rows import SequenceBuilder
from medmax.presets import build_tiny_tokenizer
from medmax.tokenizer_training import FIRST_TEXT_ID, chameleon_layout_tokens, fit_chameleon_bpe
from medmax.vocab import Vocabulary, encode_text, load_tokenizer
from tokenization.train_tokenizer import main

FINDINGS = ["pneumothorax", "cardiomegaly", "pleural effusion", "atelectasis", "consolidation", "pneumoperitoneum",
            "mediastinal widening", "opacity", "nodule", "fracture"]
SIDES = ["left", "right", "bilateral", "apical", "basal"]


def _reports(n: int, seed: int = 0) -> list[str]:
    """Radiology-report-like sentences: a few domain words, each in many contexts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        finding, side = rng.choice(FINDINGS), rng.choice(SIDES)
        out.append(rng.choice([f"There is a {side} {finding}.", f"No {finding} is seen.", f"Is there a {finding}? yes",
                               f"Is there {finding} on the {side}? no", f"Findings: small {side} {finding}, unchanged."]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    reports = _reports(400)
    with open(folder / "train.jsonl", "w") as f:
        for i, text in enumerate(reports[:300]):
            f.write(json.dumps({"id": i, "text": f"<image>{text}<reserved08706>"}) + "\n")
    with open(folder / "conv.jsonl", "w") as f:
        for text in reports[300:]:
            f.write(json.dumps({"conversations": [{"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": text}]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def fitted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fitted") / "tok"
    assert main(["--input", str(corpus), "--output", str(out), "--text-vocab-size", "600", "--no-progress"]) == 0
    return out


def test_domain_words_get_fewer_tokens_than_with_the_quickstart_tokenizer(fitted):
    ours, tiny = load_tokenizer(fitted / "tokenizer.json"), build_tiny_tokenizer()
    for word in ("pneumothorax", "cardiomegaly", "effusion", " pneumothorax", " yes"):
        assert len(encode_text(ours, word)) < len(encode_text(tiny, word)), word
    assert len(encode_text(ours, " pneumothorax")) == 1 and len(encode_text(ours, " yes")) == 1  # as in a sentence


def test_layout_ids_are_chameleons(fitted, tiny_tokenizer):
    tok = load_tokenizer(fitted / "tokenizer.json")
    vocab = Vocabulary.from_tokenizer(tok)  # medmax.vocab's layout checks
    assert {k: v for k, v in vocab.special_ids().items() if k != "vocab_size"} == {
        "bos": 0, "pad": 1, "eos": 2, "boi": 8197, "eoi": 8196, "eot": 8710, "image_placeholder": 8711,
        "image_code_offset": 4, "n_image_codes": 8192}
    assert [tok.id_to_token(i) for i in range(FIRST_TEXT_ID)] == chameleon_layout_tokens()
    assert FIRST_TEXT_ID < vocab.size <= FIRST_TEXT_ID + 600
    assert tok.id_to_token(FIRST_TEXT_ID) == tiny_tokenizer.id_to_token(FIRST_TEXT_ID)  # the byte alphabet comes first in both
    summary = json.loads((fitted / "summary.json").read_text())
    assert summary["rows"] == 400 and summary["rows_without_text"] == 0 and summary["vocab_size"] == vocab.size


def test_a_sequence_built_with_it_round_trips_and_runs_through_the_model(fitted, tiny_vqgan):
    from medmax.model import new_model

    tok = load_tokenizer(fitted / "tokenizer.json")
    codes = np.arange(64) * 7 % 512
    built = SequenceBuilder(tok).build({"text": "<image>Is there a pneumothorax?<reserved08706>yes, a small left pneumothorax.",
                                        "image_tokens": [codes.tolist()]})
    vocab, ids = Vocabulary.from_tokenizer(tok), built.input_ids
    assert ids[0] == vocab.bos_id and ids[1] == vocab.boi_id and ids[2 + 64] == vocab.eoi_id and ids[-1] == vocab.eos_id
    assert vocab.ids_to_codes(ids[2:66]).tolist() == codes.tolist()
    text = tok.decode(ids[67:].tolist(), skip_special_tokens=False)
    assert text == "Is there a pneumothorax?<reserved08706>yes, a small left pneumothorax.</s>"
    model = new_model("tiny", tok, tiny_vqgan, seed=0)
    assert model.config.vocab_size == vocab.size
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits  # (1, T, vocab)
    assert logits.shape == (1, len(ids), vocab.size)


def test_typed_layout_names_in_the_corpus_stay_text():
    typed = "the tokens </s> and <s> and IMGIMGBZ and <racm3:break> typed in a report"
    tok = fit_chameleon_bpe([typed] * 50, 400)
    ids = encode_text(tok, typed)  # raises ControlTokenInText if a learned merge spelled a control token
    assert tok.decode(ids) == typed and min(ids) >= FIRST_TEXT_ID


def test_fitting_is_deterministic(corpus, tmp_path):
    for name in ("a", "b"):
        assert main(["--input", str(corpus / "train.jsonl"), "--output", str(tmp_path / name), "--text-vocab-size", "500",
                     "--no-progress"]) == 0
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_rows_without_text_are_counted_and_named(tmp_path, caplog):
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "a pneumothorax"}\n[1, 2]\n{"text": null}\n{"text": "bad \xff"}\n'
                                          b'{"text": "no effusion"}\n')
    (tmp_path / "notes.csv").write_bytes(b"findings,other\nsmall nodule,x\n\xfe\xff,y\n")
    (tmp_path / "lines.txt").write_text("one line\n\nanother line\n")
    out = tmp_path / "out"
    assert main(["--input", str(tmp_path / "rows.jsonl"), str(tmp_path / "notes.csv"), str(tmp_path / "lines.txt"),
                 "--column", "text", "findings", "--output", str(out), "--text-vocab-size", "300", "--no-progress"]) == 0
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["file"].rsplit("/", 1)[-1], e["row"], e["kind"]) for e in errors] == [
        ("rows.jsonl", 2, "invalid_json"), ("rows.jsonl", 3, "no_text"), ("rows.jsonl", 4, "invalid_utf8"),
        ("notes.csv", 2, "invalid_utf8")]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["rows"], summary["texts"], summary["rows_without_text"]) == (9, 5, 4)
    assert any("4 of 9 rows gave no text" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_strict_stops_at_the_first_row_without_text(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"question": "no text column"}\n')
    assert main(["--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "out"), "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rows.jsonl row 2: no text in the columns ['text', 'conversations'] (--strict)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_corpus_without_text_is_refused(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text('{"question": "a"}\n')
    assert main(["--input", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "no text in the columns ['text', 'conversations'] of 1 input file(s), 1 rows" in capsys.readouterr().err


def test_an_existing_tokenizer_is_replaced_only_with_overwrite_and_never_an_input(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(corpus / "train.jsonl"), "--output", str(out), "--text-vocab-size", "300", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2 and "already holds a tokenizer.json; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    (out / "summary.json").write_text('{"text": "x"}\n')
    (out / "summary.json").rename(out / "errors.jsonl")
    assert main(["--input", str(out / "errors.jsonl"), "--output", str(out), "--overwrite", "--no-progress"]) == 2
    assert "is an output file of --output" in capsys.readouterr().err
