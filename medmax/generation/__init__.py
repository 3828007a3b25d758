"""Generation from one early-fusion model: text, images, and interleaved text and images.

A prompt is a list of segments: ``str`` (text), ``PIL.Image.Image`` or ``pathlib.Path`` (an image,
tokenized with the bundle's VQGAN), :class:`ImageCodes` (raw VQGAN codes) and :data:`END_OF_TURN`.
It is encoded the way training sequences are built: ``<s>``, then each segment in order (text with
special-token parsing off, so typed ``<racm3:break>`` or ``</s>`` stay text; an image as
``boi + code ids + eoi``; the end-of-turn id).

Decoding follows Chameleon's inference code (facebookresearch/chameleon):

- text: only text tokens and end-of-sequence (begin-of-image only in interleaved mode while images
  remain); greedy or temperature / top-k / top-p; repetition penalty; stop strings; a length limit.
  End-of-sequence and end-of-turn both end the text.
- image: begin-of-image is forced, then exactly ``vqgan.n_codes_per_image`` codes, each drawn from the
  image codes only (logits are computed for those rows of the output layer only), then end-of-image.
  Classifier-free guidance runs Chameleon's three streams (full prompt; the prompt reduced to its image
  tokens; ``<s><racm3:break>``) as one batch of ``3B`` rows sharing one key-value cache; with input images
  (editing, modality translation) they are InstructPix2Pix's, with ``guidance_scale_image`` for the images and
  ``guidance_scale_text`` for the instruction (``image``). ``generate(edits=[EditRegion(...)])`` inpaints: only
  the region is drawn, every other code is the input image's (``editing``).
  By default (``decoding="sjd"``) each forward verifies a window of draft codes (speculative Jacobi
  decoding, ``jacobi``), which draws the same distribution with fewer forwards; the cache is allocated
  once per image and each row keeps its own position in it (``cache``).
- interleaved: text until the model emits begin-of-image, a full image, back to text; up to
  ``max_images`` images and ``max_new_tokens`` text tokens.

Prompts are decoded ``batch_size`` at a time, grouped by length. Within a batch they are left-padded;
the attention mask hides the padding and position ids count only real tokens, so a row's greedy
output does not depend on the batch it runs in. Each phase (a text run, an image) prefills its own
cache from the row's whole context so far.

Example::

    gen = Generator.from_dir("runs/export")
    prompt = prompt_segments("What is shown?", [Path("scan.png")], end_of_turn=True)  # image, text, end of turn
    out = gen.generate([prompt], GenerationConfig(do_sample=False))
    out[0].text

``medmax.prompting.prompt_segments`` is the one prompt layout (images first unless ``<image>``
placeholders place them), shared with evaluation and the training data.

The package follows those seams: ``prompts`` (segments, checking and encoding), ``forward`` (the
model's batched passes), ``text`` (the text loop), ``image`` (guidance streams, the image loop and
decoding), ``sampling`` (logits processing), ``state`` (a prompt's state across the phases) and ``generator`` (the
outputs, batching and the interleaving); ``config`` holds the settings; ``jacobi`` (speculative Jacobi decoding) and
``cache`` (the per-row static cache) serve ``image``; ``editing`` holds inpainting's edit regions.
"""

from .config import MODES, GenerationConfig

# The rest loads torch and the model code on first use, so that importing GenerationConfig (for a program's
# --help and argument defaults) stays light.
_LAZY = {"GenerationOutput": ".generator", "Generator": ".generator", "ImageOutput": ".generator", "TextOutput": ".generator",
         "ImageCodes": ".prompts", "Segment": ".prompts", "END_OF_TURN": "..prompting", "prompt_segments": "..prompting"}

__all__ = ["END_OF_TURN", "MODES", "GenerationConfig", "GenerationOutput", "Generator", "ImageCodes", "ImageOutput",
           "Segment", "TextOutput", "prompt_segments"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
