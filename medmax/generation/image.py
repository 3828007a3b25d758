"""The guided image loop and decoding, after Chameleon's inference.

Begin-of-image is forced, then exactly ``vqgan.n_codes_per_image`` codes, each drawn from the image
codes only (logits are computed for those rows of the output layer only), then end-of-image. In the shaped
layout (``medmax.generation.shaped``) the height and width tokens follow begin-of-image and the loop draws
``h`` rows of ``w`` codes, each closed by end-of-line.
Classifier-free guidance runs Chameleon's three streams (full prompt; the prompt reduced to its image
tokens; ``<s><racm3:break>``) as one batch sharing one key-value cache; a stream two rows share is
computed once.

For image-conditioned generation (editing, modality translation: input images, an instruction, then an
image) these are InstructPix2Pix's streams (Brooks et al. 2023), as Lumina-mGPT runs them:

- **full** ``c_TI``: ``<s>``, every input image, the instruction, the end-of-turn, ``<racm3:break>``;
- **image-only** ``c_I``: ``<s>``, the input images' blocks alone (no instruction, no end-of-turn), ``<racm3:break>``;
- **unconditional** ``c_0``: ``<s><racm3:break>``;

guided = uncond + s_img (image_only - uncond) + s_txt (full - image_only)
(:func:`~medmax.generation.sampling.instruct_guidance`; ``guidance_scale_image`` = s_img, how strongly the
result follows the input images, ``guidance_scale_text`` = s_txt, how strongly it follows the instruction).
A text-only prompt's image-only stream is its unconditional one, so s_img has no effect there. The guided
distribution is what plain decoding samples and what SJD verifies (``jacobi``); inpainting
(``editing``) turns the guided logits of every place outside the edit region into a point mass on the input's code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..vqgan import to_uint8
from .forward import ModelRunner
from .jacobi import Drafts, speculative_accept, verify, verify_greedy
from .sampling import instruct_guidance, processed_probs, sample
from .shaped import GridLayout

if TYPE_CHECKING:
    from .config import GenerationConfig


def guidance_streams(vocab, context: list[int], after_boi: tuple[int, ...] = ()) -> list[list[int]]:
    """The three streams for one row: full prompt, prompt reduced to its image blocks (the input images without
    the instruction), unconditional; each ends with begin-of-image and ``after_boi`` (the shaped layout's size
    tokens) (module docstring)."""
    v = vocab
    image_only, inside = [v.bos_id], False
    for tok in context:
        if tok == v.boi_id:
            inside = True
        if inside:
            image_only.append(tok)
        if tok == v.eoi_id:
            inside = False
    tail = [v.boi_id, *after_boi]
    return [context + tail, image_only + tail, [v.bos_id, *tail]]


def stream_rows(vocab, contexts: list[list[int]], guidance: bool, device=None, after_boi: tuple[int, ...] = ()):
    """The rows to run for a batch of contexts, without duplicates.

    -> seqs (R token lists), owner (R,) the prompt each row belongs to, index (S*B,) the row that
    computes each (stream, prompt) pair, stream-major. A prompt without images has an image-only
    stream identical to its unconditional one (``<s><racm3:break>`` and the same codes after it),
    so that stream is computed once: text-to-image guidance runs 2B rows, not 3B.
    """
    streams = [guidance_streams(vocab, c, after_boi) for c in contexts]  # B x 3
    B = len(streams)
    seqs, owner, index = [st[0] for st in streams], list(range(B)), list(range(B))
    if not guidance:
        return seqs, torch.tensor(owner, device=device), torch.tensor(index, device=device)
    with_images = [b for b in range(B) if streams[b][1] != streams[b][2]]
    image_row = {b: B + k for k, b in enumerate(with_images)}
    seqs += [streams[b][1] for b in with_images]
    first_uncond = len(seqs)
    seqs += [st[2] for st in streams]
    owner += with_images + list(range(B))
    index += [image_row.get(b, first_uncond + b) for b in range(B)] + [first_uncond + b for b in range(B)]
    return seqs, torch.tensor(owner, device=device), torch.tensor(index, device=device)


class _Forcing:
    """Places of the grid whose code is set, not drawn (inpainting): their guided logits become a point mass.

    ``forced`` (B, n) code indices or -1 (drawn); held padded with -1 to ``width`` (the grid and a window).
    """

    def __init__(self, forced: torch.Tensor | None, width: int, n_rows: int, device):
        self.forced = None
        if forced is not None:
            self.forced = torch.full((n_rows, width), -1, dtype=torch.long, device=device)
            self.forced[:, : forced.shape[1]] = forced.to(device)

    def __call__(self, logits: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        """(B, W, n) guided logits of places ``done .. done + W - 1`` -> with each forced place a point mass."""
        if self.forced is None:
            return logits
        at = self.forced.gather(1, (done[:, None] + torch.arange(logits.shape[1], device=done.device)).clamp(
            max=self.forced.shape[1] - 1))  # (B, W)
        point = torch.full_like(logits, float("-inf")).scatter(-1, at.clamp(min=0)[..., None], 0.0)
        return torch.where((at >= 0)[..., None], point, logits)

    def drafts(self, drafts: Drafts | None, done: torch.Tensor) -> Drafts | None:
        """The next window's drafts (places ``done ..``) set to the forced codes where there are some (accepted
        for sure: a draft independent of the verification's random numbers keeps SJD exact)."""
        if self.forced is None or drafts is None:
            return drafts
        K = drafts.codes.shape[1]
        at = self.forced.gather(1, (done[:, None] + torch.arange(K, device=done.device)).clamp(max=self.forced.shape[1] - 1))
        known = at >= 0  # (B, K)
        drafts.codes = torch.where(known, at, drafts.codes)
        one_hot = torch.nn.functional.one_hot(at.clamp(min=0), drafts.n_codes).to(drafts.q.dtype)
        drafts.q = torch.where(known[..., None], one_hot, drafts.q)
        return drafts


