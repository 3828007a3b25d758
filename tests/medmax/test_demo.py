"""The demo's logic without a browser: uploads, prompt layout, settings, batching, seeds, streaming, errors."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_files

from medmax import demo_app
from medmax.demo import (
    Conversation,
    DemoError,
    Engine,
    PageInputs,
    Settings,
    ShownImage,
    Turn,
    group_requests,
    load_upload,
    model_view,
    user_pieces,
)
from medmax.generation import END_OF_TURN, Generator, ImageCodes
from medmax.generation.editing import region_from_box
from medmax.data.rows import SequenceBuilder

# Only files shipped inside the pydicom wheel (no download), as tests/medmax/test_images.py does.
DICOM_FILES = {os.path.basename(f): f for f in get_testdata_files()}
# mode, temperature, top-p, cfg text, cfg image, image temp, max tokens, seed, decoding; edit mask; slices, window, series
CONTROLS = ("text", 1.0, 0.9, 3.0, 1.2, 0.7, 8, 0, "auto", "", "16", "percentile", False)


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator.from_dir(tiny_model_dir)


@pytest.fixture
def engine(generator, tmp_path):
    return Engine(generator, tmp_path / "app", max_batch_size=4, max_upload_bytes=2**20)


@pytest.fixture
def scan_path(engine):
    """A synthetic scan 'uploaded' into the app's temporary folder, as Gradio stores uploads."""
    path = engine.workdir / "upload-1" / "scan.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return path


def _controls(**changes):
    names = ("mode", "temperature", "top_p", "cfg_text", "cfg_image", "image_temperature", "max_new_tokens", "seed",
             "decoding", "edit_mask", "slices", "window", "one_series")
    values = dict(zip(names, CONTROLS))
    values.update(changes)
    return tuple(values[n] for n in names)


def _ask(engine, message, conversation=None, **changes):
    """start -> run (the batch function) -> show (the stream), as the page chains them; -> the last page update."""
    _, _, _, conversation, request, status = demo_app.start(engine, message.get("text"), message.get("files"),
                                                            conversation or Conversation(), *_controls(**changes))
    assert request is not None, status
    demo_app.run(engine)
    return list(demo_app.show(engine, request, conversation))


# ------------------------------------------------------------------------------------------ uploads
def test_uploads_load_png_and_dicom_with_a_preview_at_the_model_resolution(engine, scan_path):
    dicom = engine.workdir / "upload-2" / "CT_small.dcm"
    dicom.parent.mkdir()
    dicom.write_bytes(open(DICOM_FILES["CT_small.dcm"], "rb").read())
    for path in (scan_path, dicom):
        shown = engine.add_upload(str(path), "u", 0)
        assert shown.image.mode == "RGB"
        view = Image.open(shown.path)
        assert view.size == (engine.resolution, engine.resolution)
        assert np.asarray(view).std() > 5  # the windowed scan, not a blank square
        assert shown.path.is_relative_to(engine.workdir)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../etc/hostname", "link.png"])
def test_nothing_outside_the_app_folder_can_be_named(engine, tmp_path, name):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (engine.workdir).mkdir(parents=True, exist_ok=True)
    (engine.workdir / "link.png").symlink_to(outside)  # a link inside that points out
    path = name if name.startswith("/") else str(engine.workdir / name)
    with pytest.raises(DemoError, match="not a file uploaded to this page"):
        load_upload(path, engine.workdir, 2**20)
    # through the page's handlers: an error in the status line, no request, nothing previewed
    _, _, _, conv, request, status = demo_app.start(engine, "hi", [path], Conversation(), *_controls())
    assert request is None and conv.turns == [] and "not a file uploaded to this page" in status
    gallery, status = demo_app.preview(engine, [{"path": path}])
    assert gallery == [] and "not a file uploaded to this page" in status


