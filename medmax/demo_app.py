"""The demo's Gradio page: a thin layer wiring :mod:`medmax.demo` to components (``medmax demo --model DIR``).

One question goes through three events:

1. ``start`` (the question's submit, or the re-run button) loads the attached files, adds the user turn to the
   session's conversation and opens a request;
2. ``run`` (one worker for the whole page, ``concurrency_limit=1``) runs every request submitted and not yet
   run, from every tab (:meth:`medmax.demo.Engine.run_pending`), each group of same-settings requests as one
   ``Generator.generate`` call. While it generates, new questions wait; the next ``run`` takes them all as
   one batch, and the ``run`` events that find nothing left return at once. It takes no input: Gradio's own
   batching (``batch=True``) reads a ``gr.State`` input from one session for every slot of a batch, so
   several tabs asking at once had one tab's request generated in every slot and the others never;
3. ``show`` streams the request's answer into the chat as it grows (a separate event, one per tab; it only
   waits on the request's channel).

Uploads and answers live in the app's temporary folder (``/tmp/medmax-demo-*``, Gradio's upload folder, named
in the log at start), removed when the server stops: at exit, on Ctrl-C, on SIGTERM, and on a crash as far
as Python still runs (``atexit``). SIGKILL or a power cut leaves it behind until the next server starts: each
server writes its pid in its folder, and a starting one removes the folders of servers no longer running
(:func:`remove_stale_folders`).
Gradio is imported only here (``pip install -e .[demo]``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from functools import partial
from pathlib import Path

from .demo import (MAX_NEW_TOKENS, Conversation, DemoError, Engine, PageInputs, Settings, ShownImage, ShownVolume,
                   Turn, edit_region, turn_messages, user_pieces)
from .demo_uploads import WINDOW_CHOICES, VolumeReading, series_note
from .generation.config import DECODINGS
from .errors import UserError

logger = logging.getLogger(__name__)

DEFAULTS = Settings()
READING = VolumeReading()
_CSS = "#status p { font-weight: 600; } #chat img { min-width: 128px; image-rendering: pixelated; }"


def _status(err: Exception) -> str:
    return f"**Error:** {err}"


def _paths(files) -> list:
    """The file component's value (None, paths, or Gradio's file dicts) as a list of paths."""
    return [f.get("path") if isinstance(f, dict) else f for f in (files or [])]


# ------------------------------------------------------------------------------------------ handlers
# Plain functions of (engine, page values) -> page values, so tests call them without a browser.
def preview(engine: Engine, files, *reading) -> tuple[list, str]:
    """The attached files as the model will see them (a volume as its slices, labelled); a bad one gives its error.

    ``reading``: the volume controls (slices, window, one series); the defaults without them. Nothing is kept of
    a preview that fails."""
    shown = []
    try:
        controls = VolumeReading.from_page(*reading) if reading else VolumeReading()
        for piece in engine.add_uploads(_paths(files), uuid.uuid4().hex, controls):
            if isinstance(piece, ShownVolume):
                shown += [(str(path), label) for path, label in piece.views]
            else:
                shown.append((str(piece.path), piece.label))
    except DemoError as err:
        return [], _status(err)
    note = "" if controls.one_series else series_note(engine.upload_groups(_paths(files), controls))
    return shown, f"**Note:** {note}" if note else ""


def start(engine: Engine, text: str, files, conversation: Conversation, *controls):
    """Add the user turn and open its request; -> (question, files, chat, conversation, request, status).

    ``controls``: the page's values (:meth:`medmax.demo.PageInputs.from_page`). On a bad upload, setting, edit mask
    or a conversation too long for the model, the question and files stay as they were, nothing of the uploads is
    kept, and the status says why.
    """
    upload_id = uuid.uuid4().hex
    try:
        page = PageInputs.from_page(*controls)
        text, paths = (text or "").strip(), _paths(files)
        if not text and not paths:
            raise DemoError("type a question or attach an image first")
        turn = Turn("user", user_pieces(engine.add_uploads(paths, upload_id, page.reading), text))
        asked = Conversation([*conversation.turns, turn], conversation.answered)
        request = _submit(engine, asked, page)
    except DemoError as err:
        shutil.rmtree(engine.workdir / "uploads" / upload_id, ignore_errors=True)
        return text, files, conversation.messages(), conversation, None, _status(err)
    status = f"answering ({page.settings.mode} mode, seed {page.settings.seed})"
    return "", None, asked.messages(), asked, request, status


def _submit(engine: Engine, conversation: Conversation, page: PageInputs):
    """Check the edit mask and the prompt's length (no model work yet), then open the request."""
    edit = edit_region(engine, page.edit_mask, conversation, page.settings.mode)
    prompt = conversation.prompt()
    engine.check_prompt(prompt, page.settings.mode)
    return engine.submit(prompt, page.settings, edit)


