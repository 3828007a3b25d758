"""The demo's Gradio page: a thin layer wiring :mod:`medmax.demo` to components (``medmax demo --model DIR``).

One question goes through three events:

1. ``start`` (the question's submit, or the re-run button) loads the attached files, adds the user turn to the
   session's conversation and opens a request;
2. ``run`` is a Gradio *batch* function (``batch=True``, one worker): requests from every tab that
   wait in the queue together reach it as one list, and :meth:`medmax.demo.Engine.run_batch` runs each
   group of same-settings requests as one ``Generator.generate`` call;
3. ``show`` streams the request's answer into the chat as it grows (Gradio batch functions cannot
   stream, hence a separate event; it only waits on the request's channel).

Uploads and answers live in the app's temporary folder (Gradio's upload folder), removed at exit.
Gradio is imported only here (``pip install -e .[demo]``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from functools import partial
from pathlib import Path

from .demo import (MAX_NEW_TOKENS, Conversation, DemoError, Engine, Settings, Turn, turn_messages,
                   user_pieces)
from .errors import UserError

logger = logging.getLogger(__name__)

DEFAULTS = Settings()
_CSS = "#status p { font-weight: 600; } #chat img { min-width: 128px; image-rendering: pixelated; }"


def _status(err: Exception) -> str:
    return f"**Error:** {err}"


def _paths(files) -> list:
    """The file component's value (None, paths, or Gradio's file dicts) as a list of paths."""
    return [f.get("path") if isinstance(f, dict) else f for f in (files or [])]


# ------------------------------------------------------------------------------------------ handlers
# Plain functions of (engine, page values) -> page values, so tests call them without a browser.
def preview(engine: Engine, files) -> tuple[list, str]:
    """The attached files as the model will see them; a bad one gives its error instead."""
    shown, errors = [], []
    upload_id = uuid.uuid4().hex
    for k, path in enumerate(_paths(files)):
        try:
            image = engine.add_upload(path, upload_id, k)
            shown.append((str(image.path), Path(str(path)).name))
        except DemoError as err:
            errors.append(str(err))
    return shown, "; ".join(_status(DemoError(e)) for e in errors)


def start(engine: Engine, text: str, files, conversation: Conversation, *controls):
    """Add the user turn and open its request; -> (question, files, chat, conversation, request, status).

    On a bad upload or setting the question and files stay as they were, and the status says why.
    """
    try:
        settings = Settings.from_page(*controls)
        text, paths = (text or "").strip(), _paths(files)
        if not text and not paths:
            raise DemoError("type a question or attach an image first")
        upload_id = uuid.uuid4().hex
        images = [engine.add_upload(path, upload_id, k) for k, path in enumerate(paths)]
        turn = Turn("user", user_pieces(images, text))
    except DemoError as err:
        return text, files, conversation.messages(), conversation, None, _status(err)
    conversation = Conversation([*conversation.turns, turn], conversation.answered)
    request = engine.submit(conversation.prompt(), settings)
    status = f"answering ({settings.mode} mode, seed {settings.seed})"
    return "", None, conversation.messages(), conversation, request, status


def rerun(engine: Engine, conversation: Conversation, *controls):
    """Drop the last answer and ask again with the current settings; -> (chat, conversation, request, status)."""
    try:
        settings = Settings.from_page(*controls)
        conversation = conversation.without_last_answer()
        if not conversation.turns:
            raise DemoError("nothing to re-run yet: ask a question first")
    except DemoError as err:
        return conversation.messages(), conversation, None, _status(err)
    request = engine.submit(conversation.prompt(), settings)
    return conversation.messages(), conversation, request, f"re-running ({settings.mode} mode, seed {settings.seed})"


def run(engine: Engine, requests: list) -> list[list[str]]:
    """Gradio's batch function: every waiting request of every tab; -> one result per request."""
    real = [r for r in requests if r is not None]
    logger.info("running a batch of %d request(s)", len(real))
    results = iter(engine.run_batch(real)) if real else iter(())
    return [[next(results) if r is not None else "" for r in requests]]


def show(engine: Engine, request, conversation: Conversation):
    """Stream the request's answer; yields (chat, conversation, downloads, status)."""
    for event in engine.events(request.id):
        if event.kind == "partial":
            yield conversation.messages() + turn_messages("assistant", event.pieces), conversation, None, "answering…"
        elif event.kind == "error":
            chat = conversation.messages() + [{"role": "assistant", "content": f"⚠ {event.error}"}]
            yield chat, conversation, None, _status(DemoError(event.error))
        else:
            pieces = [p for p in event.pieces if not (isinstance(p, str) and not p)]
            conversation = Conversation([*conversation.turns, Turn("assistant", pieces)], conversation.answered + 1)
            files = [str(f) for p in pieces if not isinstance(p, str) for f in (p.path, p.codes_path)]
            note = "" if pieces else " (an empty answer: the model ended its turn at once)"
            yield (conversation.messages(), conversation, files or None,
                   f"answer {conversation.answered} done: {event.finish_reason}{note}")