def test_a_model_without_vqgan_refuses_images_with_a_message(generator, scan_path, monkeypatch):
    engine = Engine(generator, scan_path.parents[1])
    monkeypatch.setattr(generator, "vqgan", None)
    _, _, _, _, request, status = demo_app.start(engine, "What is it?", [str(scan_path)], Conversation(), *_controls())
    assert request is None and "has no vqgan/" in status


def test_bad_uploads_give_a_clear_message(engine):
    folder = engine.workdir / "bad"
    folder.mkdir(parents=True)
    (folder / "notes.png").write_bytes(b"these are notes, not pixels")
    (folder / "broken.dcm").write_bytes(open(DICOM_FILES["CT_small.dcm"], "rb").read()[:400])
    (folder / "huge.png").write_bytes(b"\0" * (2**20 + 1))
    cases = {"notes.png": "cannot be read as an image", "broken.dcm": "cannot be read as an image or DICOM",
             "huge.png": "over the upload limit of 1 MB"}
    for name, reason in cases.items():
        with pytest.raises(DemoError, match=reason) as err:
            load_upload(folder / name, engine.workdir, 2**20)
        assert str(err.value).startswith(name) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ prompt layout
def test_conversation_is_one_context_in_the_training_layout(engine, generator, scan_path):
    """User turns are image then text then end-of-turn; the ids equal a conversation row built for training."""
    upload = engine.add_upload(scan_path, "u", 0)
    drawn = ImageCodes(list(range(generator.vqgan.n_codes_per_image)))
    conv = Conversation([
        Turn("user", user_pieces([upload], "Is there a lesion?")),
        Turn("assistant", ["Yes. Here it is:", ShownImage(path=upload.path, codes=drawn)]),
        Turn("user", user_pieces([], "Where?")),
    ])
    assert conv.prompt() == [upload.image, "Is there a lesion?", END_OF_TURN, "Yes. Here it is:", drawn, END_OF_TURN,
                             "Where?", END_OF_TURN]
    (ids,) = generator.encode_prompts([conv.prompt()])
    upload_codes = generator.prompts.encode_images([upload.image])[0]
    row = {"conversations": [{"role": "user", "content": "<image>Is there a lesion?"},
                             {"role": "assistant", "content": "Yes. Here it is:<image>"},
                             {"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Upper left."}],
           "images": [upload_codes, list(drawn.codes)]}
    built = SequenceBuilder(generator.tokenizer).build(row)
    assert list(built.input_ids[: len(ids)]) == ids


def test_placeholders_put_images_where_the_question_says(engine, scan_path):
    a, b = (engine.add_upload(scan_path, "u", k) for k in range(2))
    assert user_pieces([a, b], "Compare <image> with <image>.") == ["Compare ", a, " with ", b, "."]
    _, _, _, _, request, status = demo_app.start(engine, "Compare <image> with <image>.", [str(scan_path)],
                                                 Conversation(), *_controls())
    assert request is None and "2 <image> placeholders but 1 images" in status


# ------------------------------------------------------------------------------------------ settings and batching
def test_settings_are_validated_with_the_setting_named():
    for controls, name in [(_controls(top_p=0), "top-p"), (_controls(mode="video"), "mode"),
                           (_controls(max_new_tokens=0), "max tokens"), (_controls(seed=-1), "seed"),
                           (_controls(temperature=None), "holds no number"), (_controls(decoding="fast"), "image decoding"),
                           (_controls(slices="0"), "volume slices"), (_controls(slices="1e9"), "volume slices"),
                           (_controls(slices="9" * 5000), "volume slices"),  # past Python's int() digit limit
                           (_controls(seed=10**30), "seed"),  # torch seeds are 64-bit: refused before the model runs
                           (_controls(window="sunset"), "window")]:
        with pytest.raises(DemoError, match=name):
            PageInputs.from_page(*controls)


def test_same_settings_group_together_whatever_their_seed(engine):
    a, b = Settings(seed=1), Settings(seed=2)
    hot, image = Settings(temperature=1.5), Settings(mode="image")
    requests = [engine.submit(["q"], s) for s in (a, hot, b, image, a)]
    assert group_requests(requests) == [[0, 2, 4], [1], [3]]


