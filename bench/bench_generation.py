"""Generation speed: medmax.generation.Generator against transformers' `generate`, side by side.

Usage::

    python bench/bench_generation.py            # preset "base" (hidden 512, 8 layers), tiny 64 px VQGAN
    python bench/bench_generation.py --quick    # preset "small"

The baseline is the straightforward way to do the same work with transformers: ``model.generate`` on the
full prompt (begin-of-image appended) with a LogitsProcessor that runs the other guidance streams as
separate forward passes, each with its own key-value cache (as transformers'
UnbatchedClassifierFreeGuidanceLogitsProcessor does), combines Chameleon's three-stream guidance
(text 3.0, image 1.2) and masks everything but image codes. It runs **only the streams it needs**, as
ours does: for a prompt without images the image-only stream (``<s><racm3:break>``) is the unconditional
one, so it runs one extra stream, not two; an image in the prompt makes it three streams in both.
Ours runs the distinct streams as one batch with one cache and computes only the output-layer rows a
step may emit. Text is greedy ``generate`` with a mask to text tokens (stopping at end-of-sequence or
end-of-turn); interleaved mode is text until begin-of-image, one guided image, then text, composed
from the same two baseline pieces.

Cases: image generation from a text prompt (2 streams) and from an image + text prompt (3 streams,
the image given as 64 codes), at batch 1 and 8; interleaved (image + text prompt, batch 4); text
answers (image + text prompt, batch 8, 32 tokens). Image figures are codes/s with Chameleon's sampling
defaults (temperature 0.7, top-p 0.9), text and interleaved figures tokens/s, greedy. Parity: image
cases run a greedy pass first whose codes must be identical; text and interleaved outputs must be
identical in every timed round. To make a random model draw in interleaved mode, the output layer
gets a bias that makes begin-of-image its first choice (the same model for both sides).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList  # noqa: E402

from harness import Benchmark, command_line, Case, Result, Target, Variant, add_arguments, run_benchmark, size_label  # noqa: E402

from medmax.generation import END_OF_TURN, GenerationConfig, Generator, ImageCodes  # noqa: E402
from medmax.presets import make_model_dir  # noqa: E402
from medmax.generation.sampling import instruct_guidance, text_token_mask  # noqa: E402

PROMPTS = [
    "Generate an image of a chest radiograph with a small nodule in the right lung.",
    "Generate an image of a brain MRI.",
    "Generate an image of a liver CT with a bright round lesion in the upper left.",
    "Generate an image of a kidney ultrasound.",
    "Generate an image of a histology slide.",
    "Generate an image of a lung CT, lower right lesion, large size.",
    "Generate an image of a pathology microscopy slide.",
    "Generate an image of a normal chest X-ray.",
]


# ------------------------------------------------------------------------------------------ the baseline
def left_pad(seqs: list[list[int]], pad_id: int, device):
    """-> ids, mask, positions (B, T); padding on the left, positions counting real tokens only."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)


def image_only(context: list[int], vocab) -> list[int]:
    """The prompt reduced to its images: <s> then every boi .. eoi block."""
    out, inside = [vocab.bos_id], False
    for tok in context:
        inside = inside or tok == vocab.boi_id
        if inside:
            out.append(tok)
        if tok == vocab.eoi_id:
            inside = False
    return out


class Stream:
    """One extra guidance stream with its own cache, advanced one token per step."""

    def __init__(self, model, seqs: list[list[int]], pad_id: int, device):
        self.model = model
        ids, self.mask, positions = left_pad(seqs, pad_id, device)
        self.cache = DynamicCache(config=model.config)
        self.position = positions[:, -1:]
        self.logits = self._forward(ids, positions)

    def _forward(self, ids, positions):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def advance(self, last: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.position = self.position + 1
        self.logits = self._forward(last, self.position)


class SeparateStreamGuidance(LogitsProcessor):
    """Guidance with the image-only and unconditional streams as separate forward passes (only those needed)."""

    def __init__(self, gen: Generator, contexts: list[list[int]], code_ids: torch.Tensor, cfg: GenerationConfig):
        v, model = gen.vocab, gen.model
        self.cfg, self.started = cfg, False
        uncond = [[v.bos_id, v.boi_id]] * len(contexts)
        images = [image_only(c, v) + [v.boi_id] for c in contexts]
        self.uncond = Stream(model, uncond, v.pad_id, gen.device)
        self.image = None if images == uncond else Stream(model, images, v.pad_id, gen.device)
        self.not_image = torch.ones(v.size, dtype=torch.bool, device=gen.device)
        self.not_image[code_ids] = False

    def __call__(self, input_ids, scores):
        streams = [self.uncond] if self.image is None else [self.uncond, self.image]
        if self.started:
            for s in streams:
                s.advance(input_ids[:, -1:])
        self.started = True
        image_logits = (self.image or self.uncond).logits
        mixed = instruct_guidance(scores.float(), image_logits, self.uncond.logits,
                                  self.cfg.guidance_scale_text, self.cfg.guidance_scale_image)
        return mixed.masked_fill(self.not_image, float("-inf"))


class Forbid(LogitsProcessor):
    def __init__(self, allowed: torch.Tensor):
        self.forbidden = ~allowed

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.forbidden, float("-inf"))


