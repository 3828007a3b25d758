"""CLIP similarity for captioning and image generation, from a local Hugging Face CLIP folder or an open_clip one.

An open_clip folder (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, BiomedCLIP's layout, MedMax's
image-generation metric) is read by medmax/open_clip_layout.py, without open_clip (see there why).
A Hugging Face folder holds ``config.json`` + weights (``CLIPModel``), a tokenizer, and optionally
``preprocessor_config.json``. Images are preprocessed here with PIL (shorter side to the model's
size with bicubic resampling, centre crop, the processor's mean/std) rather than through transformers'
image processors, which may need torchvision. Nothing is downloaded: ``local_files_only`` throughout.
The score is the cosine similarity of the two embeddings (in [-1, 1]).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from .image_metrics import processor_size, resize_crop_normalize

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    def __init__(self, model, tokenizer, image_size: int, crop_size: int, mean, std, device="cpu",
                 max_text_len: int | None = None, clean_text: bool = False):
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        self.image_size, self.crop_size = image_size, crop_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_text_len = max_text_len or int(model.config.text_config.max_position_embeddings)
        self.clean_text = clean_text  # open_clip's HFTokenizer collapses whitespace before tokenizing

    @classmethod
    def from_dir(cls, folder: str | Path, device="cpu") -> "ClipScorer":
        """A Hugging Face CLIPModel folder, or an open_clip folder (BiomedCLIP's layout)."""
        from transformers import AutoTokenizer, CLIPModel

        from .open_clip_layout import is_open_clip_dir, load_open_clip_dir

        folder = Path(folder)
        if is_open_clip_dir(folder):
            model, tokenizer, size, mean, std, context = load_open_clip_dir(folder)
            return cls(model, tokenizer, size, size, mean or OPENAI_CLIP_MEAN, std or OPENAI_CLIP_STD, device,
                       max_text_len=context, clean_text=True)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--clip-model {folder}: neither a Hugging Face CLIP folder (config.json) nor an "
                                    "open_clip one (open_clip_config.json)")
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        pre = json.loads((folder / "preprocessor_config.json").read_text()) if (folder / "preprocessor_config.json").is_file() else {}
        native = int(model.config.vision_config.image_size)
        return cls(model, tokenizer, processor_size(pre.get("size"), native), processor_size(pre.get("crop_size"), native),
                   pre.get("image_mean", OPENAI_CLIP_MEAN), pre.get("image_std", OPENAI_CLIP_STD), device)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """(3, crop, crop) float tensor, normalised."""
        return resize_crop_normalize(image, self.image_size, self.crop_size, self.mean, self.std)

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:  # (N, D), unit norm
        batch = torch.stack([self.pixels(im) for im in images]).to(self.device)
        feats = self._features(self.model.get_image_features(pixel_values=batch))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:  # (N, D), unit norm
        if self.clean_text:
            texts = [" ".join(t.split()) for t in texts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        feats = self._features(self.model.get_text_features(**enc))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def image_text(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        return (self.image_embeds(images) * self.text_embeds(texts)).sum(-1).tolist()

    def image_image(self, a: list[Image.Image], b: list[Image.Image]) -> list[float]:
        return (self.image_embeds(a) * self.image_embeds(b)).sum(-1).tolist()