class _CountingGenerator:
    """The real generator, recording each generate call's prompt count and settings."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, config, **kw):
        self.calls.append((len(prompts), config.temperature, config.mode))
        return self.inner.generate(prompts, config, **kw)


def test_a_batch_makes_one_generate_call_per_settings_group(generator, tmp_path):
    counting = _CountingGenerator(generator)
    engine = Engine(counting, tmp_path, max_batch_size=8)
    settings = [Settings(max_new_tokens=4, seed=s) for s in (1, 2, 3)] + [Settings(max_new_tokens=4, temperature=0.5)]
    requests = [engine.submit([f"question {i}", END_OF_TURN], s) for i, s in enumerate(settings)]
    assert engine.run_batch(requests) == ["done"] * 4
    assert counting.calls == [(3, 1.0, "text"), (1, 0.5, "text")]
    for r in requests:
        assert [e.kind for e in engine.events(r.id, timeout=1)][-1] == "done"


def test_max_batch_size_splits_a_group(generator, tmp_path):
    counting = _CountingGenerator(generator)
    engine = Engine(counting, tmp_path, max_batch_size=2)
    requests = [engine.submit(["q", END_OF_TURN], Settings(max_new_tokens=2, seed=s)) for s in range(3)]
    engine.run_batch(requests)
    assert [c[0] for c in counting.calls] == [2, 1]


@pytest.mark.parametrize("mode", ["text", "image"])
def test_an_answer_depends_on_its_seed_not_on_its_batch(engine, mode):
    """Re-running with the same seed gives the same answer, alone or batched with another tab's request."""
    prompt = ["Is there a lesion?", END_OF_TURN]
    mine = Settings(mode=mode, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=7)

    def answer(*requests):
        engine.run_batch(list(requests))
        (done,) = [e for e in engine.events(requests[0].id, timeout=1) if e.kind == "done"]
        return [p if isinstance(p, str) else p.codes.codes for p in done.pieces]

    alone = answer(engine.submit(prompt, mine))
    again = answer(engine.submit(prompt, mine))
    batched = answer(engine.submit(prompt, mine), engine.submit(["Describe the scan", END_OF_TURN],
                                                                  Settings(mode=mode, max_new_tokens=12, temperature=1.5,
                                                                           top_p=1.0, seed=99)))
    other_seed = answer(engine.submit(prompt, Settings(mode=mode, max_new_tokens=12, temperature=1.5, top_p=1.0, seed=8)))
    assert alone and alone == again == batched
    assert other_seed != alone


def test_rerun_with_the_same_seed_reproduces_the_answer(engine, scan_path):
    first = _ask(engine, {"text": "Is there a lesion?", "files": [str(scan_path)]}, max_new_tokens=10)
    chat, conv, _, status = first[-1]
    assert status.startswith("answer 1 done")
    chat2, conv2, request, _ = demo_app.rerun(engine, conv, *_controls(max_new_tokens=10))
    assert len(conv2.turns) == 1  # the last answer is dropped before asking again
    demo_app.run(engine)
    chat3, conv3, _, status = list(demo_app.show(engine, request, conv2))[-1]
    assert chat3 == chat and conv3.prompt() == conv.prompt() and status.startswith("answer 2 done")


# ------------------------------------------------------------------------------------------ streaming and files
def test_text_streams_token_by_token(engine):
    request = engine.submit(["Describe the scan", END_OF_TURN], Settings(max_new_tokens=12, temperature=1.5, top_p=1.0, seed=3))
    engine.run_batch([request])
    events = list(engine.events(request.id, timeout=1, merge=False))
    partial = [e.pieces[0] for e in events if e.kind == "partial"]
    (done,) = [e for e in events if e.kind == "done"]
    assert len(partial) >= 4 and partial == sorted(partial, key=len)  # one update per token, growing
    assert all(done.pieces[0].startswith(p) or p.startswith(done.pieces[0]) for p in partial)


