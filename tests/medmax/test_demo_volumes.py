"""The demo's volumes: NIfTI, .npy and a DICOM series in, their slices shown as the model sees them, bad ones refused."""

from __future__ import annotations

import gzip
import os
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmax import demo_app
from medmax.__main__ import _input_images
from medmax.demo import Conversation, ShownVolume, model_view
from medmax.generation import END_OF_TURN
from medmax.synthetic_volumes import lesion_volume, write_dicom_series, write_nifti

from .test_demo import _controls, engine, generator  # noqa: F401 - the engine on the tiny model (fixtures)

SHAPE = (12, 20, 24)  # (Z, Y, X): small, not square


@pytest.fixture
def hu():
    return lesion_volume(np.random.default_rng(0), shape=SHAPE, third="upper", side="left").hu


def _upload(engine, name: str, k: int = 0) -> Path:
    """Where Gradio stores an upload: its own folder (by content) inside the app's folder, the file's own name."""
    folder = engine.workdir / f"gradio-{name}-{k}"
    folder.mkdir(parents=True)
    return folder / name


def _series(engine, hu, tmp_path, **kw) -> list[str]:
    """A DICOM series written with pydicom, each file uploaded on its own (as Gradio stores several files)."""
    source = write_dicom_series(tmp_path / f"series-{kw.get('series_uid', 'a')}", hu, **kw)
    uploads = []
    for k, path in enumerate(sorted(source.iterdir())):
        target = _upload(engine, path.name, k + 100 * len(kw))
        target.write_bytes(path.read_bytes())
        uploads.append(str(target))
    return uploads


def kept(engine) -> list:
    """Files the demo keeps of uploads (previews, series links, montages)."""
    return sorted(p for p in (engine.workdir / "uploads").rglob("*") if p.is_file())


def test_a_nifti_volume_previews_its_slices_as_the_model_sees_them(engine, hu):
    path = write_nifti(_upload(engine, "ct.nii.gz"), hu, axcodes="PSR")  # not canonical: reoriented before slicing
    gallery, status = demo_app.preview(engine, [str(path)], "4", "abdomen", False)
    assert status == "" and len(gallery) == 4
    args = types.SimpleNamespace(image=[path], volume=[], slices="4", window="abdomen", volume_index=None)
    (cli,) = _input_images(args)  # what medmax generate --volume reads
    for (png, label), k, z, slice_image in zip(gallery, cli.slice_indices, cli.positions_mm, cli.slices):
        assert label == f"ct.nii.gz: slice {k}, z {z:.1f} mm"
        shown = np.asarray(Image.open(png))
        assert shown.shape == (engine.resolution, engine.resolution, 3)
        assert np.array_equal(shown, np.asarray(model_view(slice_image, engine.resolution)))
    assert cli.slice_indices == (1, 4, 7, 10) and list(cli.positions_mm) == sorted(cli.positions_mm)
    lung, _ = demo_app.preview(engine, [str(path)], "4", "lung", False)
    assert not np.array_equal(np.asarray(Image.open(lung[0][0])), np.asarray(Image.open(gallery[0][0])))  # the window


def test_a_volume_question_is_the_prompt_medmax_generate_builds_and_gets_an_answer(engine, generator, hu, tmp_path):
    path = _upload(engine, "ct.npy")
    np.save(path, hu)
    _, _, chat, conv, request, status = demo_app.start(engine, "Is there a lesion?", [str(path)], Conversation(),
                                                      *_controls(slices="3", max_new_tokens=4))
    assert request is not None, status
    (volume,) = [p for p in conv.turns[-1].pieces if isinstance(p, ShownVolume)]
    assert [label for _, label in volume.views] == [f"ct.npy: slice {k}" for k in (2, 6, 10)]  # no geometry: no z
    args = types.SimpleNamespace(image=[], volume=[path], slices="3", window="percentile", volume_index=None)
    cli_prompt = [*_input_images(args), "Is there a lesion?", END_OF_TURN]
    assert generator.encode_prompts([conv.prompt()]) == generator.encode_prompts([cli_prompt])
    assert chat[0]["content"]["path"] == str(volume.path) and chat[0]["content"]["alt_text"] == volume.volume.header
    assert Image.open(volume.path).size == (3 * engine.resolution, engine.resolution)  # the montage in the chat
    demo_app.run(engine)
    assert list(demo_app.show(engine, request, conv))[-1][3].startswith("answer 1 done")


def test_dicom_files_are_one_volume_only_when_the_box_says_so(engine, hu, tmp_path):
    files = _series(engine, hu, tmp_path)  # named in shuffled order, each in its own upload folder
    gallery, status = demo_app.preview(engine, files, "all", "abdomen", True)
    assert status == "" and len(gallery) == SHAPE[0]
    zs = [float(label.split("z ")[1].split(" mm")[0]) for _, label in gallery]
    assert zs == sorted(zs) and all(label.startswith(f"DICOM series of {SHAPE[0]} files: slice {k},")
                                    for k, (_, label) in enumerate(gallery))
    apart, status = demo_app.preview(engine, files[:3], "all", "abdomen", False)
    assert [label for _, label in apart] == [os.path.basename(f) for f in files[:3]]
    assert "3 DICOM files of one series are read as 3 2D images" in status  # the page says how to read them as one
    _, status = demo_app.preview(engine, files[:1], "all", "abdomen", False)
    assert status == ""


@pytest.mark.parametrize("case", ["truncated nii.gz", "4D without index", "gap", "mixed series", "a slice twice",
                                  "not a volume"])
