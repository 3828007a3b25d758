"""Prompt styles: how a record becomes a list of generation segments.

Facts taken from MedMax's evaluation code (``evaluation/eval_utils.py``):
- ``sft``: the image, the question text, then the end-of-turn sentinel; the model answers after it.
  This is how MedMax builds its fine-tuning sequences (prompt, ``<reserved08706>``, answer).
- ``chameleon`` (the base model): an instruction line for the question type, then
  ``Question: <question>\\nAnswer:``, after the image; no end-of-turn.
- ``default``: the image, then the question text.
Visual chat puts the image after the text when MedMax's prompt ends with ``<image>``, before it otherwise,
and uses a fixed instruction for ``detailed_description`` questions. The order itself comes from
``medmax.prompting.prompt_segments``, the one layout ``medmax generate`` and the training data use too
(a placeholder in the middle of a visual-chat prompt places the image there).
"""

from __future__ import annotations

from pathlib import Path

from medmax.errors import UserError
from medmax.prompting import END_OF_TURN, prompt_segments, strip_placeholders

from .data import EvalRecord
from .tasks import Task

STYLES = ("sft", "chameleon", "default")
IMAGE_TAG = "<image>"
DETAILED_DESCRIPTION = "Analyze the image in a comprehensive and detailed manner."
CAPTION_FALLBACK = "Describe the image."

_CHAMELEON_INSTRUCTIONS = {
    "closed": "Answer the question based on this image and respond 'yes' or 'no'.",
    "probmed": "Answer the question based on this image and respond 'yes' or 'no'.",
    "open": "Answer the question based on this image.",
    "mcq": "Answer the question based on this image and respond 'A', 'B', 'C', or 'D'.",
}


def chameleon_text(question: str, kind: str) -> str:
    if not question.endswith("\n"):
        question += "\n"
    text = f"Question: {question}Answer:"
    instruction = _CHAMELEON_INSTRUCTIONS.get(kind)
    return f"{instruction}\n{text}" if instruction else text


def _content(record: EvalRecord, task: Task, image: Path | None) -> list:
    """Image and text segments, before the style's framing; the order is ``medmax.prompting``'s one layout."""
    if task.kind in ("image_generation", "mm_out"):
        return [record.prompt]
    if task.kind == "visual_chat":
        if record.question_type == "detailed_description":
            return prompt_segments(DETAILED_DESCRIPTION, [image])
        return prompt_segments(record.prompt, [image], strip=True)  # a prompt ending in <image> puts it last
    text = strip_placeholders(record.prompt).strip()  # MedMax's VQA code puts the image first, tag or not
    if task.kind == "captioning" and not text:
        text = CAPTION_FALLBACK
    return prompt_segments(text, [image])


def build_prompt(record: EvalRecord, task: Task, style: str, image: Path | None) -> list:
    """Segments for ``Generator.generate``: ``Path`` images, ``str`` text and the ``END_OF_TURN`` sentinel."""
    if style not in STYLES:
        raise UserError(f"--prompt-style: unknown style {style!r}; known: {', '.join(STYLES)}")
    segments = _content(record, task, image)
    if style == "chameleon" and task.kind in _CHAMELEON_INSTRUCTIONS:
        segments = [s if not isinstance(s, str) else chameleon_text(s, task.kind) for s in segments]
    if style == "sft":
        segments = segments + [END_OF_TURN]
    return segments
