"""Materialize a transformers model one part at a time, so that a model larger than memory can be
calibrated and compiled with about one decoder layer resident.

The skeleton lives on the meta device. `load(path)` picks the checkpoint tensors that transformers'
own conversion mapping (renames such as block_sparse_moe→mlp, per-expert → fused experts) sends
into that part, and feeds just those to `convert_and_load_state_dict_in_model`, the routine
`from_pretrained` uses; so every family transformers can load streams the same way, bit for bit.
A checkpoint published quantized (FP8 block scales, MXFP4 experts) is dequantized tensor by tensor as
it streams, by transformers' own dequantizing converters.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from moec.checkpoint import Checkpoint
from moec.errors import MoecError


FLOAT_DTYPES = ("F32", "F16", "BF16")
# what a model's integer tensors (DeepSeek-V4's hash-routing table, token -> experts) may be stored as
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8")
# a published quantized format's codes: quant_method -> (their safetensors dtypes, whether a tensor holds
# codes, the name of its scales)
CODES = {
    "fp8": (("F8_E4M3",), lambda name, dtype: dtype == "F8_E4M3", lambda name: f"{name}_scale_inv"),
    "mxfp4": (("U8",), lambda name, dtype: name.endswith("_blocks"), lambda name: name.removesuffix("_blocks") + "_scales"),
}
SCALE_SUFFIXES = ("_scale_inv", "_scales", "activation_scale")  # companions of codes, not weights
TRIM_BYTES = 64 << 20  # freeing less is not worth a garbage collection (a third of a second)


class StreamingModel:
    """A transformers model whose skeleton lives on the meta device; parts are materialized on demand.

    Parts load in `dtype` (fp32), except modules handed to `keep_stored` (the routed experts),
    which load in the checkpoint's own dtype: a bf16 Mixtral-8x7B sparse block is 2.8 GB instead of
    5.6, and its consumers upcast one expert at a time."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.checkpoint = checkpoint
        self.dtype = dtype
        config = AutoConfig.from_pretrained(checkpoint.path, trust_remote_code=False)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False).eval()
        # One mapping for the model's lifetime, as in from_pretrained: some renamings keep state across keys.
        self._dequantizer = _dequantizer(checkpoint)
        self._weight_mapping = get_model_conversion_mapping(self.model, hf_quantizer=self._dequantizer)
        self._shard_of = _shard_of_tensor(checkpoint.path)
        self._targets_of = self._module_keys_of_tensor()
        self.stored_dtype = storage_dtype(checkpoint)

    def keep_stored(self, modules) -> None:
        """Load these (meta) modules in the checkpoint's dtype rather than self.dtype: loading keeps
        a parameter's skeleton dtype when it differs from the one asked for."""
        for module in modules:
            module.to(self.stored_dtype)

    def layer_paths(self) -> list[str]:
        prefix = self.model.base_model_prefix
        return [f"{prefix}.layers.{i}" for i in range(len(self.model.base_model.layers))]

    def load(self, path: str) -> nn.Module:
        """Materialize the submodule at `path` (CPU, self.dtype) from the checkpoint and return it."""
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        module = self.model.get_submodule(path)
        names = [name for name, targets in self._targets_of.items() if any(_under(t, path) for t in targets)]
        # with the dequantizer, codes and scales reach its converters as stored (not cast to the
        # parameter's dtype first, which would round float32 scales to a bf16 parameter's dtype)
        load_config = LoadStateDictConfig(dtype=self.dtype, dtype_plan=self.model._get_dtype_plan(self.dtype),
                                          weight_mapping=self._weight_mapping, hf_quantizer=self._dequantizer)
        info, _ = convert_and_load_state_dict_in_model(self.model, self._readers(names), load_config)
        try:
            self._check(path, module, info)
            self._tie(path)
        except MoecError:
            self.unload(path)
            raise
        self._init_non_persistent_buffers(module)
        return module

    def unload(self, path: str) -> None:
        """Return the submodule at `path` to meta, freeing its tensors."""
        module = self.model.get_submodule(path)
        freed = sum(t.nbytes for t in [*module.parameters(), *module.buffers()] if not t.is_meta)
        module.to("meta")
        for submodule in module.modules():  # so a later load initializes its buffers again
            submodule.__dict__.pop("_is_hf_initialized", None)
        if freed >= TRIM_BYTES:
            _return_freed_memory()

    def _module_keys_of_tensor(self) -> dict[str, list[str]]:
        """Checkpoint tensor name -> the model state keys it loads into, renamed as from_pretrained
        does: several where a converter splits one stored tensor (LaraMini's fused `in_proj` rows
        become in_proj_qkv, in_proj_z, in_proj_b and in_proj_a), so loading any of them reads it."""
        from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                     rename_source_key)

        renamings = [t for t in self._weight_mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in self._weight_mapping if isinstance(t, WeightConverter)]
        model_keys = self.model.state_dict()
        targets = {}
        for name in sorted(self._shard_of, key=dot_natural_key):
            target, _ = rename_source_key(name, renamings, converters, self.model.base_model_prefix, model_keys)
            # as in convert_and_load_state_dict_in_model: a name the model already has is not renamed away
            target = name if target not in model_keys and name in model_keys else target
            split = next((c.target_patterns for c in converters
                          if len(c.target_patterns) > 1 and c.target_patterns[0] in target), [])
            targets[name] = [target] + [target.replace(split[0], other, 1) for other in split[1:]]
        return targets

    def _readers(self, names: list[str]) -> dict:
        """Lazy readers of `names`, keyed by checkpoint name, each needed shard's headers checked first."""
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            by_shard.setdefault(self._shard_of[name], []).append(name)
        method = self.checkpoint.quant_method
        code_dtypes, is_codes, scales_of = CODES.get(method, ((), None, None))
        shapes, dtypes, codes = {}, {}, []
        integer = {key for key, t in self.model.state_dict().items() if not t.is_floating_point()}
        for shard, stored in sorted(by_shard.items()):
            with _safe_open(shard) as f:
                for name in stored:
                    stored_slice = f.get_slice(name)
                    dtype, shapes[name] = stored_slice.get_dtype(), stored_slice.get_shape()
                    dtypes[name] = dtype
                    is_table = dtype in INTEGER_DTYPES and set(self._targets_of[name]) <= integer
                    if dtype not in FLOAT_DTYPES + code_dtypes and not is_table:
                        raise MoecError(f"{shard.name}: tensor {name} is stored as {dtype}; moec reads "
                                        f"floating-point weights ({', '.join(FLOAT_DTYPES)})" +
                                        (f" and {method} codes ({', '.join(code_dtypes)})" if method else ""))
                    if is_codes and is_codes(name, dtype):
                        codes.append(name)
        for name in codes:
            self._check_scales(name, scales_of(name), shapes)
        return {name: _ShardTensor(self._shard_of[name], name, dtypes[name]) for name in names}

    def _check_scales(self, name: str, scales: str, shapes: dict) -> None:
        """A quantized tensor's scales are there, in the shape its format gives them (FP8: one per
        weight_block_size tile; MXFP4: one per block of 32 codes)."""
        method = self.checkpoint.quant_method
        if scales not in self._shard_of:
            raise MoecError(f"{self.checkpoint.path}: tensor {name} holds {method} codes, but the checkpoint has "
                            f"no {scales} (its scales)")
        if scales not in shapes:
            with _safe_open(self._shard_of[scales]) as f:
                shapes[scales] = f.get_slice(scales).get_shape()
        shape, block = shapes[name], self.checkpoint.config["quantization_config"].get("weight_block_size")
        if method == "mxfp4":
            expected = shape[:-1]
        else:  # without a block size, one scale for the whole tensor
            expected = [*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1])] if block else shapes[scales]
        if list(shapes[scales]) != list(expected):
            raise MoecError(f"{self.checkpoint.path}: tensor {scales} has shape {list(shapes[scales])}; the scales "
                            f"of {name} {list(shape)} have shape {list(expected)}")

    def _check(self, path: str, module: nn.Module, info) -> None:
        """Raise MoecError for the first tensor of the part that did not load cleanly."""
        for target, error in sorted(info.conversion_errors.items()):
            cause = error.strip().splitlines()[-2]  # the exception's message; the last line names the op
            raise MoecError(f"cannot build {target} from {self.checkpoint.path} (a source tensor is missing "
                            f"or misshapen): {cause}")
        for target, got, expected in sorted(info.mismatched_keys):
            raise MoecError(f"{target}: checkpoint gives shape {list(got)}, model expects {list(expected)}")
        prefix = f"{path}." if path else ""
        needed = {prefix + key for key in module.state_dict()} - self.model.all_tied_weights_keys.keys()
        missing = sorted(needed & info.missing_keys)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MoecError(f"checkpoint {self.checkpoint.path} has no tensor for {missing[0]}{more}")

    def _tie(self, path: str) -> None:
        """Share each tied weight of the part with its source (e.g. lm_head <- embed_tokens)."""
        for target, source in self.model.all_tied_weights_keys.items():
            if not _under(target, path):
                continue
            source_owner = source.rpartition(".")[0]
            if self.model.get_parameter(source).is_meta:
                self.load(source_owner)
                weight = self.model.get_parameter(source)
                self.unload(source_owner)
            else:
                weight = self.model.get_parameter(source)
            owner, _, name = target.rpartition(".")
            setattr(self.model.get_submodule(owner), name, weight)

    def _init_non_persistent_buffers(self, module: nn.Module) -> None:
        """Compute buffers the checkpoint does not hold (rotary inv_freq, ...) as from_pretrained does:
        empty on CPU, then the model's own init, which skips every tensor already loaded."""
        from transformers import initialization

        for submodule in module.modules():
            for name, buffer in submodule.named_buffers(recurse=False):
                if buffer.is_meta:
                    submodule._buffers[name] = torch.empty_like(buffer, device="cpu")
        with torch.no_grad(), initialization.guard_torch_init_functions():
            module.apply(self.model._initialize_weights)