class _SlowGenerator(_CountingGenerator):
    """Each streamed step takes 20 ms, so a reader sees the answer grow."""

    def generate(self, prompts, config, on_step=None, **kw):
        def slow(i, item):
            time.sleep(0.02)
            on_step(i, item)

        return self.inner.generate(prompts, config, on_step=slow, **kw)


def test_the_page_shows_the_answer_while_it_grows(generator, tmp_path):
    engine = Engine(_SlowGenerator(generator), tmp_path)
    _, _, _, conv, request, _ = demo_app.start(engine, "Describe the scan", None, Conversation(),
                                               *_controls(max_new_tokens=12, temperature=1.5, top_p=1.0, seed=3))
    worker = threading.Thread(target=demo_app.run, args=(engine,))
    worker.start()
    updates = list(demo_app.show(engine, request, conv))
    worker.join()
    growing = [chat[-1]["content"] for chat, _, _, status in updates if status == "answering…"]
    assert len(growing) >= 3 and all(isinstance(t, str) for t in growing)
    assert updates[-1][3].startswith("answer 1 done") and updates[-1][0][-1]["content"].startswith(growing[0])


def test_image_mode_puts_the_png_in_the_chat_and_offers_png_and_codes(engine, generator):
    chat, conv, downloads, status = _ask(engine, {"text": "Generate an image of a scan", "files": []}, mode="image")[-1]
    image_message = chat[-1]["content"]
    png, codes_file = downloads
    assert image_message["path"] == png and png.endswith(".png") and codes_file.endswith(".codes.json")
    assert Image.open(png).size == (generator.vqgan.resolution,) * 2
    record = json.loads(open(codes_file).read())
    assert record["grid"] == list(generator.vqgan.grid_shape)
    assert len(record["codes"]) == generator.vqgan.n_codes_per_image
    assert conv.turns[-1].pieces[0].codes.codes == tuple(record["codes"])  # the context keeps the exact codes


def test_interleaved_mode_keeps_text_and_images_in_emitted_order(engine, generator, monkeypatch):
    """The model is pushed to open an image after a few text tokens (its begin-of-image logit is raised)."""
    boi = generator.vocab.boi_id
    original = generator.text_decoder.pick_tokens
    calls = {"n": 0}

    def pick(hidden, cols, head_rows, seen, boi_ok, config, rng):
        calls["n"] += 1
        tokens = original(hidden, cols, head_rows, seen, boi_ok, config, rng)
        return tokens.masked_fill(boi_ok & (calls["n"] == 3), boi)  # third step: begin-of-image

    monkeypatch.setattr(generator.text_decoder, "pick_tokens", pick)
    chat, conv, downloads, status = _ask(engine, {"text": "Describe and draw", "files": []}, mode="interleaved",
                                         max_new_tokens=6, temperature=1.5, top_p=1.0)[-1]
    kinds = ["text" if isinstance(p, str) else "image" for p in conv.turns[-1].pieces]
    assert kinds[:2] == ["text", "image"]
    assert [m["content"] if isinstance(m["content"], str) else "image" for m in chat[1:3]][1] == "image"


def test_a_generation_error_reaches_the_page_and_spares_the_other_requests(engine):
    too_long = " ".join(["lesion"] * 5000)
    bad = engine.submit([too_long, END_OF_TURN], Settings(max_new_tokens=4))
    good = engine.submit(["Is there a lesion?", END_OF_TURN], Settings(max_new_tokens=4, seed=3))
    demo_app.run(engine)
    chat, _, _, status = list(demo_app.show(engine, bad, Conversation()))[-1]
    assert "generation failed" in status and "context" in status and "generation failed" in chat[-1]["content"]
    assert list(demo_app.show(engine, good, Conversation()))[-1][3].startswith("answer 1 done")


def test_empty_question_is_refused(engine):
    _, _, _, _, request, status = demo_app.start(engine, "  ", [], Conversation(), *_controls())
    assert request is None and "type a question or attach an image" in status


