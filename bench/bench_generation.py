"""Generation speed: medmax.generation.Generator against transformers' `generate`, side by side.

Usage::

    .venv/bin/python bench/bench_generation.py            # preset "base" (hidden 512, 8 layers), tiny 64 px VQGAN
    .venv/bin/python bench/bench_generation.py --quick    # preset "small", fewer repeats (about a minute)

The baseline is the straightforward way to do the same work with transformers: `model.generate` on the
full prompt (begin-of-image appended), a LogitsProcessor that runs the image-only and unconditional
guidance streams as separate forward passes (each with its own key-value cache, as transformers'
UnbatchedClassifierFreeGuidanceLogitsProcessor does), combines Chameleon's three-stream guidance and
masks everything but image codes; `min_new_tokens = max_new_tokens =` the grid size. Ours runs the three
streams as one batch and computes only the image-code rows of the output layer.

Both are first checked to agree: greedy codes (temperature 0) must be identical. Figures are codes/s
(image mode, guidance on) at batch 1 and 8, and text tokens/s (greedy) at batch 8, as ratios ours /
baseline, plus achieved FLOP/s against a measured fp32 matmul peak and weight bytes/s against a
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from medmax.generation import END_OF_TURN, GenerationConfig, Generator
from medmax.presets import make_model_dir
from medmax.generation.image import guidance_streams, stream_rows
from medmax.generation.sampling import instruct_guidance, text_token_mask

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


class SeparateStreamGuidance(LogitsProcessor):
    """Baseline: the image-only and unconditional streams as two more forward passes per step."""

    def __init__(self, gen: Generator, contexts: list[list[int]], text_scale: float, image_scale: float):
        self.gen, self.text_scale, self.image_scale = gen, text_scale, image_scale
        streams = [guidance_streams(gen.vocab, c) for c in contexts]
        self.state = [self._prefill([s[k] for s in streams]) for k in (1, 2)]  # per stream: (logits, mask, cache)
        image_mask = torch.zeros(gen.vocab.size, dtype=torch.bool, device=gen.device)
        image_mask[gen.image_decoder.code_ids] = True
        self.not_image = ~image_mask

    def _prefill(self, seqs):
        ids, mask, _ = self.gen.runner.left_pad(seqs)
        cache = DynamicCache(config=self.gen.model.config)
        out = self.gen.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [out.logits[:, -1].float(), mask, cache]

    def _advance(self, state, last):
        mask = torch.cat([state[1], state[1].new_ones(state[1].shape[0], 1)], dim=1)
        out = self.gen.model(input_ids=last, attention_mask=mask, past_key_values=state[2], use_cache=True)
        state[0], state[1] = out.logits[:, -1].float(), mask

    def __call__(self, input_ids, scores):
        if getattr(self, "_started", False):
            for state in self.state:
                self._advance(state, input_ids[:, -1:])
        self._started = True
        mixed = instruct_guidance(scores.float(), self.state[0][0], self.state[1][0], self.text_scale, self.image_scale)
        return mixed.masked_fill(self.not_image, float("-inf"))


class TextOnly(LogitsProcessor):
    def __init__(self, mask):
        self.forbidden = ~mask

    def __call__(self, input_ids, scores):
        return scores.masked_fill(self.forbidden, float("-inf"))


def baseline_image(gen: Generator, prompts, cfg: GenerationConfig) -> torch.Tensor:
    contexts = gen.encode_prompts(prompts, cfg)
    n = gen.vqgan.n_codes_per_image
    ids, mask, _ = gen.runner.left_pad([c + [gen.vocab.boi_id] for c in contexts])
    guidance = SeparateStreamGuidance(gen, contexts, cfg.guidance_scale_text, cfg.guidance_scale_image)
    greedy = cfg.image_temperature == 0.0
    sampling = {} if greedy else dict(temperature=cfg.image_temperature, top_p=cfg.image_top_p, top_k=0)
    out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=not greedy, logits_processor=LogitsProcessorList([guidance]),
                             pad_token_id=gen.vocab.pad_id, eos_token_id=None, **sampling)
    return gen.vocab.ids_to_codes(out[:, -n:])  # (B, n)


def baseline_text(gen: Generator, prompts, max_new_tokens: int) -> list[list[int]]:
    contexts = gen.encode_prompts(prompts)
    ids, mask, _ = gen.runner.left_pad(contexts)
    keep = TextOnly(text_token_mask(gen.vocab, allow_boi=False, device=gen.device))
    out = gen.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([keep]), pad_token_id=gen.vocab.pad_id,
                             eos_token_id=[gen.vocab.eos_id, gen.vocab.eot_id])
    return out[:, ids.shape[1]:].tolist()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times)


def measured_peaks(device) -> tuple[float, float]:
    """(fp32 matmul FLOP/s, copy bytes/s) of this device, best of a few runs."""
    n = 1024 if torch.device(device).type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    flops = 2 * n**3 / best_time(lambda: a @ b, 10)
    src = torch.randn(64 * 2**20 // 4, device=device)  # 64 MiB
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / best_time(lambda: dst.copy_(src), 10)  # read + write
    return flops, bandwidth


@dataclass
class Cost:
    flops: float
    weight_bytes: float


def image_cost(gen: Generator, prompts, guidance: bool) -> Cost:
    """Matmul FLOPs and weight bytes our implementation spends on one image per prompt.

    Counts the rows it actually runs (distinct guidance streams) and the image rows of the head only.
    """
    model = gen.model
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    n = gen.vqgan.n_codes_per_image
    head = len(gen.image_decoder.code_ids) * model.config.hidden_size
    seqs, _, _ = stream_rows(gen.vocab, gen.encode_prompts(prompts), guidance)
    rows, prompt_tokens = len(seqs), sum(map(len, seqs))
    flops = 2 * layer_params * (prompt_tokens + rows * (n - 1)) + 2 * head * rows * n
    return Cost(flops=flops, weight_bytes=(layer_params + head) * 4 * n)


def run_image(gen, batch: int, repeats: int, peaks) -> float:
    prompts = [[PROMPTS[i % len(PROMPTS)], END_OF_TURN] for i in range(batch)]
    greedy = GenerationConfig(mode="image", image_temperature=0.0, decode_images=False)
    ours_codes = torch.tensor([o.images[0].codes for o in gen.generate(prompts, greedy)])
    same = (ours_codes == baseline_image(gen, prompts, greedy)).float().mean().item()
    cfg = GenerationConfig(mode="image", seed=0, decode_images=False)
    torch.manual_seed(0)
    t_base = best_time(lambda: baseline_image(gen, prompts, cfg), repeats)
    t_ours = best_time(lambda: gen.generate(prompts, cfg), repeats)
    codes = batch * gen.vqgan.n_codes_per_image
    cost = image_cost(gen, prompts, guidance=True)
    print(f"image  batch {batch}: ours {codes / t_ours:8.1f} codes/s  baseline {codes / t_base:8.1f} codes/s  "
          f"speedup {t_base / t_ours:4.2f}x  greedy codes identical: {same:.1%}  "
          f"ours {cost.flops / t_ours / 1e9:5.1f} GFLOP/s = {cost.flops / t_ours / peaks[0]:.0%} of matmul peak, "
          f"weights {cost.weight_bytes / t_ours / 1e9:5.1f} GB/s = {cost.weight_bytes / t_ours / peaks[1]:.0%} of copy peak")
    return t_base / t_ours


def run_text(gen, batch: int, new_tokens: int, repeats: int) -> float:
    prompts = [[PROMPTS[i % len(PROMPTS)].replace("Generate an image of", "Describe"), END_OF_TURN] for i in range(batch)]
    cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0)
    ours = [o.token_ids for o in gen.generate(prompts, cfg)]
    base = baseline_text(gen, prompts, new_tokens)
    same = sum(b[: len(o)] == o for o, b in zip(ours, base)) / batch
    n_ours, n_base = sum(map(len, ours)), sum(len([t for t in b if t != gen.vocab.pad_id]) for b in base)
    t_base = best_time(lambda: baseline_text(gen, prompts, new_tokens), repeats)
    t_ours = best_time(lambda: gen.generate(prompts, cfg), repeats)
    print(f"text   batch {batch}: ours {n_ours / t_ours:8.1f} tok/s    baseline {n_base / t_base:8.1f} tok/s    "
          f"speedup {(n_ours / t_ours) / (n_base / t_base):4.2f}x  greedy tokens identical: {same:.0%} of rows")
    return (n_ours / t_ours) / (n_base / t_base)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="preset small, 1 repeat")
    parser.add_argument("--preset", default=None, help="model preset (default: base, or small with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu (measured here) or cuda (not run in this project yet)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the 2 cores are shared)")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    preset = args.preset or ("small" if args.quick else "base")
    repeats = 1 if args.quick else 3
    with tempfile.TemporaryDirectory() as folder:
        gen = Generator.from_dir(make_model_dir(folder, preset, "tiny", seed=0), device=args.device)
    peaks = measured_peaks(args.device)
    params = sum(p.numel() for p in gen.model.model.layers.parameters()) / 1e6
    print(f"preset {preset} ({params:.1f}M layer params), tiny VQGAN ({gen.vqgan.n_codes_per_image} codes/image), "
          f"{args.device}, {args.threads} threads; measured peaks: {peaks[0] / 1e9:.1f} GFLOP/s fp32 matmul, {peaks[1] / 1e9:.1f} GB/s copy")
    with torch.inference_mode():
        for batch in (1, 8):
            run_image(gen, batch, repeats, peaks)
        run_text(gen, 8, 32, repeats)


if __name__ == "__main__":
    main()
