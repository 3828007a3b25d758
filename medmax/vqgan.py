"""The VQGAN image tokenizer: taming-transformers VQModel weights, encode to codes and decode to pixels.

The encoder half is transformers' ``ChameleonVQVAE`` (encoder, ``quant_conv``, legacy nearest-code
quantizer, ``post_quant_conv``), which has taming's parameter names and arithmetic; this module adds
the decoder transformers lacks, so one state dict with taming's keys (``encoder.``, ``decoder.``,
``quantize.embedding.weight``, ``quant_conv.``, ``post_quant_conv.``) loads into :class:`VQGAN`.
Every size comes from the YAML ``ddconfig``; nothing is hard-coded.

Checkpoints accepted by :func:`load_vqgan`:
- the Chameleon / Anole / MedMax layout ``CKPT/tokenizer/vqgan.yaml`` + ``vqgan.ckpt``;
- a folder holding ``vqgan.yaml`` and ``vqgan.ckpt`` or ``vqgan.safetensors`` (what :func:`save_vqgan` writes);
- a Hugging Face Chameleon folder (``config.json`` with ``vq_config``, safetensors with ``model.vqmodel.*``):
  encoder only, unless it holds a ``vqgan/`` subfolder as ``finetune.export`` writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonVQVAE,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)

from .memory import check_fits
from .torch_files import CheckpointError, UntrustedCheckpointError, load_torch_file

logger = logging.getLogger(__name__)

__all__ = ["VQGAN", "CheckpointError", "UntrustedCheckpointError", "load_vqgan", "save_vqgan", "read_vqgan_yaml",
           "estimate_vqgan_parameters", "to_uint8"]

YAML_NAME = "vqgan.yaml"
WEIGHT_NAMES = ("vqgan.safetensors", "vqgan.ckpt")
_STATE_PREFIXES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
_CODE_PREFIXES = ("encoder.", "quant_conv.", "quantize.")  # what decides the codes; the decoder does not
_SKIP_FLAG = "--skip-memory-check (skip_memory_check=True)"


def read_vqgan_yaml(path: str | Path) -> dict:
    """The VQModel ``params`` (``embed_dim``, ``n_embed``, ``ddconfig``) of a taming / Chameleon vqgan.yaml, validated."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
    params = doc.get("model", {}).get("params", doc) if isinstance(doc, dict) else None
    if not isinstance(params, dict) or not {"embed_dim", "n_embed", "ddconfig"} <= params.keys() or not isinstance(params["ddconfig"], dict):
        raise CheckpointError(f"{path}: expected model.params with embed_dim, n_embed and ddconfig")
    params = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"], "ddconfig": dict(params["ddconfig"])}
    validate_params(params, str(path))
    return params


def validate_params(params: dict, source: str = "VQGAN params") -> None:
    """Raise ``ValueError`` naming the key when a taming ``params`` block cannot describe a VQGAN."""
    dd = params["ddconfig"]
    sizes = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"], **{f"ddconfig.{k}": dd.get(k) for k in ("ch", "z_channels", "resolution", "num_res_blocks")}}
    sizes["ddconfig.in_channels"] = dd.get("in_channels", 3)
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{source}: {key} must be a positive integer, got {value!r}")
    mult = dd.get("ch_mult")
    if not isinstance(mult, (list, tuple)) or not mult or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
        raise CheckpointError(f"{source}: ddconfig.ch_mult must be a non-empty list of positive integers, got {mult!r}")
    if any(dd["ch"] * m % 32 for m in [1, *mult]):
        raise CheckpointError(f"{source}: ddconfig.ch {dd['ch']} times every ch_mult must be a multiple of 32 (GroupNorm's 32 groups)")
    if dd["resolution"] % 2 ** (len(mult) - 1):
        raise CheckpointError(f"{source}: ddconfig.resolution {dd['resolution']} must be divisible by 2**{len(mult) - 1} ({len(mult)} levels)")


def estimate_vqgan_parameters(params: dict, with_decoder: bool = True) -> int:
    """The exact parameter count of the :class:`VQGAN` a ``params`` block builds, computed without building it."""
    dd = params["ddconfig"]
    ch, mult, blocks = dd["ch"], list(dd["ch_mult"]), dd["num_res_blocks"]
    attn, z, e = set(dd.get("attn_resolutions") or []), dd["z_channels"], params["embed_dim"]
    n, block_in, res = _conv(dd.get("in_channels", 3), ch, 3), ch, dd["resolution"]
    for level, m in enumerate(mult):  # encoder: transformers' ChameleonVQVAEEncoder
        block_in = ch * ([1, *mult][level])
        for _ in range(blocks):
            n += _resnet(block_in, ch * m)
            block_in = ch * m
            n += _attention(block_in) if res in attn else 0
        if level != len(mult) - 1:
            n, res = n + _conv(block_in, block_in, 3), res // 2
    n += 2 * _resnet(block_in, block_in) + _attention(block_in) + 2 * block_in + _conv(block_in, 2 * z if dd.get("double_z") else z, 3)
    n += params["n_embed"] * e + _conv(z, e, 1) + _conv(e, z, 1)  # codebook, quant_conv, post_quant_conv
    return n + (_decoder_parameters(params) if with_decoder else 0)


