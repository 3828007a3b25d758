"""The `medmax generate` command: files it writes, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmax.__main__ import main
from medmax.generation.editing import model_grid, region_from_box
from medmax.generation.prompts import PromptEncoder
from medmax.model import load_model_dir
from medmax.vqgan import load_vqgan


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_image_mode_writes_png_and_record(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "Generate an image of a lung",
               "--mode", "image", "--output", str(out), "--seed", "1", "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "generation.json").read_text())
    vqgan = load_vqgan(tiny_model_dir / "vqgan")
    (seg,) = record["segments"]
    assert seg["type"] == "image" and len(seg["codes"]) == vqgan.n_codes_per_image
    assert Image.open(out / seg["path"]).size == (vqgan.resolution, vqgan.resolution)
    assert record["config"]["mode"] == "image" and record["finish_reason"] == "image"
    assert "generation.json" in capsys.readouterr().out


def test_text_mode_with_image_placeholder(tiny_model_dir, scan, tmp_path):
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "<image>\nWhich organ is shown?",
               "--image", str(scan), "--mode", "text", "--output", str(out), "--greedy", "--max-new-tokens", "5"])
    assert rc == 0
    record = json.loads((out / "generation.json").read_text())
    assert [s["type"] for s in record["segments"]] == ["text"] and len(record["token_ids"]) == 5
    assert record["images"] == [str(scan)] and not list(out.glob("*.png"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{bad}"], "bad.png"),
        (["--image", "{missing}"], "missing.png"),
        (["--prompt", "<image> and <image>", "--image", "{scan}"], "2 <image> placeholders but 1 images"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
    ],
)
def test_bad_input_fails_clearly_before_loading(tiny_model_dir, scan, tmp_path, capsys, monkeypatch, extra, message):
    import medmax.generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(medmax.generation.Generator, "from_dir", refuse)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    paths = {"bad": tmp_path / "bad.png", "missing": tmp_path / "missing.png", "scan": scan}
    extra = [a.format(**paths) for a in extra]
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--mode", "text",
            "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_mode_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "video", "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and "video" in capsys.readouterr().err


def test_programs_lists_every_entry_point(capsys):
    assert main(["programs"]) == 0
    listing = capsys.readouterr().out
    for program in ("tokenization.image_tokenize", "tokenization.build_sequences", "finetune/launch.sh",
                    "finetune.train", "finetune.export", "eval.run", "medmax generate",
                    "tokenization.build_preferences", "finetune.make_preferences"):
        assert program in listing


def test_generate_and_eval_run_build_the_same_ids(tiny_model_dir, scan, tmp_path, monkeypatch):
    """One prompt layout: the README's `medmax generate --image` question and eval.run's row give one sequence."""
    import shutil

    import eval.run
    from medmax.generation.prompts import PromptEncoder

    built = []
    original = PromptEncoder.encode

    def record(self, checked):
        built.append(original(self, checked))
        return built[-1]

    monkeypatch.setattr(PromptEncoder, "encode", record)
    question = "Is there a lesion in the image?"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", question, "--image", str(scan), "--mode", "text",
                 "--greedy", "--max-new-tokens", "1", "--output", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(scan, data / "scan.png")
    (data / "eval.jsonl").write_text(json.dumps({"task_name": "vqa_rad", "question_type": "closed", "prompt": question,
                                                 "answer": "yes", "image_path": "scan.png"}) + "\n")
    assert eval.run.main(["--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "eval"),
                          "--tasks", "vqa_rad_closed", "--max-new-tokens", "1", "--device", "cpu"]) == 0
    (from_generate,), (from_eval,) = built
    assert from_generate == from_eval
    assert from_eval.index(8197) == 1  # <s>, then the image (<racm3:break> ...), then the question, as in training


def _generate(model, out, *extra):
    assert main(["generate", "--model", str(model), "--prompt", "Is there a lesion?", "--output", str(out),
                 "--device", "cpu", "--seed", "3", *extra]) == 0
    return json.loads((out / "generation.json").read_text())


def test_top_p_zero_is_greedy(tiny_model_dir, tmp_path):
    """--top-p 0 and --image-top-p 0 keep only the most likely token (they crashed with NaN after loading)."""
    text = ["--mode", "text", "--max-new-tokens", "6"]
    assert _generate(tiny_model_dir, tmp_path / "p0", *text, "--top-p", "0")["token_ids"] == \
        _generate(tiny_model_dir, tmp_path / "greedy", *text, "--greedy")["token_ids"]
    image = ["--mode", "image"]
    codes = _generate(tiny_model_dir, tmp_path / "ip0", *image, "--image-top-p", "0")["segments"][0]["codes"]
    assert codes == _generate(tiny_model_dir, tmp_path / "it0", *image, "--image-temperature", "0")["segments"][0]["codes"]


def test_top_p_above_one_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "text",
                 "--output", str(tmp_path / "o"), "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_existing_output_is_refused_and_overwrite_clears_only_what_generate_wrote(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = _generate(tiny_model_dir, out, "--mode", "image")
    (out / "notes.txt").write_text("the user's own file")
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "text", "--output", str(out),
            "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "generation.json").read_text()) == first and (out / "image_0.png").is_file()
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads((out / "generation.json").read_text())["config"]["mode"] == "text"
    assert not (out / "image_0.png").exists()  # the earlier run's image is not left behind as an orphan
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_overwrite_never_replaces_a_file_generate_did_not_write(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_0.png").write_bytes(b"someone else's picture")
    (out / "generation.json").write_text(json.dumps({"segments": [{"type": "image", "path": "../escape.png"}]}))
    (tmp_path / "escape.png").write_bytes(b"outside")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "image", "--output", str(out),
                 "--overwrite"]) == 2
    assert "image_0.png" in capsys.readouterr().err
    assert (out / "image_0.png").read_bytes() == b"someone else's picture" and (tmp_path / "escape.png").is_file()
    assert (out / "generation.json").is_file()  # nothing is removed when the run is refused


def test_an_unwritable_output_fails_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import os

    import medmax.generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(medmax.generation.Generator, "from_dir", refuse)
    if os.geteuid() == 0:  # root writes through file modes; /sys refuses even root
        out = Path("/sys/medmax-generate-test")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "text", "--output", str(out)]) == 2
    assert f"--output {out}" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [TypeError, ValueError, KeyError])
def test_a_programming_error_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch, bug):
    """Only a user's mistake (medmax.errors.UserError) is one line; a ValueError from a bug was swallowed as one."""
    import medmax.generation

    def broken(*args, **kwargs):
        raise bug("a bug, not a user's mistake")

    monkeypatch.setattr(medmax.generation.Generator, "generate", broken)
    with pytest.raises(bug, match="a bug"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--mode", "text", "--output", str(tmp_path / "o")])


def test_a_model_too_large_for_memory_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000, "hidden_size": 4096}))
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--mode", "text", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "--skip-memory-check" in err and err.count("\n") == 1