def test_model_view_is_the_centre_crop_at_the_vqgan_resolution():
    wide = Image.new("RGB", (200, 100), "black")
    wide.paste(Image.new("RGB", (100, 100), "white"), (50, 0))  # the centre square is white
    view = np.asarray(model_view(wide, 32))
    assert view.shape == (32, 32, 3) and view.min() > 200


def test_the_page_generates_through_one_worker_that_reads_no_session_state(engine):
    """Gradio's batching reads a gr.State input from one session for every slot of a batch: no generation
    event may take an input (the engine's own list of waiting requests is the batch)."""
    gr = pytest.importorskip("gradio")
    app = demo_app.build_app(engine)
    assert isinstance(app, gr.Blocks)
    generation = [fn for fn in app.fns.values() if fn.api_name in ("ask_generate", "rerun_generate")]
    assert len(generation) == 2 and not any(fn.batch or fn.inputs for fn in generation)
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in generation} == {("generate", 1)}


def test_the_page_asks_with_every_control_in_page_inputs_order(engine):
    pytest.importorskip("gradio")
    fns = {fn.api_name: fn for fn in demo_app.build_app(engine).fns.values()}
    controls = ["mode", "temperature", "top-p", "cfg-text", "cfg-image", "image-temperature", "max-tokens", "seed",
                "decoding", "edit-mask", "slices", "window", "one-series"]
    assert [c.elem_id for c in fns["ask"].inputs][3:] == controls and len(controls) == len(CONTROLS)
    assert [c.elem_id for c in fns["rerun"].inputs][1:] == controls
    assert [c.elem_id for c in fns["preview"].inputs] == ["attach", "slices", "window", "one-series"]


def test_each_waiting_request_runs_once_whichever_tab_triggers_the_run(generator, tmp_path):
    counting = _CountingGenerator(generator)
    engine = Engine(counting, tmp_path, max_batch_size=8)
    requests = [engine.submit([f"question {i}", END_OF_TURN], Settings(max_new_tokens=3, seed=i)) for i in range(5)]
    runs = [threading.Thread(target=demo_app.run, args=(engine,)) for _ in range(5)]  # one per tab, at once
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert sum(n for n, _, _ in counting.calls) == 5  # each request generated once
    for r in requests:
        assert [e.kind for e in engine.events(r.id, timeout=1)][-1] == "done"
    assert engine.run_batch(requests) == [""] * 5 and sum(n for n, _, _ in counting.calls) == 5  # never again


def test_drawn_images_stay_downloadable_after_later_answers(engine):
    _, conv, drawn, _ = _ask(engine, {"text": "Generate an image of a scan", "files": []}, mode="image")[-1]
    assert len(drawn) == 2
    updates = _ask(engine, {"text": "Describe it", "files": []}, conv, max_new_tokens=4)
    assert all(files[:2] == drawn for _, _, files, _ in updates)  # while the text answer grows, and after
    _, conv, _, _ = updates[-1]
    _, _, files, _ = _ask(engine, {"text": "Another one", "files": []}, conv, mode="image")[-1]
    assert files[:2] == drawn and len(files) == 4 and all(os.path.isfile(f) for f in files)


class _ForcedGenerator:
    """The real generator's tokenizer and vocabulary; generate emits a fixed token stream as a model would."""

    def __init__(self, inner, stream: list[int]):
        self.inner, self.stream = inner, stream

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, config, on_step=None, **kw):
        from medmax.generation import GenerationOutput, TextOutput

        for tok in self.stream:
            on_step(0, tok)
        body = [t for t in self.stream if t != self.vocab.eot_id]
        text = TextOutput(self.tokenizer.decode(body, skip_special_tokens=True), body)
        return [GenerationOutput([text], self.stream, "eos")]