# ------------------------------------------------------------------------------------------ page
def _show_page(engine: Engine, request, conversation: Conversation):
    """``show``, leaving the page as it is when no request was opened (``start`` showed why)."""
    import gradio as gr

    if request is None:
        yield (gr.skip(),) * 4
        return
    yield from show(engine, request, conversation)


def _preview_page(engine: Engine, files):
    """``preview``; with no file attached the status line is left alone (it may be telling how an answer goes)."""
    import gradio as gr

    if not _paths(files):
        return None, gr.skip()
    shown, status = preview(engine, files)
    return shown or None, status


def build_app(engine: Engine, title: str = "MedMax demo"):
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        conversation = gr.State(Conversation())
        request = gr.State(None)
        done = gr.State(None)
        gr.Markdown(f"## {title}\nAsk about a scan (PNG, JPEG, TIFF or DICOM), ask for an image, or both.")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", height="55vh", min_height=360, label="Conversation")
                with gr.Row():
                    # any file type: DICOM files often have no suffix; the content decides (a clear error otherwise)
                    attached = gr.File(label="Scans: PNG, JPEG, TIFF, DICOM", file_count="multiple",
                                       elem_id="attach", height=130)
                    seen = gr.Gallery(label="What the model sees", elem_id="preview", columns=2, height=130,
                                      object_fit="contain", allow_preview=False)
                question = gr.Textbox(elem_id="ask", placeholder="Ask about the attached scans, or ask for an image…",
                                      show_label=False, submit_btn=True)
                with gr.Row():
                    again = gr.Button("Re-run last answer", elem_id="rerun")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=2):
                with gr.Accordion("Settings", open=True):
                    controls = [
                        gr.Radio(["text", "image", "interleaved"], value=DEFAULTS.mode, label="Mode", elem_id="mode"),
                        gr.Slider(0, 2, DEFAULTS.temperature, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"),
                        gr.Slider(0.05, 1, DEFAULTS.top_p, step=0.05, label="Top-p", elem_id="top-p"),
                        gr.Slider(0, 10, DEFAULTS.guidance_scale_text, step=0.1, label="Guidance scale (text)", elem_id="cfg-text"),
                        gr.Slider(0, 10, DEFAULTS.guidance_scale_image, step=0.1, label="Guidance scale (image)", elem_id="cfg-image"),
                        gr.Slider(0, 2, DEFAULTS.image_temperature, step=0.05, label="Image temperature", elem_id="image-temperature"),
                        gr.Slider(1, MAX_NEW_TOKENS, DEFAULTS.max_new_tokens, step=1, label="Max tokens", elem_id="max-tokens"),
                        gr.Number(DEFAULTS.seed, precision=0, minimum=0, label="Seed", elem_id="seed"),
                    ]
                downloads = gr.File(label="Drawn images: PNG and codes", file_count="multiple", elem_id="downloads",
                                    interactive=False, height=120)

        def answer(started):
            started.then(partial(run, engine), [request], [done], batch=True, max_batch_size=engine.max_batch_size,
                         concurrency_limit=1)
            started.then(partial(_show_page, engine), [request, conversation], [chat, conversation, downloads, status],
                         concurrency_limit=None)

        attached.change(partial(_preview_page, engine), [attached], [seen, status], show_progress="hidden")
        answer(question.submit(partial(start, engine), [question, attached, conversation, *controls],
                               [question, attached, chat, conversation, request, status]))
        answer(again.click(partial(rerun, engine), [conversation, *controls], [chat, conversation, request, status]))
        clear.click(lambda: ([], Conversation(), None, None, None, ""), None,
                    [chat, conversation, downloads, attached, seen, status])
    return app


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False, device: str | None = None,
          dtype=None, max_batch_size: int = 8, max_upload_mb: float = 32) -> None:
    """Load the model and serve the page until interrupted; the temporary folder is removed at exit."""
    workdir = Path(tempfile.mkdtemp(prefix="medmax-demo-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir)  # uploads land here; read before any component is built
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        try:
            import gradio as gr
        except ImportError as err:  # the extra is not installed: the user's setup, not a bug
            raise UserError(f"medmax demo needs Gradio ({err}); install the extra: pip install -e '.[demo]'") from err
        from .generation import Generator

        generator = Generator.from_dir(model_dir, device=device, dtype=dtype)
        engine = Engine(generator, workdir, max_batch_size=max_batch_size, max_upload_bytes=int(max_upload_mb * 2**20))
        app = build_app(engine, title=f"MedMax demo: {Path(model_dir).name}")
        app.queue(default_concurrency_limit=1)
        logger.info("serving %s on http://%s:%d (uploads and answers in %s)", model_dir, host, port, workdir)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])  # local fonts: nothing fetched
        app.launch(server_name=host, server_port=port, share=share, max_file_size=int(max_upload_mb * 2**20),
                   ssr_mode=False, show_error=True, theme=theme, css=_CSS, footer_links=[])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