def test_generation_flags_default_to_the_config_fields_they_fill(tmp_path):
    """Each default is written once, in GenerationConfig; the command line fills the same config from it."""
    from medmax.__main__ import _build_parser, _generation_config
    from medmax.generation import GenerationConfig

    args = _build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", "--mode", "text",
                                       "--output", str(tmp_path)])
    built, default = _generation_config(args), GenerationConfig(mode="text", seed=0, batch_size=1)  # one prompt: auto decoding sees batch 1
    assert built == default
    assert built.image_decoding("cuda") == "sjd"  # so one image on a GPU gets speculative Jacobi decoding


def test_a_prompt_longer_than_the_context_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    """A user's mistake found after the model loads is still one line (it was a ValueError caught with every other)."""
    context = json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "lesion " * context, "--mode", "text",
                 "--output", str(tmp_path / "o"), "--device", "cpu"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("medmax generate: error: prompt 0: ") and "longer than the model's context" in last


def test_decoding_flag_reaches_the_config_and_greedy_codes_agree(tiny_model_dir, tmp_path):
    image = ["--mode", "image", "--image-temperature", "0"]
    plain = _generate(tiny_model_dir, tmp_path / "plain", *image, "--decoding", "plain")
    sjd = _generate(tiny_model_dir, tmp_path / "sjd", *image, "--decoding", "sjd", "--sjd-window", "4")
    assert (plain["config"]["decoding"], sjd["config"]["decoding"], sjd["config"]["sjd_window"]) == ("plain", "sjd", 4)
    assert plain["segments"][0]["codes"] == sjd["segments"][0]["codes"]