def test_control_ids_show_a_marker_and_partial_characters_wait_until_complete(generator, tmp_path):
    tok, v = generator.tokenizer, generator.vocab
    arrow = tok.encode("→", add_special_tokens=False).ids  # a 3-byte character: 3 byte tokens
    reserved = tok.token_to_id("<reserved08300>")
    text = tok.encode("a", add_special_tokens=False).ids
    assert len(arrow) == 3 and reserved is not None
    stream = text + arrow + [reserved] + text + arrow[:2] + [v.eot_id]  # ends on an incomplete character
    engine = Engine(_ForcedGenerator(generator, stream), tmp_path)
    request = engine.submit(["q", END_OF_TURN], Settings(max_new_tokens=len(stream)))
    engine.run_batch([request])
    events = list(engine.events(request.id, timeout=1, merge=False))
    shown = [e.pieces[0] for e in events if e.kind == "partial"]
    marker = f"⟨control {reserved}⟩"
    assert shown[:6] == ["a", "a", "a", "a→", f"a→{marker}", f"a→{marker}a"]
    assert all("\ufffd" not in t and "<reserved" not in t for t in shown)
    final = events[-1].pieces[0]
    assert events[-1].kind == "done" and final == f"a→{marker}a\ufffd"  # never completed: shown as invalid


def test_sigterm_takes_ctrl_cs_path_removes_the_folder_and_restores_the_callers_handler(tmp_path):
    import signal

    folder = tmp_path / "medmax-demo-x"
    (folder / "uploads").mkdir(parents=True)
    (folder / "uploads" / "scan.png").write_bytes(b"a patient's scan")
    seen = []
    callers = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with demo_app._removed_when_stopped(folder):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler interrupts this
        assert not folder.exists() and seen == [signal.SIGTERM]  # removed; the caller's handler chained
        os.kill(os.getpid(), signal.SIGTERM)  # restored: the caller's handler alone, no interrupt
        assert seen == [signal.SIGTERM] * 2
    finally:
        signal.signal(signal.SIGTERM, callers)


def test_image_mode_with_an_upload_draws_conditioned_on_it(engine, generator, scan_path, monkeypatch):
    """Editing in the demo: an uploaded scan and an instruction in image mode; the drawn image's context holds the
    upload's codes (so its guidance streams are the full prompt, the upload alone, and nothing)."""
    seen, original = [], generator.image_decoder.draw

    def draw(contexts, *args, **kwargs):
        seen.extend(contexts)
        return original(contexts, *args, **kwargs)

    monkeypatch.setattr(generator.image_decoder, "draw", draw)
    _, conv, drawn, _ = _ask(engine, {"text": "Remove the lesion.", "files": [str(scan_path)]}, mode="image")[-1]
    (codes,) = generator.prompts.encode_images([model_view(Image.open(scan_path).convert("RGB"), engine.resolution)])
    block = [generator.vocab.boi_id, *generator.vocab.codes_to_ids(codes).tolist(), generator.vocab.eoi_id]
    (context,) = seen
    assert any(context[i : i + len(block)] == block for i in range(len(context)))
    assert [type(p).__name__ for p in conv.turns[-1].pieces] == ["ShownImage"]


# ------------------------------------------------------------------------------------------ inpainting and decoding
def _scan(engine, name: str, seed: int) -> str:
    path = engine.workdir / f"upload-{name}" / name
    path.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(path)
    return str(path)


def _drawn_codes(conv) -> np.ndarray:
    (image,) = [p for p in conv.turns[-1].pieces if isinstance(p, ShownImage)]
    return np.asarray(image.codes.codes)