def rerun(engine: Engine, conversation: Conversation, *controls):
    """Drop the last answer and ask again with the current settings; -> (chat, conversation, request, status)."""
    try:
        page = PageInputs.from_page(*controls)
        conversation = conversation.without_last_answer()
        if not conversation.turns:
            raise DemoError("nothing to re-run yet: ask a question first")
        request = _submit(engine, conversation, page)
    except DemoError as err:
        return conversation.messages(), conversation, None, _status(err)
    settings = page.settings
    return conversation.messages(), conversation, request, f"re-running ({settings.mode} mode, seed {settings.seed})"


def run(engine: Engine) -> None:
    """The generation event: every request waiting, whichever tab asked (each runs once, in one batch per settings)."""
    engine.run_pending()


def downloads(conversation: Conversation, growing: list | None = None) -> list[str] | None:
    """Every image drawn in the conversation (and in the answer still growing): PNG and codes, oldest first."""
    answers = [t.pieces for t in conversation.turns if t.role == "assistant"] + [growing or []]
    files = [str(f) for pieces in answers for p in pieces if isinstance(p, ShownImage) and p.codes is not None
             for f in (p.path, p.codes_path)]
    return files or None


def show(engine: Engine, request, conversation: Conversation):
    """Stream the request's answer; yields (chat, conversation, downloads, status)."""
    for event in engine.events(request.id):
        if event.kind == "partial":
            yield (conversation.messages() + turn_messages("assistant", event.pieces), conversation,
                   downloads(conversation, event.pieces), "answering…")
        elif event.kind == "error":
            chat = conversation.messages() + [{"role": "assistant", "content": f"⚠ {event.error}"}]
            yield chat, conversation, downloads(conversation), _status(DemoError(event.error))
        else:
            pieces = [p for p in event.pieces if not (isinstance(p, str) and not p)]
            conversation = Conversation([*conversation.turns, Turn("assistant", pieces)], conversation.answered + 1)
            note = "" if pieces else " (an empty answer: the model ended its turn at once)"
            yield (conversation.messages(), conversation, downloads(conversation),
                   f"answer {conversation.answered} done: {event.finish_reason}{note}")


# ------------------------------------------------------------------------------------------ page
def _show_page(engine: Engine, request, conversation: Conversation):
    """``show``, leaving the page as it is when no request was opened (``start`` showed why)."""
    import gradio as gr

    if request is None:
        yield (gr.skip(),) * 4
        return
    yield from show(engine, request, conversation)


def _preview_page(engine: Engine, files, *reading):
    """``preview``; with no file attached the status line is left alone (it may be telling how an answer goes)."""
    import gradio as gr

    if not _paths(files):
        return None, gr.skip()
    shown, status = preview(engine, files, *reading)
    return shown or None, status


def _settings_column(gr) -> tuple[list, object, list]:
    """The settings' controls: generation settings (Settings.from_page's order), the edit mask, the volume controls."""
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
            gr.Radio(list(DECODINGS), value=DEFAULTS.decoding, elem_id="decoding",
                     label="Image decoding (sjd: speculative Jacobi, same distribution, fewer forwards)"),
        ]
        edit_mask = gr.Textbox(label="Edit mask (image mode): x0,y0,x1,y1 in the attached image's pixels; "
                                     "only this box is redrawn", placeholder="empty: draw the whole image",
                               elem_id="edit-mask")
    with gr.Accordion("Volumes", open=False):
        reading = [
            gr.Textbox(READING.slices, label="Slices per volume (K, evenly spaced, or all)", elem_id="slices"),
            gr.Dropdown(list(WINDOW_CHOICES), value=READING.window, allow_custom_value=True, elem_id="window",
                        label="Window: a CT window, W/L in HU (e.g. 400/50), or percentile (MRI)"),
            gr.Checkbox(READING.one_series, label="The attached DICOM files are one series (a volume)",
                        elem_id="one-series"),
        ]
    return controls, edit_mask, reading