def test_a_bad_volume_gives_one_status_line_and_nothing_is_kept(engine, hu, tmp_path, case):
    if case == "truncated nii.gz":
        full = write_nifti(tmp_path / "ct.nii.gz", hu)
        data = gzip.compress(gzip.decompress(full.read_bytes())[:-2000])  # valid gzip, voxels cut short
        files, reason = [str(_upload(engine, "ct.nii.gz"))], "truncated"
        open(files[0], "wb").write(data)
    elif case == "4D without index":
        files, reason = [str(_upload(engine, "4d.npy"))], "4D array"
        np.save(files[0], np.stack([hu, hu]))
    elif case == "gap":
        files, reason = _series(engine, hu, tmp_path, skip=[5]), "a gap in the series"
    elif case == "mixed series":
        files = _series(engine, hu[:6], tmp_path) + _series(engine, hu[6:], tmp_path, series_uid="1.2.3.4")
        reason = "mixes 2 series"
    elif case == "a slice twice":
        files = _series(engine, hu, tmp_path)
        files, reason = files + files[:1], "duplicated slice position"
    else:
        files, reason = [str(_upload(engine, "notes.nii"))], "not a readable NIfTI"
        open(files[0], "w").write("not a volume")
    _, _, _, conv, request, status = demo_app.start(engine, "Is there a lesion?", files, Conversation(),
                                                    *_controls(one_series=True))
    assert request is None and conv.turns == [] and reason in status and "\n" not in status
    assert "Traceback" not in status and kept(engine) == []
    gallery, status = demo_app.preview(engine, files, "16", "percentile", True)
    assert gallery == [] and reason in status and kept(engine) == []


def test_huge_k_and_all_of_a_long_volume_are_refused_before_a_slice_is_read(engine, generator, monkeypatch):
    path = _upload(engine, "long.npy")
    np.save(path, np.zeros((engine.max_slices + 1, 8, 8), np.int16))
    assert engine.max_slices == generator.context_length // generator.prompts.n_image_tokens
    monkeypatch.setattr("medmax.prompting.load_volume_input", lambda *a, **k: pytest.fail("a slice was read"))
    for slices, reason in (("999999999", "more than the model's context holds"), ("all", "more than the model's context")):
        _, _, _, _, request, status = demo_app.start(engine, "q", [str(path)], Conversation(), *_controls(slices=slices))
        assert request is None and reason in status and kept(engine) == []


def test_a_volume_too_long_for_the_context_with_the_conversation_is_refused_before_any_model_work(engine, hu):
    path = _upload(engine, "ct.npy")
    np.save(path, hu)
    calls = engine.generate_calls
    # 12 slices of 66 tokens (the tiny VQGAN's 8x8 codes) fit alone; six such volumes do not fit a context of 4096
    _, _, _, conv, request, status = demo_app.start(engine, "q", [str(path)] * 6, Conversation(), *_controls(slices="12"))
    assert request is None and "longer than the model's context" in status and engine.generate_calls == calls
    assert kept(engine) == []


def test_a_folder_or_a_series_link_is_never_read_as_an_upload(engine, hu, tmp_path):
    """A hostile client names the app's own folders: another session's series links must not be read as a volume."""
    files = _series(engine, hu, tmp_path)
    _, _, _, conv, request, _ = demo_app.start(engine, "q", files, Conversation(), *_controls(one_series=True))
    series_folder = next((engine.workdir / "uploads").rglob("series_0"))
    for name in (str(series_folder), str(engine.workdir), str(series_folder.parent)):
        _, _, _, _, request, status = demo_app.start(engine, "q", [name], Conversation(), *_controls(one_series=True))
        assert request is None and "no such uploaded file" in status


def test_a_file_name_with_a_line_break_still_gives_one_status_line(engine):
    path = _upload(engine, "scan\nINJECTED.png")
    path.write_bytes(b"not pixels")
    _, status = demo_app.preview(engine, [str(path)], "16", "percentile", False)
    assert "scan?INJECTED.png" in status and "\n" not in status



def test_an_edit_mask_needs_a_2d_image_first_not_a_volume(engine, hu):
    path = _upload(engine, "ct.npy")
    np.save(path, hu)
    _, _, _, conv, request, status = demo_app.start(engine, "Remove the lesion.", [str(path)], Conversation(),
                                                    *_controls(mode="image", edit_mask="0,0,4,4", slices="2"))
    assert request is None and "attach the image to edit" in status and kept(engine) == []


def test_an_edit_after_a_volume_copies_the_new_question_s_image_not_a_slice(engine, generator, hu):
    """The volume's slices are images of the prompt too: the edited image is the one after all of them."""
    from medmax.generation.editing import region_from_box

    from .test_demo import _ask, _drawn_codes, _scan

    volume = _upload(engine, "ct.npy")
    np.save(volume, hu)
    _, conv, _, _ = _ask(engine, {"text": "Describe it", "files": [str(volume)]}, slices="3", max_new_tokens=2)[-1]
    scan = _scan(engine, "scan.png", 5)
    _, conv, _, status = _ask(engine, {"text": "Remove the lesion.", "files": [scan]}, conv, mode="image",
                              edit_mask="40,20,90,70")[-1]
    assert status.startswith("answer 2 done"), status
    (source,) = generator.prompts.encode_images([Image.open(scan).convert("RGB")])
    outside = ~region_from_box((40, 20, 90, 70), (90, 70), engine.resolution, generator.vqgan.grid_shape).reshape(-1)
    assert np.array_equal(_drawn_codes(conv)[outside], np.asarray(source)[outside])
