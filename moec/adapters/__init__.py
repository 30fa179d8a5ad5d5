"""Architecture adapters, one per supported model_type."""

from moec.errors import MoecError

from .base import Adapter, MoEBlock
from .deepseek_v3 import DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .granitemoe import GraniteMoeAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .phimoe import PhimoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS = {a.model_type: a for a in (
    MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, OlmoeAdapter, DeepseekV3Adapter,
    PhimoeAdapter, GraniteMoeAdapter, GptOssAdapter,
)}
SUPPORTED = tuple(sorted(ADAPTERS))


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config; unsupported model types name the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise MoecError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}")
    adapter = ADAPTERS[model_type](config)
    adapter.check_config()
    return adapter


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "MoEBlock", "adapter_for"]
