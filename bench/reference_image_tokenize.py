"""The reference for whole-process image tokenization: MedMax's ``src/image_tokenization.py`` pipeline, on CPU.

Usage (bench/bench_startup.py runs it)::

    python bench/reference_image_tokenize.py --input images.csv --output OUT --ckpt FOLDER [--bs 1]

What MedMax's script (github.com/Hritikbansal/medmax, ``src/image_tokenization.py``) does, written for
this benchmark, not copied: the imports of that script and of the ``TokenManager`` it builds (torch,
torch.distributed, accelerate, pandas, transformers' logits processors, tokenizers, yaml); a CSV read with
pandas; a ``DataLoader`` with its default of no worker processes, so images are decoded and
preprocessed in the main process (transparency whitened, LANCZOS resize of the short side to 512,
centre crop, scaled to [-1, 1]); the whole VQGAN (encoder and decoder) built from ``vqgan.yaml`` and
loaded from ``vqgan.ckpt``; ``encoder -> quant_conv -> quantize`` in fp32 under ``torch.no_grad``;
codes written as parquet partitions by pandas. taming-transformers' modules stand in for
``chameleon.inference.vqgan``, which is the same code. Differences, because this runs on one CPU:
no ``torch.distributed`` process group and no CUDA.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import accelerate  # noqa: F401  (MedMax's script imports it)
import numpy as np
import pandas as pd
import PIL
import torch
import torch.distributed  # noqa: F401
import torch.multiprocessing  # noqa: F401
import yaml
from PIL import Image
from tokenizers import Tokenizer  # noqa: F401  (TokenManager)
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper  # noqa: F401


def whiten(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    rgba = np.array(img.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0
    return Image.fromarray(((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype("uint8"), "RGB")


def to_input(img: Image.Image, size: int = 512) -> torch.Tensor:
    scale = size / min(img.size)
    img = img.resize((round(scale * img.size[0]), round(scale * img.size[1])), PIL.Image.LANCZOS)
    x0, y0 = (img.width - size) // 2, (img.height - size) // 2
    arr = np.array(img.crop((x0, y0, x0 + size, y0 + size))) / 255.0 * 2 - 1
    return torch.from_numpy(arr).permute(2, 0, 1).float()


class Images(Dataset):
    def __init__(self, csv: Path):
        frame = pd.read_csv(csv)
        frame["image_path"] = [str(csv.parent / p) for p in frame["img_path"]]
        self.rows = frame.to_dict(orient="records")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        path = self.rows[i]["image_path"]
        return {"image_path": self.rows[i]["img_path"], "image": to_input(whiten(Image.open(path).convert("RGB")))}


def load_vqmodel(folder: Path) -> torch.nn.Module:
    """The whole VQGAN as chameleon.inference.vqgan.VQModel holds it, loaded from vqgan.yaml + vqgan.ckpt."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    params = yaml.safe_load((folder / "vqgan.yaml").read_text())["model"]["params"]
    dd, z = params["ddconfig"], params["ddconfig"]["z_channels"]
    model = torch.nn.Module()
    model.encoder, model.decoder = Encoder(**dd), Decoder(**dd)
    model.quantize = VectorQuantizer2(params["n_embed"], params["embed_dim"], beta=0.25, legacy=True)
    model.quant_conv = torch.nn.Conv2d(z, params["embed_dim"], 1)
    model.post_quant_conv = torch.nn.Conv2d(params["embed_dim"], z, 1)
    state = torch.load(folder / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True, help="folder with vqgan.yaml and vqgan.ckpt")
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--partition_size", type=int, default=5_000)
    args = p.parse_args()
    os.makedirs(args.output, exist_ok=True)
    model = load_vqmodel(args.ckpt)
    loader = DataLoader(Images(args.input), batch_size=args.bs)
    paths, tokens, part = [], [], 0
    for batch in tqdm(loader, disable=True):
        with torch.no_grad():
            _, _, (_, _, codes) = model.quantize(model.quant_conv(model.encoder(batch["image"])))
        paths += batch["image_path"]
        tokens += codes.view(len(batch["image"]), -1).tolist()
        if len(paths) >= args.partition_size:
            pd.DataFrame({"img_path": paths, "img_tokens": tokens}).to_parquet(args.output / f"partition_{part}_rank_0.parquet")
            part, paths, tokens = part + 1, [], []
    pd.DataFrame({"img_path": paths, "img_tokens": tokens}).to_parquet(args.output / f"partition_{part}_rank_0.parquet")


if __name__ == "__main__":
    main()