class _ShardTensor:
    """A checkpoint tensor, read when indexed (as transformers' loader does) with its shard open
    only for that read: a mapped shard's pages count as resident memory, and a bf16 sparse block
    would otherwise be held twice while it converts (its 2.9 GB of shard pages and its tensors)."""

    def __init__(self, shard: Path, name: str, dtype: str):
        self.shard, self.name, self.dtype = shard, name, dtype

    def get_dtype(self) -> str:
        """The stored dtype, as safetensors names it (what transformers' loader asks a slice)."""
        return self.dtype

    def __getitem__(self, index):
        with _safe_open(self.shard) as f:
            return f.get_slice(self.name)[index]


class ResidentPart:
    """Read a StreamingModel's tensors keeping one module materialized at a time: the one asked
    for (a projection, a norm, a whole sparse block). Asking for a module outside it frees it
    first, so a compile's lazy initializers need about one sparse block of memory."""

    def __init__(self, stream: StreamingModel):
        self.stream = stream
        self.part: str | None = None
        self.cache: dict = {}  # what readers derive from the resident part; emptied when it goes

    def module(self, path: str) -> nn.Module:
        """The materialized submodule at `path`."""
        if self.part is None or not _under(path, self.part):
            self.release()
            self.stream.load(path)
            self.part = path
        return self.stream.model.get_submodule(path)

    def tensor(self, key: str) -> torch.Tensor:
        owner, _, name = key.rpartition(".")
        return getattr(self.module(owner), name)

    def release(self) -> None:
        self.cache.clear()
        if self.part is not None:
            self.stream.unload(self.part)
            self.part = None