def _decoder_parameters(params: dict) -> int:
    """taming's ``Decoder`` (this module's :class:`Decoder`)."""
    dd = params["ddconfig"]
    ch, mult, attn = dd["ch"], list(dd["ch_mult"]), set(dd.get("attn_resolutions") or [])
    block_in, res = ch * mult[-1], dd["resolution"] // 2 ** (len(mult) - 1)
    n = _conv(dd["z_channels"], block_in, 3) + 2 * _resnet(block_in, block_in) + _attention(block_in)
    for level in reversed(range(len(mult))):
        for _ in range(dd["num_res_blocks"] + 1):
            n += _resnet(block_in, ch * mult[level])
            block_in = ch * mult[level]
            n += _attention(block_in) if res in attn else 0
        if level != 0:
            n, res = n + _conv(block_in, block_in, 3), res * 2
    return n + 2 * block_in + _conv(block_in, dd.get("out_ch", 3), 3)


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _resnet(cin: int, cout: int) -> int:  # two GroupNorms, two 3x3 convs, a 1x1 shortcut when the width changes
    return 2 * cin + _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + (_conv(cin, cout, 1) if cin != cout else 0)


def _attention(c: int) -> int:  # GroupNorm, q, k, v, proj_out
    return 2 * c + 4 * _conv(c, c, 1)


def check_vqgan_fits(params: dict, source: str, with_decoder: bool = True, copies: int = 1, skip: bool = False) -> None:
    """:func:`medmax.memory.check_fits` for ``copies`` fp32 copies of the weights a ``params`` block describes."""
    n = estimate_vqgan_parameters(params, with_decoder)
    check_fits(4 * n * copies, f"{source}: a VQGAN of {n:,} parameters", allow=skip, override=_SKIP_FLAG)


def hf_vq_config(params: dict) -> ChameleonVQVAEConfig:
    """transformers' VQ-VAE config equivalent to a taming ``params`` block."""
    dd = params["ddconfig"]
    return ChameleonVQVAEConfig(
        embed_dim=params["embed_dim"],
        num_embeddings=params["n_embed"],
        double_latent=bool(dd.get("double_z", False)),
        latent_channels=dd["z_channels"],
        resolution=dd["resolution"],
        in_channels=dd.get("in_channels", 3),
        base_channels=dd["ch"],
        channel_multiplier=list(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=list(dd.get("attn_resolutions") or []),
        dropout=float(dd.get("dropout", 0.0)),
    )


def params_from_hf(config: ChameleonVQVAEConfig) -> dict:
    """Inverse of :func:`hf_vq_config`."""
    return {
        "embed_dim": config.embed_dim,
        "n_embed": config.num_embeddings,
        "ddconfig": dict(
            double_z=config.double_latent, z_channels=config.latent_channels, resolution=config.resolution,
            in_channels=config.in_channels, out_ch=config.in_channels, ch=config.base_channels,
            ch_mult=list(config.channel_multiplier), num_res_blocks=config.num_res_blocks,
            attn_resolutions=list(config.attn_resolutions or []), dropout=float(config.dropout),
        ),
    }


class _Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (taming ``Upsample(with_conv=True)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """taming-transformers' ``Decoder`` (same module tree and names), built from transformers' blocks."""

    def __init__(self, config: ChameleonVQVAEConfig, out_channels: int = 3):
        super().__init__()
        mults = list(config.channel_multiplier)
        self.num_resolutions = len(mults)
        self.num_res_blocks = config.num_res_blocks
        attn_res = set(config.attn_resolutions or [])
        block_in = config.base_channels * mults[-1]
        curr_res = config.resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)
        self.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(block_in)
        self.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)

        ups = []
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * mults[level]
            for _ in range(self.num_res_blocks + 1):
                up.block.append(ChameleonVQVAEEncoderResnetBlock(config, block_in, block_out))
                block_in = block_out
                if curr_res in attn_res:
                    up.attn.append(ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = _Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, out_channels, H, W)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        h = h * torch.sigmoid(h)
        return self.conv_out(h)


