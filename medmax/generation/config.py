"""How to decode (:class:`GenerationConfig`): torch-free, so a program's ``--help`` can take its defaults from it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

MODES = ("text", "image", "interleaved")
DECODINGS = ("auto", "sjd", "plain")
# "auto" uses SJD while a forward's tokens (batch_size x 3 streams x sjd_window at most) stay under what the device
# computes in the time it reads the weights; above that, SJD's wider forwards cost more than its fewer forwards save
# (BENCHMARKS.md, docs/image_generation_latency.md). On a CPU a forward costs in proportion to its tokens, so SJD
# pays only where most drafts are accepted: 1.35-1.86x on random-weight models at batch 1, but 0.76x on the trained
# quickstart model (5 % of drafts accepted; its distributions are peaked), and a loss at batch 8 either way. So
# "auto" is plain on a CPU, and SJD on a GPU, where a window of a few dozen tokens costs about one forward.
SJD_TOKEN_BUDGET = {"cpu": 0, "cuda": 256}


@dataclass
class GenerationConfig:
    """How to decode. Defaults are Chameleon's inference defaults."""

    mode: str = "text"  # "text", "image" or "interleaved"
    max_new_tokens: int = 256  # text tokens (image codes are not counted)
    do_sample: bool = True  # text: sample (True) or greedy (False)
    temperature: float = 1.0  # text
    top_p: float = 0.9  # text; in [0, 1]: 1 = off, 0 = the top token only (greedy)
    top_k: int = 0  # text; 0 = off
    repetition_penalty: float = 1.2  # text; 1.0 = off
    stop_strings: tuple[str, ...] = ()  # text ends at (and is cut before) the first one it contains
    max_images: int = 1  # interleaved: images the model may draw
    image_temperature: float = 0.7  # 0 = greedy codes
    image_top_p: float = 0.9  # in [0, 1], as top_p
    image_top_k: int = 0
    guidance: bool = True  # image: three-stream classifier-free guidance
    guidance_scale_text: float = 3.0  # s_txt: pull of the text (the instruction) beyond the input images
    guidance_scale_image: float = 1.2  # s_img: pull of the input images (editing); no effect without them
    decoding: str = "auto"  # image codes: "sjd" (speculative Jacobi decoding: same distribution, fewer forwards),
    # "plain" (one code per forward) or "auto" (sjd where it pays: see image_decoding)
    sjd_window: int = 8  # sjd: tokens per forward (the last code and window - 1 drafts); the reference uses 16 on GPUs,
    # 8 measured faster on CPU (a wider window costs compute there; BENCHMARKS.md, README "Image decoding")
    image_layout: str = "fixed"  # "fixed" (Chameleon's square block) or "shaped" (size tokens and end-of-lines: the layout
    # a model trained on build_sequences --image-layout shaped knows; medmax.image_layout)
    image_size: tuple[int, int] | None = None  # shaped: (H, W) pixels to draw (implies "shaped"); None: the model picks
    seed: int | None = None  # None: a fresh random seed
    decode_images: bool = True  # False: return codes only (no VQGAN decoder work)
    batch_size: int = 16  # prompts decoded together (sorted by length to limit padding)

    def image_decoding(self, device_type: str) -> str:
        """"sjd" or "plain" for this config on a device type; "auto" decides from the settings alone (not the
        prompts in a batch), so an image still depends only on its seed and the settings."""
        if self.decoding != "auto":
            return self.decoding
        tokens = self.batch_size * (3 if self.guidance else 1) * self.sjd_window
        return "sjd" if tokens <= SJD_TOKEN_BUDGET.get(device_type, SJD_TOKEN_BUDGET["cpu"]) else "plain"

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"GenerationConfig.mode: unknown mode {self.mode!r}; choose one of {MODES}")
        if self.decoding not in DECODINGS:
            raise UserError(f"GenerationConfig.decoding: unknown decoding {self.decoding!r}; choose one of {DECODINGS}")
        if self.sjd_window < 1:
            raise UserError(f"GenerationConfig.sjd_window must be >= 1, got {self.sjd_window}")
        if self.max_new_tokens < 1 and self.mode != "image":
            raise UserError(f"GenerationConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("temperature", "image_temperature", "top_p", "image_top_p"):
            if getattr(self, name) < 0:
                raise UserError(f"GenerationConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("top_p", "image_top_p"):
            if getattr(self, name) > 1:
                raise UserError(f"GenerationConfig.{name} must lie in [0, 1] (0 = greedy, 1 = off), got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise UserError(f"GenerationConfig.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.batch_size < 1:
            raise UserError(f"GenerationConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_images < 0:
            raise UserError(f"GenerationConfig.max_images must be >= 0, got {self.max_images}")
        if self.image_size is not None:
            size = tuple(self.image_size)
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise UserError(f"GenerationConfig.image_size must be (H, W) positive pixel counts, got {self.image_size!r}")
            self.image_size, self.image_layout = size, "shaped"
        if self.image_layout not in ("fixed", "shaped"):
            raise UserError(f"GenerationConfig.image_layout: unknown layout {self.image_layout!r}; choose fixed or shaped")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)