class ImageDecoder:
    """Draws images as VQGAN codes (``draw``) and turns codes into pictures (``decode``).

    ``accept`` is speculative Jacobi decoding's acceptance rule (``jacobi.speculative_accept``); a test
    swaps in a wrong one to show the distribution test can fail.
    """

    accept = staticmethod(speculative_accept)

    def __init__(self, runner: ModelRunner, vocab, vqgan):
        self.runner = runner
        self.vocab = vocab
        self.vqgan = vqgan
        n_codes = vocab.n_codes if vqgan is None else min(vocab.n_codes, vqgan.n_embed)
        self.code_ids = vocab.image_id_tensor(runner.device)[:n_codes]  # (n,) ids the image sampler may draw
        self.stats: dict = {}  # the last draw's forwards, drafts proposed and accepted (see draw)

    @torch.no_grad()
    def draw(self, contexts: list[list[int]], config: GenerationConfig, rng, n_steps: int | None = None,
             forced: torch.Tensor | None = None, layout: GridLayout | None = None) -> torch.Tensor:
        """Draw one full grid of codes per context (boi is forced after it); -> (B, n_steps) codes.

        ``n_steps``: codes to draw (default: a whole grid, ``vqgan.n_codes_per_image``). With SJD
        (``config.image_decoding``) each forward verifies a window of drafts (``medmax.generation.jacobi``);
        plain decoding is the same loop with a window of one. ``self.stats`` counts forwards and drafts.
        ``forced`` (B, n_steps): a code index where that place is not drawn but set (inpainting,
        ``medmax.generation.editing``), -1 where it is drawn.
        ``layout``: the shaped layout's grid (its size tokens follow boi; -> (B, h * w) codes, end-of-lines enforced).
        """
        run, B = self.runner, len(contexts)
        ids = self.code_ids if layout is None else layout.column_ids(self.code_ids)  # (n,) ids the loop may emit
        n_steps = layout.n_steps if layout is not None else n_steps or self.vqgan.n_codes_per_image
        window = min(config.sjd_window if config.image_decoding(run.device.type) == "sjd" else 1, n_steps)
        force = _Forcing(forced, n_steps + window, B, run.device)
        after_boi = tuple(layout.prefix()) if layout is not None else ()
        seqs, owner, index = stream_rows(self.vocab, contexts, config.guidance, run.device, after_boi)  # R rows; (R,), (3B,)
        hidden, cache = run.prefill_rows(seqs, extra=n_steps + window)  # (R, 1, C)
        head = run.output_rows(ids)
        done = torch.zeros(B, dtype=torch.long, device=run.device)
        _, code = self._pick(force(self._guided(hidden, head, index, config, layout, done), done), None, config, rng)  # (B,)
        codes = torch.zeros(B, n_steps + window, dtype=torch.long, device=run.device)
        codes[:, 0] = code
        done = done + 1
        drafts = Drafts(B, window, len(ids), rng, run.device) if window > 1 else None
        self._force(layout, force, drafts, done)
        self.stats = {"forwards": 1, "drafts": 0, "accepted": 0, "codes": B * n_steps, "window": window}
        while int(done.min()) < n_steps:
            old = torch.cat([code[:, None], drafts.codes], dim=1) if drafts else code[:, None]  # (B, W)
            hidden = run.forward_window(ids[old[owner]], cache)  # (R, W, C)
            accepted, code = self._pick(force(self._guided(hidden, head, index, config, layout, done), done), drafts, config, rng)
            self._count(accepted, done < n_steps, window)
            kept = torch.minimum(accepted + 1, n_steps - done)  # (B,) codes committed (0 for finished rows)
            new = old.roll(-1, dims=1).scatter(1, accepted[:, None], code[:, None])  # (B, W): drafts, then the new code
            slots = done[:, None] + torch.arange(window, device=run.device)
            keep = torch.arange(window, device=run.device) < kept[:, None]
            codes.scatter_(1, slots, torch.where(keep, new, codes.gather(1, slots)))
            cache.advance(kept[owner])
            done = done + kept
            self._force(layout, force, drafts, done)
        return codes[:, :n_steps] if layout is None else layout.grid_codes(codes[:, :n_steps])

    @torch.no_grad()
    def choose_grids(self, contexts: list[list[int]], config: GenerationConfig, rng, tokens) -> list[tuple[int, int]]:
        """The model picks each row's shaped grid: a height token, then a width token, on the guided streams."""
        run = self.runner
        sides = torch.as_tensor(tokens.size_ids[1:], device=run.device)  # (S,) the ids of sides 1..S
        seqs, owner, index = stream_rows(self.vocab, contexts, config.guidance, run.device)
        hidden, cache = run.prefill_rows(seqs, extra=1)
        head = run.output_rows(sides)
        picked = []
        for step in range(2):
            if step:
                hidden = run.forward_window(sides[picked[-1][owner]][:, None], cache)
                cache.advance(torch.ones_like(owner))
            greedy = config.image_temperature == 0.0
            logits = self._guided(hidden, head, index, config)[:, -1]  # (B, S)
            picked.append(sample(logits, not greedy, config.image_temperature, config.image_top_p, config.image_top_k, rng))
        return [(int(h) + 1, int(w) + 1) for h, w in zip(*picked)]

    @staticmethod
    def _force(layout, force: _Forcing, drafts, done: torch.Tensor) -> None:
        """Set the next window's drafts where they are known: inpainting's forced codes, the layout's end-of-lines."""
        force.drafts(drafts, done)
        if layout is not None and drafts is not None:
            layout.force_drafts(drafts, done)

    def _guided(self, hidden: torch.Tensor, head, index: torch.Tensor, config: GenerationConfig,
                layout: GridLayout | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
        """(R, W, C) stream rows' hidden states -> (B, W, n) logits of the image codes, guided (and, with a
        ``layout``, masked to what its steps ``first`` (B,) onwards allow)."""
        logits = self.runner.logits(hidden, head, self.code_ids)[index]  # (S*B, W, n), stream-major
        if config.guidance:
            full, image_only, uncond = logits.chunk(3)
            logits = instruct_guidance(full, image_only, uncond, config.guidance_scale_text, config.guidance_scale_image)
        return logits if layout is None else layout.mask(logits, first)

    def _pick(self, logits: torch.Tensor, drafts, config: GenerationConfig, rng):
        """(B, W, n) guided logits -> (accepted drafts (B,), next code (B,)); refills ``drafts``."""
        if drafts is None:  # no drafts: the last position's code, as plain decoding draws it
            greedy = config.image_temperature == 0.0
            code = sample(logits[:, -1], not greedy, config.image_temperature, config.image_top_p, config.image_top_k, rng)
            return code.new_zeros(code.shape), code
        if config.image_temperature == 0.0:
            return verify_greedy(logits, drafts)
        B, W, n = logits.shape
        probs = processed_probs(logits.reshape(B * W, n), config.image_temperature, config.image_top_p,
                                config.image_top_k).view(B, W, n)
        return verify(probs, drafts, rng, self.accept)

    def _count(self, accepted: torch.Tensor, active: torch.Tensor, window: int) -> None:
        self.stats["forwards"] += 1
        self.stats["drafts"] += int(active.sum()) * (window - 1)
        self.stats["accepted"] += int(accepted[active].sum())

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> list[Image.Image]:
        """(B, h * w) codes -> B images of the grid's shape (default: the VQGAN's square)."""
        pixels = self.vqgan.decode_codes(codes.to(self.vqgan.quantize.embedding.weight.device), grid)  # (B, 3, H, W)
        return [Image.fromarray(a.numpy()) for a in to_uint8(pixels)]

    def token_ids(self, codes: torch.Tensor, layout: GridLayout | None = None) -> list[int]:
        """One image's sequence: boi, the code ids, eoi (the shaped layout's block with a ``layout``)."""
        v = self.vocab
        ids = self.code_ids[codes.to(self.runner.device)]
        if layout is None:
            return [v.boi_id, *ids.tolist(), v.eoi_id]
        return layout.tokens.block(v, ids.view(layout.h, layout.w).cpu().numpy()).tolist()