def code_ids(gen: Generator) -> torch.Tensor:
    n = min(gen.vocab.n_codes, gen.vqgan.n_embed)
    return gen.vocab.image_id_tensor(gen.device)[:n]


def baseline_image(gen: Generator, contexts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    v, n = gen.vocab, gen.vqgan.n_codes_per_image
    ids, mask, _ = left_pad([c + [v.boi_id] for c in contexts], v.pad_id, gen.device)
    guidance = SeparateStreamGuidance(gen, contexts, code_ids(gen), cfg)
    greedy = cfg.image_temperature == 0.0
    sampling = {} if greedy else dict(temperature=cfg.image_temperature, top_p=cfg.image_top_p, top_k=0)
    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=not greedy, logits_processor=LogitsProcessorList([guidance]),
                             pad_token_id=v.pad_id, eos_token_id=None, **sampling)
    return gen.vocab.ids_to_codes(out[:, -n:]).tolist()


def baseline_text(gen: Generator, contexts: list[list[int]], max_new_tokens: int, allow_boi: bool) -> list[list[int]]:
    """Greedy text per context; ends at eos / end-of-turn (and at begin-of-image when allowed); pads stripped."""
    v = gen.vocab
    ids, mask, _ = left_pad(contexts, v.pad_id, gen.device)
    allowed = text_token_mask(v, allow_boi=allow_boi, device=gen.device)
    stops = [v.eos_id, v.eot_id] + ([v.boi_id] if allow_boi else [])
    out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([Forbid(allowed)]), pad_token_id=v.pad_id,
                             eos_token_id=stops)
    return [[t for t in row if t != v.pad_id] for row in out[:, ids.shape[1]:].tolist()]


def baseline_interleaved(gen: Generator, contexts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    """Text until begin-of-image, one guided image, then text with the rest of the budget (max_images = 1)."""
    v = gen.vocab
    first = baseline_text(gen, contexts, cfg.max_new_tokens, allow_boi=True)
    generated = [t[:-1] if t and t[-1] == v.boi_id else t for t in first]
    drawing = [i for i, t in enumerate(first) if t and t[-1] == v.boi_id]
    if drawing:
        budget = {i: cfg.max_new_tokens - (len(first[i]) - 1) for i in drawing}  # text tokens before the boi
        codes = baseline_image(gen, [contexts[i] + generated[i] for i in drawing], cfg)
        for i, c in zip(drawing, codes):
            generated[i] += [v.boi_id, *v.codes_to_ids(c).tolist(), v.eoi_id]
        for left in sorted({b for b in budget.values() if b > 0}):  # rows with the same budget as one batch
            rows = [i for i in drawing if budget[i] == left]
            for i, more in zip(rows, baseline_text(gen, [contexts[i] + generated[i] for i in rows], left, allow_boi=False)):
                generated[i] += more
    return generated


# ------------------------------------------------------------------------------------------ the cases
def prompts(batch: int, with_image: bool, n_codes: int, text=None) -> list[list]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):
        words = PROMPTS[i % len(PROMPTS)] if text is None else text(PROMPTS[i % len(PROMPTS)])
        image = [ImageCodes(tuple(rng.integers(0, 512, n_codes).tolist()))] if with_image else []
        out.append([*image, words, END_OF_TURN])
    return out


