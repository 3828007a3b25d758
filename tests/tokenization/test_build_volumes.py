"""Volumes in sequences: MultiMeditron's image_3d modality and a volume column become a text header and one image
block per slice (medmax.data.rows.VOLUME_LAYOUT), from a volume folder written by image_tokenize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmax.data.rows import VOLUME_LAYOUT, RowError, SequenceBuilder, VolumeRef, volume_header
from medmax.data.shards import read_manifest
from medmax.image_tokens import VolumeCodes, read_volume_tokens
from medmax.synthetic_volumes import lesion_volume, write_dicom_series
from medmax.vocab import encode_texts
from tokenization.build_sequences import main as build_main
from tokenization.image_tokenize import main as tokenize_main

EOT = "<reserved08706>"


def volume(n=3, grid=(2, 2), positions=(0.0, 5.0, 10.0), modality="CT", seed=0) -> VolumeCodes:
    codes = np.random.default_rng(seed).integers(0, 512, (n, grid[0] * grid[1]))
    return VolumeCodes(codes, list(range(0, 2 * n, 2)), None if positions is None else list(positions), grid, [5.0, 1.0, 1.0],
                       "abdomen", {"modality": modality})


def test_header_says_modality_count_spacing_and_order():
    assert volume_header(volume()) == "CT, 3 axial slices, 5.0 mm apart, inferior to superior:"
    assert volume_header(volume(positions=None, modality=None)) == "3 slices, in order:"
    assert volume_header(volume(positions=(0.0, 2.0, 10.0), modality="MR")) == "MRI, 3 axial slices at 0.0, 2.0, 10.0 mm, inferior to superior:"


def test_image_3d_modality_is_a_header_then_one_block_per_slice_in_order(tiny_tokenizer, tiny_vocab):
    vol = volume()
    builder = SequenceBuilder(tiny_tokenizer, resolve_image=lambda ref: vol if isinstance(ref, VolumeRef) else None)
    row = {"conversations": [{"role": "user", "content": "<image>Where is the lesion?"}, {"role": "assistant", "content": "upper"}],
           "modalities": [{"type": "image_3d", "value": "ct/case1.npy"}]}
    ids = builder.build(row).input_ids.tolist()
    v = tiny_vocab
    header = encode_texts(tiny_tokenizer, [volume_header(vol)])[0]
    blocks = [[v.boi_id, *v.code_to_id[c].tolist(), v.eoi_id] for c in vol.codes]
    expected_start = [v.bos_id, *header, *blocks[0], *blocks[1], *blocks[2]]
    assert ids[: len(expected_start)] == expected_start
    assert ids.count(v.boi_id) == 3


def test_a_shaped_build_writes_each_slice_as_a_shaped_block(tiny_tokenizer, tiny_vocab):
    """--image-layout shaped: a volume's slices are shaped blocks (size tokens, end-of-lines) as every image is."""
    from medmax.data.rows import SequenceConfig
    from medmax.image_layout import ShapedTokens

    vol = volume(grid=(2, 3))
    builder = SequenceBuilder(tiny_tokenizer, SequenceConfig(image_layout="shaped"),
                              resolve_image=lambda ref: vol if isinstance(ref, VolumeRef) else None)
    row = {"conversations": [{"role": "user", "content": "<image>Where is the lesion?"}, {"role": "assistant", "content": "upper"}],
           "modalities": [{"type": "image_3d", "value": "ct/case1.npy"}]}
    ids = builder.build(row).input_ids.tolist()
    v, shaped = tiny_vocab, ShapedTokens.from_tokenizer(tiny_tokenizer)
    starts = [i for i, t in enumerate(ids) if t == v.boi_id]
    assert len(starts) == 3
    for start, codes in zip(starts, vol.codes):
        h, w, grid = shaped.read_block(v, ids[start : ids.index(v.eoi_id, start) + 1])
        assert (h, w) == (2, 3) and v.ids_to_codes(grid).reshape(-1).tolist() == codes.tolist()


def test_one_volume_and_two_images_are_told_apart(tiny_tokenizer, tiny_vocab):
    vol = volume(n=2)
    slices = {"s0": vol.codes[0], "s1": vol.codes[1]}
    builder = SequenceBuilder(tiny_tokenizer, resolve_image=lambda ref: vol if isinstance(ref, VolumeRef) else slices[ref])
    text = {"text": "<image>A scan."}
    as_volume = builder.build({**text, "volume": "v.nii.gz"}).input_ids
    as_images = builder.build({"text": "<image><image>A scan.", "images": ["s0", "s1"]}).input_ids
    codes = lambda ids: ids[np.isin(ids, tiny_vocab.code_to_id)]  # noqa: E731
    assert np.array_equal(codes(as_volume), codes(as_images))  # the same slice codes ...
    assert len(as_volume) > len(as_images)  # ... but the volume has its header in front


@pytest.mark.parametrize("row, kind, message", [
    ({"text": "<image>x", "volume": "v.nii.gz", "images": ["a.png"]}, "bad_field", "give both in order in 'modalities'"),
    ({"text": "<image>x", "modalities": [{"type": "image_3d", "value": b"bytes"}]}, "bad_field", "a volume is given by its path"),
    ({"text": "<image>x", "modalities": [{"type": "video", "value": "a"}]}, "bad_field", "'image' or 'image_3d'"),
])
def test_bad_volume_rows(tiny_tokenizer, row, kind, message):
    builder = SequenceBuilder(tiny_tokenizer, resolve_image=lambda ref: volume())
    with pytest.raises(RowError, match=message) as err:
        builder.build(row)
    assert err.value.kind == kind