def test_a_volume_prompt_is_the_training_layout(tiny_model_dir, tmp_path, monkeypatch):
    """`medmax generate --volume` gives the ids a training row with that volume has: header, then each slice's block."""
    from medmax.data.rows import SequenceBuilder, VolumeRef
    from medmax.generation.prompts import PromptEncoder
    from medmax.image_tokens import read_volume_tokens
    from medmax.synthetic_volumes import lesion_volume, write_nifti
    from medmax.vocab import load_tokenizer
    from tokenization.image_tokenize import main as tokenize_main

    nifti = write_nifti(tmp_path / "ct.nii.gz", lesion_volume(np.random.default_rng(0), shape=(9, 20, 24)).hu, axcodes="RAS")
    (tmp_path / "v.csv").write_text("volume\nct.nii.gz\n")
    assert tokenize_main(["--input", str(tmp_path / "v.csv"), "--output", str(tmp_path / "tok"), "--ckpt", str(tiny_model_dir / "vqgan"),
                          "--volume-column", "volume", "--slices", "3", "--window", "abdomen", "--workers", "0", "--no-progress"]) == 0
    built = []
    original = PromptEncoder.encode
    # a copy: generation appends its tokens to the lists encode returns
    def record(self, checked):
        ids = original(self, checked)
        built.append([list(x) for x in ids])
        return ids

    monkeypatch.setattr(PromptEncoder, "encode", record)
    question = "Is there a lesion?"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", question, "--volume", str(nifti), "--slices", "3",
                 "--window", "abdomen", "--mode", "text", "--greedy", "--max-new-tokens", "1", "--no-end-of-turn",
                 "--output", str(tmp_path / "gen"), "--device", "cpu"]) == 0
    volume = read_volume_tokens(tmp_path / "tok")["ct.nii.gz"]
    builder = SequenceBuilder(load_tokenizer(tiny_model_dir / "tokenizer.json"), resolve_image=lambda ref: volume)
    training = builder.build({"text": "<image>" + question, "volume": "ct.nii.gz"}).input_ids.tolist()
    assert built[0][0] == training[:-1]  # the training row ends with </s>
    record = json.loads((tmp_path / "gen" / "generation.json").read_text())
    assert record["volumes"] == [str(nifti)]


# ------------------------------------------------------------------------------------------ editing, inpainting
def test_edit_mask_draws_only_its_region_of_the_input(tiny_model_dir, scan, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_model_dir), "--image", str(scan), "--prompt", "Remove the lesion.",
                 "--mode", "image", "--edit-mask", "20,0,60,35", "--output", str(out), "--device", "cpu",
                 "--image-temperature", "1", "--seed", "2"]) == 0
    record = json.loads((out / "generation.json").read_text())
    bundle = load_model_dir(tiny_model_dir)
    (source,) = PromptEncoder(bundle.tokenizer, bundle.vocab, bundle.vqgan, 4096).encode_images([Image.open(scan).convert("RGB")])
    resolution, grid = model_grid(tiny_model_dir)
    outside = ~region_from_box((20, 0, 60, 35), (90, 70), resolution, grid).reshape(-1)
    assert outside.any() and (~outside).any()
    assert (np.array(record["segments"][0]["codes"])[outside] == np.array(source)[outside]).all()
    assert record["edit_mask"] == "20,0,60,35" and record["images"] == [str(scan)]


@pytest.mark.parametrize("extra, message", [
    (["--edit-mask", "0,0,10,10"], "no --image to edit"),
    (["--image", "{scan}", "--edit-mask", "0,0,91,10"], "outside the 90x70 image or empty"),
    (["--image", "{scan}", "--edit-mask", "{empty}"], "empty"),
    (["--image", "{scan}", "--edit-mask", "{grid32}"], "neither the input image's 90x70 nor the model's"),
    (["--image", "{scan}", "--edit-mask", "0,0,10,10", "--mode", "text"], "needs --mode image"),
    (["--image", "{scan}", "--edit-mask", "0,0,10,10", "--size", "32x48"], "fixed image layout only"),
])
def test_bad_edit_masks_fail_in_one_line_before_loading(tiny_model_dir, scan, tmp_path, capsys, monkeypatch, extra, message):
    import medmax.generation

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(medmax.generation.Generator, "from_dir", refuse)
    Image.new("L", (90, 70)).save(tmp_path / "empty.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "grid32.png")
    paths = {"scan": scan, "empty": tmp_path / "empty.png", "grid32": tmp_path / "grid32.png"}
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "Edit", "--output", str(tmp_path / "out"),
            *[a.format(**paths) for a in extra]]
    if "--mode" not in argv:
        argv += ["--mode", "image"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_size_the_vqgan_cannot_tile_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from medmax.generation import generator

    monkeypatch.setattr(generator.Generator, "from_dir", lambda *a, **k: pytest.fail("loaded the model"))
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a lung", "--mode", "image",
               "--output", str(tmp_path / "out"), "--size", "60x96"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--size 60x96" in err and "multiple of 8" in err


def test_size_draws_a_picture_of_that_shape(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "a lung", "--mode", "image", "--output", str(out),
                 "--size", "32x48", "--device", "cpu"]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert Image.open(out / record["segments"][0]["path"]).size == (48, 32) and len(record["segments"][0]["codes"]) == 24
    assert record["config"]["image_size"] == [32, 48] and record["config"]["image_layout"] == "shaped"