@pytest.mark.parametrize("decoding", ["plain", "sjd"])
def test_an_edit_mask_redraws_its_box_and_copies_every_other_code_from_the_question_s_image(engine, generator, decoding):
    """In the second question, so the copied image is the prompt's second (the first question's scan is the first)."""
    first, second = _scan(engine, "first.png", 1), _scan(engine, "second.png", 2)
    _, conv, _, _ = _ask(engine, {"text": "Describe it", "files": [first]}, max_new_tokens=2)[-1]
    asked = _ask(engine, {"text": "Remove the lesion.", "files": [second]}, conv, mode="image", edit_mask="0,0,35,35",
                 decoding=decoding, image_temperature=1.5)
    _, conv, _, status = asked[-1]
    assert status.startswith("answer 2 done"), status
    (source,) = generator.prompts.encode_images([Image.open(second).convert("RGB")])
    region = region_from_box((0, 0, 35, 35), (90, 70), engine.resolution, generator.vqgan.grid_shape).reshape(-1)
    drawn = _drawn_codes(conv)
    assert 0 < region.sum() < region.size
    assert np.array_equal(drawn[~region], np.asarray(source)[~region])  # exact outside the box
    assert not np.array_equal(drawn[region], np.asarray(source)[region])  # redrawn inside
    # re-run: the mask applies to the last question's image again, and the same seed draws the same codes
    _, conv2, request, status = demo_app.rerun(engine, conv, *_controls(mode="image", edit_mask="0,0,35,35",
                                                                        decoding=decoding, image_temperature=1.5))
    demo_app.run(engine)
    _, conv2, _, _ = list(demo_app.show(engine, request, conv2))[-1]
    assert np.array_equal(_drawn_codes(conv2), drawn)


@pytest.mark.parametrize("mask, changes, files, reason", [
    ("200,0,300,10", {}, ["scan"], "outside the 90x70 image"),
    ("10,10,10,20", {}, ["scan"], "outside the 90x70 image or empty"),
    ("0,0,10,10", {}, [], "attach the image to edit"),
    ("0,0,10,10", {"mode": "text"}, ["scan"], "choose mode image"),
    ("/etc/passwd", {}, ["scan"], "give a box x0,y0,x1,y1"),  # never a file of the server's
    ("nan,0,10,10", {}, ["scan"], "outside the 90x70 image"),
])
def test_a_bad_edit_mask_gives_one_status_line_before_any_model_work(engine, scan_path, mask, changes, files, reason):
    paths = [str(scan_path) for _ in files]
    _, kept_files, _, conv, request, status = demo_app.start(engine, "Remove the lesion.", paths, Conversation(),
                                                             *_controls(**{"mode": "image", "edit_mask": mask, **changes}))
    assert request is None and conv.turns == [] and reason in status and "\n" not in status
    assert engine.generate_calls == 0 and kept_files == paths
    assert not list((engine.workdir / "uploads").rglob("*.png"))  # the upload's preview is not kept either


def test_image_decoding_is_a_setting_and_greedy_codes_agree_between_sjd_and_plain(engine):
    assert Settings(decoding="sjd").generation_config(batch_size=8).image_decoding("cpu") == "sjd"
    assert Settings().generation_config(batch_size=8).image_decoding("cpu") == "plain"  # auto: plain on a CPU
    codes = {}
    for decoding in ("plain", "sjd"):
        _, conv, _, _ = _ask(engine, {"text": "Draw a scan", "files": []}, mode="image", image_temperature=0,
                             decoding=decoding)[-1]
        codes[decoding] = _drawn_codes(conv)
    assert np.array_equal(codes["plain"], codes["sjd"])


def test_only_folders_of_servers_no_longer_running_are_removed_at_start(tmp_path):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    pids = {"dead": str(gone.pid), "alive": str(os.getpid()), "zero": "0", "all": "-1", "garbage": "12ab"}
    for name, pid in pids.items():
        (tmp_path / f"medmax-demo-{name}").mkdir()
        (tmp_path / f"medmax-demo-{name}" / demo_app.PID_FILE).write_text(pid)
    (tmp_path / "medmax-demo-being-made").mkdir()  # no pid file yet: a server starting now
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / demo_app.PID_FILE).write_text(str(gone.pid))  # not a demo folder
    assert demo_app.remove_stale_folders(tmp_path) == [tmp_path / "medmax-demo-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["other", "medmax-demo-being-made", *(f"medmax-demo-{n}" for n in pids if n != "dead")])