def test_from_dicom_series_to_sequences(tmp_path, tiny_tokenizer, tiny_tokenizer_path, tiny_vqgan_dir, tiny_vocab):
    """A DICOM series and a NIfTI-free .npy, tokenized by image_tokenize --volume-column, then built from
    MultiMeditron-style conversation rows and a pretraining row with a volume column."""
    root = tmp_path / "data"
    write_dicom_series(root / "ct", lesion_volume(np.random.default_rng(0), shape=(12, 24, 24)).hu, spacing=(4.0, 1.0, 1.0))
    np.save(root / "m3d.npy", np.random.default_rng(1).random((1, 8, 24, 24), dtype=np.float32))
    (root / "volumes.csv").write_text("volume\nct\nm3d.npy\n")
    tokens = tmp_path / "tokens"
    argv = ["--input", str(root / "volumes.csv"), "--output", str(tokens), "--ckpt", str(tiny_vqgan_dir), "--volume-column", "volume",
            "--slices", "4", "--slice-resolution", "32", "--window", "abdomen", "--workers", "0", "--no-progress"]
    assert tokenize_main(argv) == 0
    rows = [
        {"conversations": [{"role": "user", "content": "<image>Is there a lesion?"}, {"role": "assistant", "content": "yes"}],
         "modalities": [{"type": "image_3d", "value": "ct"}]},
        {"text": "<image>A volume.", "volume": "m3d.npy"},
        {"text": "<image>A volume.", "volume": "missing.nii.gz"},
    ]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "seq"
    assert build_main.__wrapped__(["--input", str(src), "--tokenizer", str(tiny_tokenizer_path), "--output", str(out),
                                   "--image-tokens", str(tokens), "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest["volume_layout"] == VOLUME_LAYOUT
    assert manifest["counts"]["rows_written"] == 2 and manifest["counts"]["rejected"] == {"missing_image": 1}
    import pyarrow.parquet as pq

    built = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    ct = read_volume_tokens(tokens)["ct"]
    assert volume_header(ct) == "CT, 4 axial slices, 12.0 mm apart, inferior to superior:"
    first = np.asarray(built[0]["input_ids"])
    assert (first == tiny_vocab.boi_id).sum() == 4
    in_order = first[np.isin(first, tiny_vocab.code_to_id)]
    assert np.array_equal(in_order, tiny_vocab.code_to_id[ct.codes.reshape(-1)])
    assert volume_header(read_volume_tokens(tokens)["m3d.npy"]) == "4 slices, in order:"
    assert Path(out / "errors.jsonl").read_text().count("is not in --image-tokens") == 1


def test_nifti_dicom_and_npy_volumes_go_from_file_to_training_to_an_answer(tmp_path, tiny_tokenizer_path, tiny_vqgan_dir):
    """Issue 27's path for each format: image_tokenize --volume-column, build_sequences (image_3d rows), finetune.train,
    finetune.export, then `medmax generate --volume` answers a question about each volume."""
    from finetune.export import main as export_main
    from finetune.train import main as train_main
    from medmax.__main__ import main as medmax_main
    from medmax.synthetic_volumes import write_nifti

    root, rng = tmp_path / "data", np.random.default_rng(0)
    root.mkdir()
    write_nifti(root / "mr.nii.gz", lesion_volume(rng, shape=(9, 24, 24)).hu, axcodes="RAS")
    write_dicom_series(root / "ct", lesion_volume(rng, shape=(9, 24, 24)).hu, spacing=(4.0, 1.0, 1.0))
    np.save(root / "m3d.npy", rng.random((1, 8, 24, 24), dtype=np.float32))
    names = ["mr.nii.gz", "ct", "m3d.npy"]
    (root / "volumes.csv").write_text("volume\n" + "".join(f"{n}\n" for n in names))
    assert tokenize_main(["--input", str(root / "volumes.csv"), "--output", str(tmp_path / "tokens"), "--ckpt", str(tiny_vqgan_dir),
                          "--volume-column", "volume", "--slices", "3", "--slice-resolution", "32", "--workers", "0",
                          "--no-progress"]) == 0
    rows = [{"conversations": [{"role": "user", "content": "<image>Is there a lesion?"}, {"role": "assistant", "content": "yes"}],
             "modalities": [{"type": "image_3d", "value": n}]} for n in names] * 4
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert build_main.__wrapped__(["--input", str(tmp_path / "rows.jsonl"), "--tokenizer", str(tiny_tokenizer_path), "--output",
                                   str(tmp_path / "seq"), "--image-tokens", str(tmp_path / "tokens"), "--strict", "--no-progress"]) == 0
    config = Path(__file__).parents[2] / "finetune" / "configs" / "tiny_cpu.yaml"
    train_main.__wrapped__(["--config", str(config), f"datasets=[{tmp_path / 'seq'}]", f"output_dir={tmp_path / 'train'}",
                            f"tokenizer={tiny_tokenizer_path}", f"vqgan={tiny_vqgan_dir}", "validation=null", "eval_strategy=no",
                            "max_steps=2", "save_steps=2", "report_to=none", "disable_tqdm=true"])
    assert export_main.__wrapped__(["--checkpoint", str(tmp_path / "train"), "--output", str(tmp_path / "model")]) in (0, None)
    for name in names:
        out = tmp_path / "answers" / name.replace(".", "_")
        assert medmax_main(["generate", "--model", str(tmp_path / "model"), "--volume", str(root / name), "--slices", "3",
                            "--prompt", "Is there a lesion?", "--mode", "text", "--greedy", "--max-new-tokens", "2",
                            "--output", str(out), "--device", "cpu"]) == 0
        record = json.loads((out / "generation.json").read_text())
        assert record["volumes"] == [str(root / name)] and record["token_ids"]
