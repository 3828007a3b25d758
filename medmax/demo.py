"""The browser demo's logic: uploads, the conversation's token context, settings, batching, streaming.

``medmax demo --model DIR`` serves a Gradio page (:mod:`medmax.demo_app`, a thin layer over this
module). Everything here runs without a browser and without Gradio:

- :meth:`Engine.add_uploads` reads a question's attachments (:mod:`medmax.demo_uploads`): 2D images
  (PNG, JPEG, TIFF, DICOM... through :func:`medmax.images.load_image`) and volumes (NIfTI, ``.npy``, the
  attached DICOM files as one series when the page says so, read as ``medmax generate --volume`` reads
  them), after checking that each path names a file inside the app's temporary folder, not over the size
  limit; it saves what the model sees of each (a volume: each slice), and keeps nothing when one fails.
- :func:`edit_region` turns the page's edit mask (a box in the question's first image) into the
  :class:`medmax.generation.editing.EditRegion` its request carries: image mode redraws only that box.
- :class:`Conversation` holds the turns. Its :meth:`Conversation.prompt` is one token context in the
  layout of training rows and evaluation: each user turn is its images, then its text, then the
  end-of-turn; each answer is its text and drawn images (as their exact codes), then the end-of-turn.
- :class:`Settings` are the page's generation controls (image decoding among them), :class:`PageInputs`
  every control a question is asked with; :func:`group_requests` groups requests whose settings
  agree except for the seed; :meth:`Engine.run_pending` takes every request submitted and not yet run
  (each runs once) and :meth:`Engine.run_batch` runs each group as ONE ``Generator.generate``
  call with a seed per request, so an answer depends on its prompt, settings and seed only, never on
  who else asked at the same time; and streams each answer as it grows into a per-request channel
  that :meth:`Engine.events` reads: text through :func:`answer_text` (control ids as
  :data:`CONTROL_MARKER`, an incomplete UTF-8 character held back until it completes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image

from .demo_uploads import (DemoError, VolumeReading, checked_upload, display_name, group_uploads, link_series,
                           load_upload, model_view, montage, read_volume, slice_views)
from .errors import UserError
from .generation import END_OF_TURN, MODES, GenerationConfig, ImageCodes, ImageOutput
from .generation.config import DECODINGS
from .generation.editing import EditMaskError, EditRegion, parse_box, region_from_box
from .prompting import VolumeInput, expand_volumes, prompt_segments
from .vocab import control_mask

logger = logging.getLogger(__name__)

MAX_UPLOAD_MB = 32  # default limit of one uploaded file
MAX_NEW_TOKENS = 1024  # the page's max-tokens slider goes no higher


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """The page's generation controls. ``seed`` is per request; the rest decides which requests batch together."""

    mode: str = "text"
    temperature: float = 1.0  # 0 = greedy text
    top_p: float = 0.9  # text
    guidance_scale_text: float = 3.0
    guidance_scale_image: float = 1.2
    image_temperature: float = 0.7  # 0 = greedy codes
    max_new_tokens: int = 128
    seed: int = 0
    decoding: str = "auto"  # image codes: auto, plain or sjd (speculative Jacobi decoding), as GenerationConfig

    def __post_init__(self):
        checks = {
            "mode": (self.mode in MODES, f"one of {', '.join(MODES)}"),
            "temperature": (self.temperature >= 0, ">= 0"),
            "top-p": (0 < self.top_p <= 1, "in (0, 1]"),
            "text guidance scale": (self.guidance_scale_text >= 0, ">= 0"),
            "image guidance scale": (self.guidance_scale_image >= 0, ">= 0"),
            "image temperature": (self.image_temperature >= 0, ">= 0"),
            "max tokens": (1 <= self.max_new_tokens <= MAX_NEW_TOKENS, f"in 1..{MAX_NEW_TOKENS}"),
            "seed": (0 <= self.seed < 2**63, "in 0..2**63-1 (a 64-bit seed)"),
            "image decoding": (self.decoding in DECODINGS, f"one of {', '.join(DECODINGS)}"),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise DemoError(f"setting {name} must be {rule}")

    @classmethod
    def from_page(cls, mode, temperature, top_p, cfg_text, cfg_image, image_temperature, max_new_tokens, seed,
                  decoding) -> "Settings":
        """From the page's raw control values (numbers may arrive as floats or None)."""
        try:
            return cls(mode=str(mode), temperature=float(temperature), top_p=float(top_p),
                       guidance_scale_text=float(cfg_text), guidance_scale_image=float(cfg_image),
                       image_temperature=float(image_temperature), max_new_tokens=int(max_new_tokens), seed=int(seed),
                       decoding=str(decoding))
        except (TypeError, ValueError) as err:
            if isinstance(err, DemoError):
                raise
            raise DemoError(f"settings: a control holds no number ({err})") from err

    def batch_key(self) -> "Settings":
        return dataclasses.replace(self, seed=0)

    def generation_config(self, batch_size: int) -> GenerationConfig:
        return GenerationConfig(
            mode=self.mode, max_new_tokens=self.max_new_tokens, max_images=1, do_sample=self.temperature > 0,
            temperature=self.temperature, top_p=self.top_p, image_temperature=self.image_temperature,
            guidance_scale_text=self.guidance_scale_text, guidance_scale_image=self.guidance_scale_image,
            decoding=self.decoding, batch_size=batch_size)


N_SETTINGS = len(dataclasses.fields(Settings))  # the page's generation controls, in Settings.from_page's order


@dataclass(frozen=True)
class PageInputs:
    """Every control a question is asked with: the generation settings (batched on), the edit mask (this request's
    inpainting box, ``x0,y0,x1,y1`` in the first attached image's pixels, or empty) and the volume controls."""

    settings: Settings
    edit_mask: str
    reading: VolumeReading

    @classmethod
    def from_page(cls, *values) -> "PageInputs":
        """The page's control values: :data:`N_SETTINGS` settings, then the edit mask, slices, window, one series."""
        if len(values) != N_SETTINGS + 4:
            raise DemoError(f"settings: {len(values)} control values, expected {N_SETTINGS + 4}")
        settings, (edit_mask, *reading) = Settings.from_page(*values[:N_SETTINGS]), values[N_SETTINGS:]
        return cls(settings, str(edit_mask or "").strip(), VolumeReading.from_page(*reading))


# ---------------------------------------------------------------------------------------------- conversation
@dataclass
class ShownImage:
    """An image in the conversation: an upload (``image``) or a drawn one (``codes``), and its PNG on disk."""

    path: Path
    image: Image.Image | None = None  # uploads: the loaded image, tokenized by the model's VQGAN
    codes: ImageCodes | None = None  # drawn images: their exact codes
    codes_path: Path | None = None
    label: str = ""  # uploads: the file's name, for the preview


@dataclass
class ShownVolume:
    """An uploaded volume: its slices as the prompt takes them, each slice's PNG and label, and a montage for the chat."""

    path: Path  # the montage
    volume: VolumeInput
    views: list[tuple[Path, str]]


Piece = Union[str, ShownImage, ShownVolume]


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    pieces: list[Piece]


def user_pieces(images: list[ShownImage], text: str) -> list[Piece]:
    """One user turn's content in the toolkit's one prompt layout (:func:`medmax.prompting.prompt_segments`):
    the images first, then the question; or each image at its ``<image>`` placeholder in the text."""
    try:
        return prompt_segments(text, images)
    except ValueError as err:
        raise DemoError(f"question: {err}") from err


@dataclass
class Conversation:
    """The turns of one chat; :meth:`prompt` is its whole token context for the next answer."""

    turns: list[Turn] = field(default_factory=list)
    answered: int = 0  # answers generated in this chat so far, re-runs included (numbers the page's status)

    def prompt(self) -> list:
        """Generator segments: every turn's content followed by the end-of-turn (the conversation layout)."""
        segments = []
        for turn in self.turns:
            for piece in turn.pieces:
                if isinstance(piece, str):
                    segments.append(piece)
                elif isinstance(piece, ShownVolume):
                    segments.append(piece.volume)  # the generator writes its header and slices (expand_volumes)
                else:
                    segments.append(piece.codes if piece.codes is not None else piece.image)
            segments.append(END_OF_TURN)
        return segments

    def without_last_answer(self) -> "Conversation":
        """The conversation up to and including the last user turn (for a re-run)."""
        turns = list(self.turns)
        while turns and turns[-1].role == "assistant":
            turns.pop()
        return Conversation(turns, self.answered)

    def messages(self) -> list[dict]:
        """Chat messages for the page: text as is, images by their PNG path."""
        return [message for turn in self.turns for message in turn_messages(turn.role, turn.pieces)]


def turn_messages(role: str, pieces: list[Piece]) -> list[dict]:
    out = []
    for piece in pieces:
        if isinstance(piece, str):
            out.append({"role": role, "content": piece})
        elif isinstance(piece, ShownVolume):
            out.append({"role": role, "content": {"path": str(piece.path), "alt_text": piece.volume.header}})
        else:
            out.append({"role": role, "content": {"path": str(piece.path), "alt_text": piece.path.name}})
    return out


def edit_region(engine: "Engine", spec: str, conversation: Conversation, mode: str) -> EditRegion | None:
    """The edit mask ``x0,y0,x1,y1`` (pixels of the last question's first attachment, a 2D image) as the region an
    image-mode answer redraws; every other code is copied from that image. None when ``spec`` is empty."""
    if not spec:
        return None
    if mode != "image":
        raise DemoError(f"edit mask: inpainting draws an image; choose mode image, not {mode}")
    box = parse_box(spec)
    if box is None:
        raise DemoError(f"edit mask {spec[:40]!r}: give a box x0,y0,x1,y1 in the attached image's pixels")
    *earlier, question = conversation.turns
    attached = [p for p in question.pieces if not isinstance(p, str)]
    if not attached or not isinstance(attached[0], ShownImage) or attached[0].image is None:
        raise DemoError("edit mask: attach the image to edit with the question (a 2D image, the first attachment)")
    before = sum(isinstance(s, (Image.Image, ImageCodes)) for s in expand_volumes(Conversation(earlier).prompt()))
    try:
        region = region_from_box(box, attached[0].image.size, engine.resolution, engine.generator.vqgan.grid_shape,
                                 label="edit mask")
    except EditMaskError as err:
        raise DemoError(str(err)) from err
    return EditRegion(region, source=before)


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Request:
    """One answer to generate: the conversation's prompt and the settings it was asked with."""

    id: str
    prompt: list
    settings: Settings
    edit: EditRegion | None = None  # inpainting: the region drawn, every other code copied from an input image


@dataclass
class Event:
    """What a request's channel carries: the answer so far ("partial"), the final one ("done"), or an "error"."""

    kind: str
    pieces: list[Piece] = field(default_factory=list)
    error: str = ""
    finish_reason: str = ""


def group_requests(requests: list[Request]) -> list[list[int]]:
    """Indices of requests whose settings agree except for the seed, in order of first appearance."""
    groups: dict[Settings, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.settings.batch_key(), []).append(i)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------- answer text
CONTROL_MARKER = "⟨control {id}⟩"  # how an answer shows a control id the model emitted among its text
_RESERVED = re.compile(r"<reserved\d+>")  # Chameleon's reserved block: ids with no text, special or not
_REPLACEMENT = "\ufffd"


def control_ids(tokenizer) -> frozenset[int]:
    """Ids that are not text: special and image-code ids (:func:`medmax.vocab.control_mask`) and the reserved block."""
    mask = control_mask(tokenizer).copy()
    for name, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        mask[idx] |= bool(_RESERVED.fullmatch(name))
    return frozenset(np.flatnonzero(mask).tolist())


def answer_text(ids: list[int], decode, controls: frozenset[int], final: bool) -> str:
    """An answer's text ids as the page shows them: each control id as :data:`CONTROL_MARKER`, never its raw name;
    while the answer grows (not ``final``), the byte tokens of a character not yet complete are held back."""
    parts, run = [], []
    for tok in ids:
        if tok in controls:
            parts += [decode(run), CONTROL_MARKER.format(id=tok)]
            run = []
        else:
            run.append(tok)
    parts.append(decode(run) if final else _complete_text(run, decode))
    return "".join(parts)


def _complete_text(ids: list[int], decode) -> str:
    """The text of ``ids`` without an incomplete UTF-8 character at its end (one spans at most 4 byte tokens)."""
    text = decode(ids)
    for held in range(1, min(4, len(ids)) + 1):
        if not text.endswith(_REPLACEMENT):
            return text
        text = decode(ids[:-held])
    return text if not text.endswith(_REPLACEMENT) else decode(ids)  # bytes that are invalid whatever follows


class _Answer:
    """One request's answer as it grows: text decoded from its token ids so far, and the images drawn."""

    def __init__(self, engine: "Engine", request: Request):
        self.engine, self.request = engine, request
        self.pieces: list[Piece] = []
        self.text_ids: list[int] = []

    def step(self, item) -> None:
        if isinstance(item, ImageOutput):
            self.text_ids = []
            self.pieces.append(self.engine.save_drawn(self.request.id, item, len(self._images())))
        elif item not in self.engine.end_ids:
            if not self.text_ids:
                self.pieces.append("")
            self.text_ids.append(item)
            self.pieces[-1] = self.engine.text(self.text_ids, final=False)
        self.engine.put(self.request.id, Event("partial", list(self.pieces)))

    def _images(self) -> list[ShownImage]:
        return [p for p in self.pieces if isinstance(p, ShownImage)]

    def final(self, out) -> Event:
        """The finished answer: the generator's text segments (the page sets no stop string), the images as drawn."""
        images, pieces = iter(self._images()), []
        for seg in out.segments:
            pieces.append(next(images) if isinstance(seg, ImageOutput) else self.engine.text(seg.token_ids, final=True))
        return Event("done", pieces, finish_reason=out.finish_reason)


class Engine:
    """Runs requests on one Generator: batches of same-settings requests, answers streamed per request."""

    def __init__(self, generator, workdir: Path, max_batch_size: int = 8, max_upload_bytes: int = MAX_UPLOAD_MB * 2**20):
        if max_batch_size < 1:
            raise DemoError(f"max batch size must be >= 1, got {max_batch_size}")
        self.generator = generator
        self.workdir = Path(workdir).resolve()
        self.max_batch_size = max_batch_size
        self.max_upload_bytes = max_upload_bytes
        v = generator.vocab
        self.end_ids = {v.eos_id, v.eot_id, v.boi_id}
        self.control_ids = control_ids(generator.tokenizer)
        self._channels: dict[str, queue.Queue] = {}
        self._pending: dict[str, Request] = {}  # submitted, not yet run (in order of submission)
        self._lock = threading.Lock()
        self.generate_calls = 0  # Generator.generate calls made (the batching test reads it)

    @property
    def resolution(self) -> int:
        if self.generator.vqgan is None:
            raise DemoError("this model folder has no vqgan/: it cannot read images")
        return self.generator.vqgan.resolution

    def decode(self, ids: list[int]) -> str:
        return self.generator.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, ids: list[int], final: bool) -> str:
        """Text ids as the page shows them (:func:`answer_text`)."""
        return answer_text(ids, self.decode, self.control_ids, final)

    # -------------------------------------------------------------------------------- files
    def folder(self, kind: str, request_id: str) -> Path:
        path = self.workdir / kind / request_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_upload(self, path: str | Path, upload_id: str, k: int) -> ShownImage:
        """Load one upload and save the model's view of it as a PNG for the page."""
        image = load_upload(path, self.workdir, self.max_upload_bytes)
        shown = self.folder("uploads", upload_id) / f"view_{k}.png"
        model_view(image, self.resolution).save(shown)
        return ShownImage(path=shown, image=image, label=display_name(path))

    @property
    def max_slices(self) -> int:
        """Slices a volume may give at most: as many as the model's context could hold, with nothing else in it."""
        self.resolution  # noqa: B018 - a model without a VQGAN says so first
        return max(1, self.generator.context_length // self.generator.prompts.n_image_tokens)

    def add_uploads(self, paths: list, upload_id: str, reading: VolumeReading) -> list[ShownImage | ShownVolume]:
        """A question's attachments (2D images, volumes, one DICOM series: :mod:`medmax.demo_uploads`), each with what
        the model sees of it saved for the page. On any failure nothing of them is kept, and DemoError says why."""
        folder = self.workdir / "uploads" / upload_id
        try:
            groups = self.upload_groups(paths, reading)
            return [self.add_upload(group[0][1], upload_id, k) if kind == "image" else
                    self._add_volume(kind, group, folder, k, reading) for k, (kind, group) in enumerate(groups)]
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def upload_groups(self, paths: list, reading: VolumeReading) -> list[tuple[str, list[tuple[str, Path]]]]:
        """The attachments, checked, as :func:`medmax.demo_uploads.group_uploads` groups them."""
        files = [(display_name(p), checked_upload(p, self.workdir, self.max_upload_bytes)) for p in paths]
        return group_uploads(files, reading.one_series)

    def _add_volume(self, kind: str, group: list, folder: Path, k: int, reading: VolumeReading) -> ShownVolume:
        if reading.slices != "all" and int(reading.slices) > self.max_slices:
            raise DemoError(f"setting volume slices: {reading.slices} slices are more than the model's context holds "
                            f"({self.max_slices} at most)")
        name = group[0][0] if kind == "volume" else f"DICOM series of {len(group)} files"
        path = group[0][1] if kind == "volume" else link_series(group, folder / f"series_{k}")
        volume = read_volume(path, name, reading, self.max_slices)
        views = slice_views(volume, name, self.resolution, folder / f"volume_{k}")
        return ShownVolume(montage([p for p, _ in views], folder / f"volume_{k}.png"), volume, views)

    def check_prompt(self, prompt: list, mode: str) -> None:
        """Before a request is opened: the prompt fits the model's context with room for the answer's first image."""
        try:
            self.generator.prompts.check([prompt], mode)
        except UserError as err:
            raise DemoError(f"the conversation: {err}") from err

    def save_drawn(self, request_id: str, out: ImageOutput, k: int) -> ShownImage:
        folder = self.folder("answers", request_id)
        png, codes_path = folder / f"image_{k}.png", folder / f"image_{k}.codes.json"
        out.image.save(png)
        grid = list(self.generator.vqgan.grid_shape)
        codes_path.write_text(json.dumps({"codes": out.codes, "grid": grid}))
        return ShownImage(path=png, codes=ImageCodes(out.codes), codes_path=codes_path)

    # -------------------------------------------------------------------------------- requests
    def submit(self, prompt: list, settings: Settings, edit: EditRegion | None = None) -> Request:
        """A new request with its channel open (before it runs, so no event is missed)."""
        request = Request(id=uuid.uuid4().hex, prompt=prompt, settings=settings, edit=edit)
        with self._lock:
            self._channels[request.id] = queue.Queue()
            self._pending[request.id] = request
        return request

    def put(self, request_id: str, event: Event) -> None:
        with self._lock:
            channel = self._channels.get(request_id)
        if channel is not None:
            channel.put(event)

    def run_pending(self) -> int:
        """Run every request submitted and not yet run, whoever submitted it; -> how many this call ran.

        The page's generation event calls this: requests reach the model through the engine's own list, never
        through the event's inputs (Gradio gives a batch function one session's state in every slot).
        """
        with self._lock:
            pending = list(self._pending.values())
        return sum(result != "" for result in self.run_batch(pending))

    def run_batch(self, requests: list[Request]) -> list[str]:
        """Run requests (several tabs' at once): one ``generate`` call per settings group; -> "done" or the error, each.

        Each request runs once: one already run (or taken by a concurrent call) is left out, with result "".
        """
        with self._lock:
            mine = [self._pending.pop(r.id, None) is not None for r in requests]
        todo = [r for r, claimed in zip(requests, mine) if claimed]
        if todo:
            logger.info("running a batch of %d request(s)", len(todo))
        results = [""] * len(todo)
        for group in group_requests(todo):
            for start in range(0, len(group), self.max_batch_size):
                chunk = group[start : start + self.max_batch_size]
                for i, result in zip(chunk, self._run_group([todo[i] for i in chunk])):
                    results[i] = result
        done = iter(results)
        return [next(done) if claimed else "" for claimed in mine]

    def _run_group(self, requests: list[Request]) -> list[str]:
        answers = [_Answer(self, r) for r in requests]
        # the page's batch limit, not this group's size: GenerationConfig.image_decoding ("auto") decides from the
        # settings, so an answer depends on its seed, not on how many tabs asked at once
        config = requests[0].settings.generation_config(batch_size=self.max_batch_size)
        try:
            self.generate_calls += 1
            outs = self.generator.generate([r.prompt for r in requests], config,
                                           seeds=[r.settings.seed for r in requests], edits=[r.edit for r in requests],
                                           on_step=lambda i, item: answers[i].step(item))
        except Exception as err:  # noqa: BLE001 - every failure goes to the page with its reason
            if len(requests) > 1:  # one bad prompt must not fail the others: run each alone
                return [self._run_group([r])[0] for r in requests]
            logger.exception("generation failed for request %s", requests[0].id)
            reason = f"generation failed: {type(err).__name__}: {err}"
            self.put(requests[0].id, Event("error", error=reason))
            return [reason]
        for answer, out in zip(answers, outs):
            self.put(answer.request.id, answer.final(out))
        return ["done"] * len(requests)

    def events(self, request_id: str, timeout: float = 600.0, merge: bool = True) -> Iterator[Event]:
        """The request's events until its "done" or "error"; ``merge``: partials waiting together give only the latest."""
        with self._lock:
            channel = self._channels.get(request_id)
        if channel is None:
            raise DemoError(f"request {request_id}: unknown or already finished")
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    event = channel.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    yield Event("error", error=f"no answer within {timeout:g} s (the server is busy); try again")
                    return
                while merge and event.kind == "partial" and not channel.empty():
                    event = channel.get_nowait()
                yield event
                if event.kind in ("done", "error"):
                    return
        finally:  # the reader is gone (answered, timed out, or its tab closed): nobody waits for this request
            with self._lock:
                self._channels.pop(request_id, None)
                self._pending.pop(request_id, None)