def build_app(engine: Engine, title: str = "MedMax demo"):
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        conversation = gr.State(Conversation())
        request = gr.State(None)
        gr.Markdown(f"## {title}\nAsk about a scan (PNG, JPEG, TIFF, DICOM) or a volume "
                    "(NIfTI, .npy, a DICOM series), ask for an image, or both.")
        with gr.Row():
            with gr.Column(scale=3):
                chat = gr.Chatbot(elem_id="chat", height="55vh", min_height=360, label="Conversation")
                with gr.Row():
                    # any file type: DICOM files often have no suffix; the content decides (a clear error otherwise)
                    attached = gr.File(label="Scans: PNG, JPEG, TIFF, DICOM; volumes: .nii, .nii.gz, .npy", file_count="multiple",
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
                controls, edit_mask, reading = _settings_column(gr)
                downloads = gr.File(label="Drawn images: PNG and codes", file_count="multiple", elem_id="downloads",
                                    interactive=False, height=120)

        def answer(started, name: str):
            # one generation worker for the page: both chains' run events share the concurrency group
            started.then(partial(run, engine), None, None, concurrency_limit=1, concurrency_id="generate",
                         api_name=f"{name}_generate", show_progress="hidden")
            started.then(partial(_show_page, engine), [request, conversation], [chat, conversation, downloads, status],
                         concurrency_limit=None, api_name=f"{name}_answer")

        slices, window, one_series = reading  # the slice count is read when typed in full (Enter or leaving the box)
        gr.on([attached.change, slices.submit, slices.blur, window.change, one_series.change],
              partial(_preview_page, engine), [attached, *reading], [seen, status], show_progress="hidden",
              api_name="preview")
        asked = [*controls, edit_mask, *reading]  # PageInputs.from_page's order
        answer(question.submit(partial(start, engine), [question, attached, conversation, *asked],
                               [question, attached, chat, conversation, request, status], api_name="ask"), "ask")
        answer(again.click(partial(rerun, engine), [conversation, *asked], [chat, conversation, request, status],
                           api_name="rerun"), "rerun")
        clear.click(lambda: ([], Conversation(), None, None, None, ""), None,
                    [chat, conversation, downloads, attached, seen, status])
    return app


def serve(model_dir: Path, host: str = "127.0.0.1", port: int = 7860, share: bool = False, device: str | None = None,
          dtype=None, max_batch_size: int = 8, max_upload_mb: float = 32) -> None:
    """Load the model and serve the page until interrupted (Ctrl-C or SIGTERM); the temporary folder is removed."""
    workdir = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir)  # uploads land here; read before any component is built
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with _removed_when_stopped(workdir):
        (workdir / PID_FILE).write_text(str(os.getpid()))
        remove_stale_folders(workdir.parent)
        try:
            _serve(workdir, model_dir, host, port, share, device, dtype, max_batch_size, max_upload_mb)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the page was up (Gradio handles it once it is)
            logger.info("stopped before serving")


def _serve(workdir: Path, model_dir, host, port, share, device, dtype, max_batch_size, max_upload_mb) -> None:
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
    logger.info("stopped; removing %s", workdir)


FOLDER_PREFIX = "medmax-demo-"
PID_FILE = "server.pid"  # in a server's folder: the process that serves it


def remove_stale_folders(parent: Path) -> list[Path]:
    """Remove the folders killed servers left in ``parent`` (SIGKILL runs no handler); -> those removed.

    A folder is removed when it is a ``medmax-demo-*`` folder of this user whose ``server.pid`` names a process
    that no longer runs. A folder without a readable pid (a server starting now) or of another user stays.
    """
    removed = []
    for folder in sorted(parent.glob(f"{FOLDER_PREFIX}*")):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid <= 0 or _running(pid):  # 0 and -1 would name process groups, not a server
            continue
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("removed %s (left by a demo server that was killed: pid %d)", folder, pid)
        removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def _removed_when_stopped(folder: Path):
    """Remove ``folder`` however the server stops: a return, Ctrl-C, SIGTERM / SIGHUP, or a crash (``atexit``)."""
    remove = partial(shutil.rmtree, folder, ignore_errors=True)
    atexit.register(remove)  # an exception nobody catches still runs atexit handlers
    replaced = _stop_signals_as_ctrl_c()
    try:
        yield
    finally:
        remove()
        atexit.unregister(remove)
        for signum, handler in replaced.items():
            signal.signal(signum, handler)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # a service / container stop, a closed terminal


def _stop_signals_as_ctrl_c() -> dict:
    """Make SIGTERM and SIGHUP take Ctrl-C's path (Gradio closes its server, ``finally`` blocks run).

    Python's default for them ends the process at once, with no cleanup. A handler the caller set is called
    first (chained); a signal the caller ignores stays ignored. -> {signal: the handler replaced}, to restore
    (nothing off the main thread, where Python cannot set handlers).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    replaced = {}
    for signum in STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue
        signal.signal(signum, partial(_interrupt, previous))
        replaced[signum] = previous
    return replaced


def _interrupt(previous, signum, frame) -> None:
    if callable(previous):
        previous(signum, frame)
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")
