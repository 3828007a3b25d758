"""medmax-convert: every released layout into a model folder, checked against a forward pass in Meta's parameterisation.

The original-layout fixtures (``tests/meta_release.py``) are written with the file names, nesting and quirks of
the Chameleon / Anole / MedMax releases; see that module's docstring for the sources.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finetune.convert import main as convert_main
from medmax.checkpoints import check_model_folder
from medmax.model import MedMaxChameleon, load_model_dir, new_model
from medmax.presets import VQGAN_PRESETS
from medmax.vqgan import VQGAN
from tests.meta_release import meta_forward, release_params, write_release

TEXT_IDS = torch.tensor([8712, 8800, 9001, 8750, 9100, 8999, 8713, 9200, 8760, 9050, 8901, 9265])


def _logits(folder: Path, ids: torch.Tensor = TEXT_IDS) -> torch.Tensor:
    model = MedMaxChameleon.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].double()


VARIANTS = {
    "7b-like": dict(shards=1),
    "30b-like-4-shards": dict(shards=4),
    "swin-norm-2-shards-rope-theta-500000": dict(shards=2, swin_norm=True, rope_theta=500000.0),
    "grouped-kv-heads": dict(shards=1, n_kv_heads=2),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_logits_equal_the_meta_layout_forward(tmp_path, tiny_tokenizer, tiny_vqgan, variant):
    settings = VARIANTS[variant]
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, **settings)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 0
    params = release_params(**{k: v for k, v in settings.items() if k != "shards"})
    expected = meta_forward(state, params, TEXT_IDS)
    got = _logits(tmp_path / "out")
    assert expected.abs().max() > 1  # logits far from zero: a wrong mapping cannot hide in the tolerance
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_without_the_rotary_permutation_the_logits_would_differ(tmp_path, tiny_tokenizer, tiny_vqgan):
    """The comparison above can fail: the same weights with wq/wk left in Meta's row order give other logits."""
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=1)
    convert_main(["--input", str(root), "--output", str(tmp_path / "out")])
    model = MedMaxChameleon.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.weight.copy_(state[0][f"layers.{i}.attention.wq.weight"])
            layer.self_attn.k_proj.weight.copy_(state[0][f"layers.{i}.attention.wk.weight"])
        wrong = model(input_ids=TEXT_IDS[None]).logits[0].double()
    expected = meta_forward(state, release_params(), TEXT_IDS)
    assert (wrong - expected).abs().max() > 1e-2


def test_config_tokenizer_and_vqgan_of_a_medmax_release(tmp_path, tiny_tokenizer, tiny_vqgan):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=4, swin_norm=True,
                            rope_theta=500000.0, vocab_size=9280)
    convert_main(["--input", str(root), "--output", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    assert config["max_position_embeddings"] == 16384  # transformers' converter's rule above theta 10000
    assert (config["swin_norm"], config["vocab_size"], config["model_parallel_size"]) == (True, 9280, 4)
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (32, 96, 4)
    assert config["vocabulary_map"] == tiny_tokenizer.get_vocab(with_added_tokens=True)
    assert config["image_token_id"] == 8711  # MedMax's <image>, the id of Chameleon's <reserved08707>
    assert config["vq_config"]["num_embeddings"] == tiny_vqgan.n_embed
    bundle = load_model_dir(tmp_path / "out")
    assert bundle.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()  # text_tokenizer_modified.json preferred
    for key, value in tiny_vqgan.state_dict().items():
        assert torch.equal(bundle.vqgan.state_dict()[key], value), key  # decoder included
    assert check_model_folder(tmp_path / "out")["tensors"] > 0


def test_a_chameleon_release_keeps_its_own_tokenizer(tmp_path, tiny_tokenizer, tiny_vqgan):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, medmax=False)
    convert_main(["--input", str(root), "--output", str(tmp_path / "out")])
    vocab = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab["<reserved08707>"] == 8711 and "<image>" not in vocab


def test_a_release_in_bfloat16_stays_bfloat16_and_can_be_cast(tmp_path, tiny_tokenizer, tiny_vqgan):
    from safetensors import safe_open

    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, dtype=torch.bfloat16)
    convert_main(["--input", str(root), "--output", str(tmp_path / "bf16")])
    convert_main(["--input", str(root), "--output", str(tmp_path / "fp32"), "--dtype", "float32"])
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
        assert torch.equal(embed, state[0]["tok_embeddings.weight"])  # bf16, bit for bit
        assert f.get_tensor("model.vqmodel.encoder.conv_in.weight").dtype == torch.float32  # the VQGAN as stored
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32