class VQGAN(ChameleonVQVAE):
    """Chameleon's VQGAN: ``encode_codes`` pixels in [-1, 1] to row-major codes, ``decode_codes`` back."""

    def __init__(self, config: ChameleonVQVAEConfig, out_channels: int = 3, with_decoder: bool = True):
        super().__init__(config)
        self.decoder = Decoder(config, out_channels) if with_decoder else None
        self._channels_last = False  # set by prepare_for_encoding
        self.eval()

    @classmethod
    def from_params(cls, params: dict, with_decoder: bool = True, skip_memory_check: bool = False) -> "VQGAN":
        """Build from a taming ``params`` block, after checking its sizes and that its weights fit in memory."""
        validate_params(params)
        check_vqgan_fits(params, "VQGAN params", with_decoder, skip=skip_memory_check)
        return cls(hf_vq_config(params), params["ddconfig"].get("out_ch", 3), with_decoder)

    @property
    def params(self) -> dict:
        """The taming ``params`` block that rebuilds this model (what vqgan.yaml holds)."""
        return params_from_hf(self.config)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def grid_shape(self) -> tuple[int, int]:
        side = self.config.resolution // 2 ** (len(self.config.channel_multiplier) - 1)
        return side, side

    @property
    def downsampling(self) -> int:
        """Pixels per code along a side (16 for Chameleon's VQGAN)."""
        return 2 ** (len(self.config.channel_multiplier) - 1)

    @property
    def n_codes_per_image(self) -> int:
        h, w = self.grid_shape
        return h * w

    @property
    def n_embed(self) -> int:
        return self.config.num_embeddings

    def codes_digest(self) -> str:
        """sha256 of everything that decides the codes: the sizes, and the encoder, ``quant_conv`` and codebook
        weights as float32. The decoder is left out, so decoder-only fine-tuning keeps every code (and digest).
        Take it before :meth:`prepare_for_encoding` casts the encoder to another dtype."""
        digest = hashlib.sha256()
        sizes = {k: v for k, v in self.params["ddconfig"].items() if k not in ("out_ch", "dropout")}
        digest.update(json.dumps({"embed_dim": self.config.embed_dim, "n_embed": self.n_embed, **sizes}, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith(_CODE_PREFIXES):
                values = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{name}:{tuple(values.shape)}".encode())
                digest.update(values.numpy().tobytes())
        return digest.hexdigest()

    def prepare_for_encoding(self, device=None, dtype: torch.dtype = torch.float32, channels_last: bool | None = None) -> "VQGAN":
        """Ready the encoder for fast inference, in place: on ``device``, encoder and ``quant_conv`` in ``dtype``.

        The codebook stays float32 so that the nearest-code search is exact given the encoder output.
        ``channels_last`` (default: only for reduced precision) speeds up CPU convolutions by ~15% but
        changes float rounding, so fp32 codes are then no longer guaranteed bit-identical to taming's.
        """
        if channels_last is None:
            channels_last = dtype != torch.float32
        self.to(device=device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._channels_last = channels_last
        self.encoder.to(dtype=dtype, memory_format=fmt)
        self.quant_conv.to(dtype=dtype, memory_format=fmt)
        self.quantize.to(dtype=torch.float32)
        self.requires_grad_(False)
        return self.eval()

    @torch.inference_mode()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, h*w) long codes, row-major, nearest codebook entry.

        The pixels are cast to the encoder's dtype and memory format; quantization runs in the codebook's dtype.
        """
        weight = self.encoder.conv_in.weight
        fmt = torch.channels_last if self._channels_last else torch.contiguous_format
        pixels = pixels.to(device=weight.device, dtype=weight.dtype).contiguous(memory_format=fmt)
        hidden = self.quant_conv(self.encoder(pixels))  # (B, embed_dim, h, w)
        _, _, indices = self.quantize(hidden.to(self.quantize.embedding.weight.dtype).contiguous())
        return indices.view(pixels.shape[0], -1)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, h*w) codes -> (B, 3, H, W) decoder output (not clamped; see :func:`to_uint8`).

        ``grid``: the codes' (h, w) when not the square :attr:`grid_shape` (a shaped image).
        """
        if self.decoder is None:
            raise RuntimeError(
                "this VQGAN was loaded without decoder weights (a Hugging Face Chameleon checkpoint holds only "
                "the encoder); load vqgan.yaml + vqgan.ckpt from the original release to decode images"
            )
        codes = torch.as_tensor(codes, device=self.quantize.embedding.weight.device).long()
        h, w = grid or self.grid_shape
        if codes.dim() != 2 or codes.shape[1] != h * w:
            raise ValueError(f"expected codes of shape (B, {h * w}) for a {h}x{w} grid, got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.n_embed):
            raise ValueError(f"codes must lie in 0..{self.n_embed - 1}")
        z = self.quantize.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z.contiguous()))


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 3, H, W) -> (B, H, W, 3) uint8, clamping to [-1, 1] first (Chameleon's rule)."""
    x = (pixels.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _load_state(path: Path, trust_checkpoint: bool) -> dict:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    obj = load_torch_file(path, trust=trust_checkpoint)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for k, v in state.items() if str(k).startswith(_STATE_PREFIXES)):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _vqgan_from_state(params: dict, state: dict, source: Path, params_source: str | Path) -> VQGAN:
    state = {k: v for k, v in state.items() if k.startswith(_STATE_PREFIXES)}
    has_decoder = any(k.startswith("decoder.") for k in state)
    model = VQGAN.from_params(params, with_decoder=has_decoder, skip_memory_check=True)  # checked before loading
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatches
        raise CheckpointError(f"{source}: weights do not fit {params_source} ({' '.join(str(exc).split())[:500]})") from exc
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit {params_source} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if not has_decoder:
        logger.warning("%s: no decoder weights; this VQGAN can encode but not decode", source)
    return model.eval()


def _find_vqgan_files(path: Path) -> tuple[Path, Path] | None:
    for folder in (path, path / "tokenizer", path / "vqgan"):
        if (folder / YAML_NAME).is_file():
            for name in WEIGHT_NAMES:
                if (folder / name).is_file():
                    return folder / YAML_NAME, folder / name
    return None


def _load_hf_vqmodel(path: Path, skip_memory_check: bool) -> VQGAN:
    from safetensors import safe_open

    config = json.loads((path / "config.json").read_text())
    if "vq_config" not in config:
        raise CheckpointError(f"{path}/config.json has no vq_config: not a Chameleon checkpoint")
    params = params_from_hf(ChameleonVQVAEConfig(**{k: v for k, v in config["vq_config"].items() if k in ChameleonVQVAEConfig.__dataclass_fields__}))
    validate_params(params, f"{path}/config.json vq_config")
    check_vqgan_fits(params, f"{path}/config.json", with_decoder=False, copies=2, skip=skip_memory_check)
    prefix, state = "model.vqmodel.", {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    state[key[len(prefix):]] = f.get_tensor(key)
    if not state:
        raise CheckpointError(f"{path}: no model.vqmodel.* tensors in its safetensors files")
    return _vqgan_from_state(params, state, path, f"{path}/config.json")


def load_vqgan(path: str | Path, trust_checkpoint: bool = False, device=None, dtype=None, skip_memory_check: bool = False) -> VQGAN:
    """Load a VQGAN from any of the layouts in the module docstring.

    The sizes in the YAML (or ``config.json``) are validated and the weights' memory is checked against
    available memory before anything is read (``skip_memory_check`` overrides the latter). A weights
    file that is broken raises :class:`CheckpointError`; one that needs full unpickling raises
    :class:`UntrustedCheckpointError` unless ``trust_checkpoint``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: VQGAN checkpoint does not exist")
    if path.is_file():  # a weights file beside its yaml
        files = (path.parent / YAML_NAME, path)
        if not files[0].is_file():
            raise FileNotFoundError(f"{path}: no {YAML_NAME} beside it")
    else:
        files = _find_vqgan_files(path)
    if files is not None:
        params = read_vqgan_yaml(files[0])
        check_vqgan_fits(params, str(files[0]), copies=2, skip=skip_memory_check)  # the state dict and the model
        model = _vqgan_from_state(params, _load_state(files[1], trust_checkpoint), files[1], files[0])
    elif (path / "config.json").is_file():
        model = _load_hf_vqmodel(path, skip_memory_check)
    else:
        raise FileNotFoundError(
            f"{path}: no VQGAN found (expected vqgan.yaml + vqgan.ckpt|vqgan.safetensors here, in tokenizer/ or vqgan/, "
            "or a Hugging Face Chameleon config.json)"
        )
    return model.to(device=device, dtype=dtype)


def save_vqgan(model: VQGAN, folder: str | Path) -> Path:
    """Write ``vqgan.yaml`` (taming layout) and ``vqgan.safetensors`` (taming keys) into a folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model": {"target": "taming.models.vqgan.VQModel", "params": model.params}}
    (folder / YAML_NAME).write_text(yaml.safe_dump(doc, sort_keys=False))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "vqgan.safetensors"))
    return folder