def part_of(path: str, layer_paths: list[str]) -> str:
    """The part a module path is materialized with: its decoder layer, else the module itself."""
    return next((layer for layer in layer_paths if _under(path, layer)), path)


def _under(key: str, path: str) -> bool:
    return not path or key == path or key.startswith(path + ".")


def _shard_of_tensor(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: from the index when sharded, else the file's header."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoecError(f"{index} is not a valid safetensors index ({e})") from None
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in (".", ".."):
                raise MoecError(f"{index} names shard {shard!r}, which is not a file name in {folder}: "
                                "moec reads weights only from the model folder")
            if not (folder / shard).is_file():
                raise MoecError(f"{index} names shard {shard}, which is not in {folder}")
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    with _safe_open(single) as f:
        return {name: single for name in f.keys()}


def _safe_open(file: Path):
    """safe_open, with a corrupt, truncated or absent file reported by name."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise MoecError(f"cannot read {file}: {e}") from None


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that streaming a
    model layer by layer really keeps resident memory at about one layer."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def storage_dtype(checkpoint: Checkpoint) -> torch.dtype:
    """The floating dtype the checkpoint's weights are stored in (float32 when mixed); a quantized
    checkpoint's dequantized weights take the dtype of the weights it stores in floating point."""
    names = dict(zip(FLOAT_DTYPES, (torch.float32, torch.float16, torch.bfloat16)))
    found = set()
    with _safe_open(checkpoint.weight_files[0]) as f:
        for key in f.keys():
            if not key.endswith(SCALE_SUFFIXES):
                found.add(f.get_slice(key).get_dtype())
    floats = found & set(names)
    return names[floats.pop()] if len(floats) == 1 else torch.float32


def _dequantizer(checkpoint: Checkpoint):
    """transformers' quantizer of a checkpoint published quantized, set to dequantize as it loads
    (its converters then turn codes and scales into the model's floating-point weights); None for
    a floating-point checkpoint."""
    if checkpoint.quant_method is None:
        return None
    from transformers.quantizers import AutoHfQuantizer, AutoQuantizationConfig

    config = AutoQuantizationConfig.from_dict({**checkpoint.config["quantization_config"], "dequantize": True})
    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
    if checkpoint.quant_method == "fp8":
        quantizer.get_load_operations = lambda: {"dequantize": _fp8_dequantize_op()}
    return quantizer


@functools.cache
def _fp8_dequantize_op():
    """transformers' Fp8Dequantize, also for a weight whose last tile along an axis is cut short
    (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows in 128-row tiles, 5 row scales). transformers 5.24
    derives the tile from the scale grid, so it refuses that weight, and mis-tiles one whose rows
    the grid happens to divide: here each scale covers weight_block_size elements from the start,
    the last one what is left."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    class PartialTileFp8Dequantize(Fp8Dequantize):
        def _dequantize_one(self, quantized, scales, output_dtype=None):
            block = self.hf_quantizer.quantization_config.weight_block_size
            rows, cols = quantized.shape[-2:]
            if not block or quantized.dtype != torch.float8_e4m3fn or (rows % block[0] == 0 and cols % block[1] == 0):
                return super()._dequantize_one(quantized, scales, output_dtype)
            expanded = scales.float().repeat_interleave(block[0], -2)[..., :rows, :]
            expanded = expanded.repeat_interleave(block[1], -1)[..., :cols]
            return (quantized.float() * expanded).to(output_dtype or scales.dtype)

    return PartialTileFp8Dequantize