def test_several_weight_files_with_an_index_load_the_same_model(tmp_path, tiny_tokenizer, tiny_vqgan):
    from finetune.convert import convert_original

    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=4)
    convert_original(root, tmp_path / "out", max_shard_bytes=300_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(tmp_path / "out"), meta_forward(state, release_params(), TEXT_IDS),
                               atol=2e-5, rtol=1e-5)


def test_the_models_folder_itself_and_a_choice_of_size(tmp_path, tiny_tokenizer, tiny_vqgan):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, size="30b", shards=4)
    assert convert_main(["--input", str(root / "models" / "30b"), "--output", str(tmp_path / "a")]) == 0
    assert convert_main(["--input", str(root), "--model-size", "30b", "--output", str(tmp_path / "b")]) == 0
    assert convert_main(["--input", str(root), "--model-size", "7b", "--output", str(tmp_path / "c")]) == 2


def _rewrite_shard(path: Path, **changes) -> None:
    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save(state, path)


def test_replicated_norms_that_differ_between_shards_are_refused_or_averaged(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=4)
    shard = root / "models" / "7b" / "consolidated.02.pth"
    changed = state[2]["layers.1.ffn_norm.weight"] + 0.5
    _rewrite_shard(shard, **{"layers.1.ffn_norm.weight": changed})
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "consolidated.02.pth" in err and "layers.1.ffn_norm.weight" in err
    assert not (tmp_path / "out").exists()
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "avg"), "--allow-norm-mismatch"]) == 0
    model = MedMaxChameleon.from_pretrained(tmp_path / "avg", dtype=torch.float32)
    expected = (3 * state[0]["layers.1.ffn_norm.weight"] + changed) / 4
    torch.testing.assert_close(model.model.layers[1].post_attention_layernorm.weight.detach(), expected)


@pytest.mark.parametrize("fault, message", [
    ("missing-shard", "3 checkpoint file(s) but model_parallel_size 4"),
    ("wrong-shape", "layers.0.attention.wq.weight is (4, 32)"),
    ("no-qk-norm", "qk_normalization is false"),
    ("extra-tensor", "unexpected ['layers.0.attention.bogus.weight']"),
    ("gap-in-numbering", "are not numbered 00..03"),
])
def test_a_broken_release_is_refused_with_the_file_and_the_reason(tmp_path, tiny_tokenizer, tiny_vqgan, capsys,
                                                                 fault, message):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=4)
    model_dir = root / "models" / "7b"
    if fault == "missing-shard":
        (model_dir / "consolidated.03.pth").unlink()
    elif fault == "wrong-shape":
        _rewrite_shard(model_dir / "consolidated.01.pth", **{"layers.0.attention.wq.weight": torch.zeros(4, 32)})
    elif fault == "no-qk-norm":
        params = json.loads((model_dir / "params.json").read_text())
        params["model"]["qk_normalization"] = False
        (model_dir / "params.json").write_text(json.dumps(params))
    elif fault == "extra-tensor":
        _rewrite_shard(model_dir / "consolidated.00.pth", **{"layers.0.attention.bogus.weight": torch.zeros(2)})
    else:
        (model_dir / "consolidated.03.pth").rename(model_dir / "consolidated.04.pth")
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (str(Path(os.environ["MEDMAX_TEST_MARKER"])),))


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path, tiny_tokenizer, tiny_vqgan, capsys, monkeypatch):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("MEDMAX_TEST_MARKER", str(marker))
    torch.save({**state[0], "extra": _RunsCode()}, root / "models" / "7b" / "consolidated.pth")
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    assert "not a plain tensor checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_legacy_non_zip_checkpoint_is_read_whole_with_a_warning(tmp_path, tiny_tokenizer, tiny_vqgan, caplog):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    torch.save(state[0], root / "models" / "7b" / "consolidated.pth", _use_new_zipfile_serialization=False)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 0
    assert "cannot be memory-mapped" in caplog.text
    torch.testing.assert_close(_logits(tmp_path / "out"), meta_forward(state, release_params(), TEXT_IDS),
                               atol=2e-5, rtol=1e-5)