def image_case(gen: Generator, batch: int, with_image: bool) -> Case:
    ps = prompts(batch, with_image, gen.vqgan.n_codes_per_image)
    sampled = GenerationConfig(mode="image", seed=0, decode_images=False, batch_size=batch)
    greedy = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False, batch_size=batch)
    codes = batch * gen.vqgan.n_codes_per_image

    def ours(cfg):
        return [o.images[0].codes for o in gen.generate(ps, cfg)]

    def base(cfg):
        return baseline_image(gen, gen.encode_prompts(ps, cfg), cfg)

    streams = 3 if with_image else 2
    return Case(f"image, {'image + text' if with_image else 'text'} prompt ({streams} streams), batch {batch}", unit="codes",
                parity=lambda: {"transformers generate + guidance processor": base(greedy), "ours": ours(greedy)},
                variants=[Variant("transformers generate + guidance processor", lambda: Result({"codes": codes}, base(sampled))),
                          Variant("ours", lambda: Result({"codes": codes}, ours(sampled)))])


def text_case(gen: Generator, batch: int, new_tokens: int) -> Case:
    ps = prompts(batch, True, gen.vqgan.n_codes_per_image, text=lambda p: p.replace("Generate an image of", "Describe"))
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0, batch_size=batch)

    def ours():
        ids = [o.token_ids for o in gen.generate(ps, cfg)]
        return Result({"tokens": sum(map(len, ids))}, ids)

    def base():
        ids = baseline_text(gen, gen.encode_prompts(ps), new_tokens, allow_boi=False)
        return Result({"tokens": sum(map(len, ids))}, ids)

    return Case(f"text, image + text prompt, batch {batch}, {new_tokens} tokens", unit="tokens",
                variants=[Variant("transformers generate", base), Variant("ours", ours)])


def interleaved_case(gen: Generator, batch: int, new_tokens: int) -> Case:
    ps = prompts(batch, True, gen.vqgan.n_codes_per_image)
    cfg = GenerationConfig(mode="interleaved", max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                           image_temperature=0.0, max_images=1, decode_images=False, batch_size=batch)

    def ours():
        ids = [o.token_ids for o in gen.generate(ps, cfg)]
        if not all(gen.vocab.boi_id in row for row in ids):
            raise RuntimeError("interleaved case: a row drew no image, so this is not the interleaved path")
        return Result({"tokens": sum(map(len, ids))}, ids)

    def base():
        ids = baseline_interleaved(gen, gen.encode_prompts(ps, cfg), cfg)
        return Result({"tokens": sum(map(len, ids))}, ids)

    return Case(f"interleaved (text, image, text), image + text prompt, batch {batch}", unit="tokens",
                variants=[Variant("transformers generate, text / image / text", base), Variant("ours", ours)])


def interleaving_generator(path: Path, device) -> Generator:
    """The same weights, with an output bias that makes begin-of-image the first choice of text decoding."""
    gen = Generator.from_dir(path, device=device)
    head = gen.model.lm_head
    bias = torch.zeros(head.out_features, device=head.weight.device)
    bias[gen.vocab.boi_id] = 1e4
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    return gen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="preset small")
    parser.add_argument("--preset", default=None, help="model preset (default: base, or small with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu (measured here) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the 2 cores are shared)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("small" if args.quick else "base")
    bench = Benchmark(
        name="generation", title="Generation: ours vs transformers generate", size=size_label(args.quick, args.preset),
        description=__doc__.split("\n\n", 2)[2].strip(),
        settings={"preset": preset, "vqgan": "tiny (64 codes per image, 512-code book)", "device": args.device,
                  "threads": args.threads},
        command=command_line(argv))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        path = make_model_dir(folder, preset, "tiny", seed=0)
        gen = Generator.from_dir(path, device=args.device)
        cases = [image_case(gen, 1, False), image_case(gen, 8, False), image_case(gen, 1, True), image_case(gen, 8, True),
                 interleaved_case(interleaving_generator(path, args.device), 4, 16), text_case(gen, 8, 32)]
        targets = [Target(cases[1].name, "ours", "ratio", ">=", 1.5, "image generation with guidance, batch 8 >= 1.5x")]
        return run_benchmark(bench, cases, targets, args)


if __name__ == "__main__":
    raise SystemExit(main())
