"""Tiny checkpoints in the quantized formats large MoE models are published in, written from a
tiny random model's float checkpoint:

- FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-MoE-FP8, GLM-4.5-FP8): each linear weight stored as
  float8_e4m3fn with a float32 `weight_scale_inv` per block (the value the block's codes are
  multiplied by), `quantization_config` {"quant_method": "fp8", "weight_block_size": [b, b]};
  embeddings, norms, routers and the head stay in floating point.
- MXFP4 (gpt-oss): the routed experts' weights as `*_blocks` (two e2m1 codes per byte, the low
  nibble first, 32 codes per block along the input axis) and `*_scales` (one E8M0 exponent byte
  per block, 127 meaning 2^0); everything else in floating point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # the largest float8_e4m3fn
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MXFP4_BLOCK = 32


def _copy_folder(src: Path, dst: Path, quantization_config: dict, dtype: torch.dtype) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config |= {"quantization_config": quantization_config, "dtype": str(dtype).removeprefix("torch.")}
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, float32 scale per block x block tile) of a 2-D weight; a last tile
    that the shape cuts short (DeepSeek-V3's 576-row kv_a_proj_with_mqa in 128-row tiles) has a
    scale of its own."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight.float(), (0, -cols % block, 0, -rows % block))
    tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = tiles.abs().amax(dim=(1, 3)) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return codes.to(torch.float8_e4m3fn), scale


def fp8_dequantized(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """The published formula: each code times the scale of its tile, in float32."""
    rows, cols = codes.shape
    return codes.float() * scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]


def is_fp8_weight(name: str, tensor: torch.Tensor) -> bool:
    """What the published FP8 checkpoints quantize: the linear layers' weights (whatever their
    shape), not embeddings, norms, routers (`*.gate.weight`) or the head."""
    return (name.endswith(".weight") and tensor.ndim == 2 and not name.endswith(".gate.weight")
            and not any(part in name for part in ("embed_tokens", "lm_head", "norm")))


def write_fp8(src: Path, dst: Path, block: int = 8, dtype: torch.dtype = torch.float32) -> list[str]:
    """The float checkpoint at `src` as an FP8 checkpoint at `dst`, its other tensors in `dtype`
    (the published ones keep them in bf16); the names of the FP8 weights."""
    tensors = load_file(src / "model.safetensors")
    out, quantized = {}, []
    for name, tensor in tensors.items():
        if is_fp8_weight(name, tensor):
            out[name], out[f"{name}_scale_inv"] = fp8_blocks(tensor, block)
            quantized.append(name)
        else:
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    _copy_folder(src, dst, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                            "weight_block_size": [block, block]}, dtype)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return quantized


def mxfp4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., rows, cols / 32, 16] uint8, scales [..., rows, cols / 32] uint8) of weight
    [..., rows, cols]: each block of 32 scaled by a power of two so its largest magnitude is at
    most 6, then rounded to the nearest e2m1 value."""
    tiles = weight.float().reshape(*weight.shape[:-1], -1, MXFP4_BLOCK)
    amax = tiles.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = tiles / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4_VALUES).abs().argmin(-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def write_mxfp4(src: Path, dst: Path) -> list[str]:
    """The float gpt-oss checkpoint at `src` with its routed experts in MXFP4, at `dst`; the names
    of the MXFP4 tensors (stored [E, in, out]; the blocks run along `in`, rows are `out`)."""
    tensors = load_file(src / "model.safetensors")
    out, quantized = {}, []
    for name, tensor in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[f"{name}_blocks"], out[f"{name}_scales"] = mxfp4_blocks(tensor.transpose(1, 2))
            quantized.append(name)
        else:
            out[name] = tensor
    _copy_folder(src, dst, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}, torch.float32)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return quantized