def test_rope_freqs_that_disagree_with_rope_theta_are_reported(tmp_path, tiny_tokenizer, tiny_vqgan, caplog):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    _rewrite_shard(root / "models" / "7b" / "consolidated.pth", **{"rope.freqs": state[0]["rope.freqs"] * 2})
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 0
    assert "rope.freqs does not match rope_theta" in caplog.text


def test_an_existing_output_is_never_mixed_with(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert_main(["--input", str(root), "--output", str(out)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_model_folder_is_checked_and_nothing_is_written(tmp_path, tiny_model_dir, caplog, capsys):
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tiny_model_dir.rglob("*"))
    assert convert_main(["--input", str(tiny_model_dir)]) == 0
    assert "valid model folder, nothing to convert" in caplog.text
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tiny_model_dir.rglob("*")) == before
    assert convert_main(["--input", str(tiny_model_dir), "--output", str(tmp_path / "copy")]) == 2
    assert "already a model folder" in capsys.readouterr().err and not (tmp_path / "copy").exists()


def test_a_model_folder_whose_vqgan_does_not_belong_is_reported(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    from medmax.model import save_model_dir

    torch.manual_seed(99)
    other = VQGAN.from_params(VQGAN_PRESETS["tiny"])
    save_model_dir(tmp_path / "model", new_model("tiny", tiny_tokenizer, tiny_vqgan), tiny_tokenizer, other)
    assert convert_main(["--input", str(tmp_path / "model")]) == 2
    assert "differs from vqgan/" in capsys.readouterr().err


def _hf_folder(path, tokenizer, vqgan):
    """What transformers' converter writes: the transformer with the VQGAN encoder only."""
    new_model("tiny", tokenizer, vqgan, seed=1).save_pretrained(path)
    return path


def test_a_hugging_face_folder_gets_the_decoder_and_tokenizer_of_the_release(tmp_path, tiny_tokenizer, tiny_vqgan):
    original, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    hf = _hf_folder(tmp_path / "hf", tiny_tokenizer, tiny_vqgan)
    assert convert_main(["--input", str(hf), "--original", str(original), "--output", str(tmp_path / "out"),
                         "--dtype", "float32"]) == 0
    bundle = load_model_dir(tmp_path / "out")
    for key, value in tiny_vqgan.state_dict().items():
        assert torch.equal(bundle.vqgan.state_dict()[key], value), key  # decoder included
    assert bundle.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    check_model_folder(tmp_path / "out")


def test_a_hugging_face_folder_needs_the_release_and_the_same_vqgan(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    original, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    torch.manual_seed(99)
    hf = _hf_folder(tmp_path / "hf", tiny_tokenizer, VQGAN.from_params(VQGAN_PRESETS["tiny"]))
    assert convert_main(["--input", str(hf), "--output", str(tmp_path / "out")]) == 2
    assert "--original" in capsys.readouterr().err
    assert convert_main(["--input", str(hf), "--original", str(original), "--output", str(tmp_path / "out")]) == 2
    assert "model.vqmodel differs" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["params.json top level", "counted from the files"])
def test_model_parallel_size_may_sit_in_params_json_or_be_counted(tmp_path, tiny_tokenizer, tiny_vqgan, where):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=4)
    model_dir = root / "models" / "7b"
    (model_dir / "consolidate_params.json").unlink()
    if where == "params.json top level":
        params = json.loads((model_dir / "params.json").read_text())
        (model_dir / "params.json").write_text(json.dumps({"model_parallel_size": 4, **params}))
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_parallel_size"] == 4


def test_a_lightning_vqgan_checkpoint_with_objects_needs_trust(tmp_path, tiny_tokenizer, tiny_vqgan, capsys):
    """Lightning stores hyper-parameters as objects; only --trust-checkpoint unpickles them (the .pth never)."""
    import argparse

    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    ckpt = torch.load(root / "tokenizer" / "vqgan.ckpt", weights_only=True)
    torch.save({**ckpt, "hyper_parameters": argparse.Namespace(embed_dim=32)}, root / "tokenizer" / "vqgan.ckpt")
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out"), "--trust-checkpoint"]) == 0


def test_a_single_numbered_shard_is_a_one_shard_release(tmp_path, tiny_tokenizer, tiny_vqgan):
    """transformers' converter and Meta's loader both accept consolidated.00.pth for a one-file model."""
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    model_dir = root / "models" / "7b"
    (model_dir / "consolidated.pth").rename(model_dir / "consolidated.00.pth")
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 0
    torch.testing.assert_close(_logits(tmp_path / "out"), meta_forward(state, release_params(), TEXT_IDS),
                               atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Hostile releases (issue 23): one line naming the file and key, before anything is built


def _set_param(model_dir: Path, key: str, value, file: str = "params.json") -> None:
    path = model_dir / file
    doc = json.loads(path.read_text())
    (doc["model"] if file == "params.json" else doc)[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("key, value, file", [
    ("n_heads", 0, "params.json"), ("dim", "64", "params.json"), ("n_layers", 2.5, "params.json"),
    ("model_parallel_size", 0, "consolidate_params.json"), ("n_layers", True, "params.json"),
    ("vocab_size", -5, "params.json"), ("norm_eps", "small", "params.json"), ("multiple_of", 0, "params.json"),
    ("qk_normalization", "yes", "params.json"), ("ffn_dim_multiplier", [1], "params.json"),
    ("n_kv_heads", 0, "params.json"), ("rope_theta", -1.0, "params.json"), ("max_seq_len", 0.5, "params.json"),
])
def test_params_of_the_wrong_type_or_zero_are_one_line_naming_the_file_and_key(tmp_path, tiny_tokenizer, tiny_vqgan,
                                                                                capsys, key, value, file):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    _set_param(root / "models" / "7b", key, value, file)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("medmax-convert: error: ") and "Traceback" not in err
    assert file in err and key in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_huge_layer_count_is_refused_against_the_checkpoint_before_any_layer_is_built(tmp_path, tiny_tokenizer,
                                                                                         tiny_vqgan, capsys):
    """n_layers 1e6 once cost 3.3 GB and 31 s (a million layers of expected names) before the refusal."""
    import time

    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    _set_param(root / "models" / "7b", "n_layers", 1000000)
    start = time.perf_counter()
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 3
    err = capsys.readouterr().err
    assert "n_layers 1000000" in err and "2 layers" in err and "params.json" in err, err


@pytest.mark.parametrize("what", ["params.json", "text_tokenizer_modified.json"])
@pytest.mark.parametrize("fault", ["invalid UTF-8", "broken JSON"])
def test_an_unreadable_params_or_tokenizer_file_is_one_line_naming_it(tmp_path, tiny_tokenizer, tiny_vqgan, capsys,
                                                                       what, fault):
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    path = root / ("models/7b" if what == "params.json" else "tokenizer") / what
    text = path.read_bytes()
    path.write_bytes(text.replace(b"{", b"{\"k\": \"\xff\xfe\", ", 1) if fault == "invalid UTF-8" else text[: len(text) // 2])
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err, err


def test_integer_weights_are_not_a_model(tmp_path, tiny_tokenizer, tiny_vqgan, tiny_model_dir, capsys):
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    shard = root / "models" / "7b" / "consolidated.pth"
    _rewrite_shard(shard, **{"layers.1.feed_forward.w2.weight": state[0]["layers.1.feed_forward.w2.weight"].long()})
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "layers.1.feed_forward.w2.weight" in err and "int64" in err and not (tmp_path / "out").exists()
    # a model folder holding integer weights is not "a valid model folder"
    from safetensors.torch import load_file, save_file

    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    weights[name] = weights[name].long()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert convert_main(["--input", str(folder)]) == 2
    err = capsys.readouterr().err
    assert name in err and "int64" in err


def _corrupt_tensor_bytes(path: Path) -> None:
    """Flip one byte of a stored tensor's data inside the zip, leaving the archive's CRC as it was."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("file", ["models/7b/consolidated.01.pth", "tokenizer/vqgan.ckpt"])
def test_a_checkpoint_whose_zip_crc_is_wrong_is_refused(tmp_path, tiny_tokenizer, tiny_vqgan, capsys, file):
    """torch.load never checks the CRCs a zip-format file records; a flipped byte would be converted."""
    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan, shards=2)
    shard = root / file
    _corrupt_tensor_bytes(shard)
    assert convert_main(["--input", str(root), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard) in err and "CRC" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("target", ["an empty folder", "nothing yet"])
def test_an_output_that_is_a_symlink_receives_the_model_where_it_points(tmp_path, tiny_tokenizer, tiny_vqgan, target):
    """The swap once renamed the work folder onto the link's name: the model was stranded in .partial."""
    root, state = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    (tmp_path / "disk").mkdir()
    real = tmp_path / "disk" / "model"
    if target == "an empty folder":
        real.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    assert convert_main(["--input", str(root), "--output", str(link)]) == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    check_model_folder(link)
    torch.testing.assert_close(_logits(link), meta_forward(state, release_params(), TEXT_IDS), atol=2e-5, rtol=1e-5)
    assert not [p for p in (*tmp_path.iterdir(), *real.parent.iterdir()) if p.name.endswith(".partial")]


@pytest.mark.parametrize("fault", ["full disk", "read-only file system"])
def test_a_full_disk_or_read_only_output_is_one_line_naming_the_path(tmp_path, tiny_tokenizer, tiny_vqgan, capsys,
                                                                    monkeypatch, fault):
    import errno

    import medmax.checkpoints

    root, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    out = tmp_path / "out"
    if fault == "full disk":
        def write(path, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")  # f.write names no file
        monkeypatch.setattr(medmax.checkpoints, "write_safetensors_stream", write)
    else:
        mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self.name.startswith("out"):
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", read_only)
    assert convert_main(["--input", str(root), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(out) in err, err
    assert ("No space left on device" if fault == "full disk" else "Read-only file system") in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 1000000), ("num_attention_heads", 0),
                                        ("hidden_size", "32"), ("intermediate_size", 2.5), ("vocab_size", True)])
def test_a_model_folder_config_of_the_wrong_type_or_size_is_one_line_before_any_layer_is_built(
        tmp_path, tiny_model_dir, capsys, key, value):
    import shutil
    import time

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert convert_main(["--input", str(folder)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json" in err and key in err, err


@pytest.mark.parametrize("fault", ["num_hidden_layers 1000000", "num_attention_heads 0", "int64 weights"])
def test_a_hugging_face_folder_is_checked_against_its_weights_before_a_model_is_built(
        tmp_path, tiny_tokenizer, tiny_vqgan, capsys, fault):
    import time

    from safetensors.torch import load_file, save_file

    original, _ = write_release(tmp_path / "ckpt", tiny_tokenizer, tiny_vqgan)
    hf = _hf_folder(tmp_path / "hf", tiny_tokenizer, tiny_vqgan)
    if fault == "int64 weights":
        weights = load_file(hf / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"].long()
        save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    else:
        key, value = fault.split()
        config = json.loads((hf / "config.json").read_text())
        config[key] = int(value)
        (hf / "config.json").write_text(json.dumps(config))
    capsys.readouterr()  # the fixture's own output
    start = time.perf_counter()
    assert convert_main(["--input", str(hf), "--original", str(original), "--output", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(hf) in err and ("int64" if "int64" in fault else fault.split()[0]) in err, err
    assert not (tmp_path / "out").exists()
