"""StreamingModel: each part loads bit-identical to from_pretrained, chains to identical logits,
frees its memory on unload, and reports broken checkpoints as MoecError."""

from __future__ import annotations

import gc
import json
import re
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import tiny
from moec.checkpoint import open_checkpoint
from moec.errors import MoecError
from moec.planner import DEFAULT_NON_EXPERT
from moec.weights import StreamingModel

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 41, 7], [88, 12, 201, 64, 9, 9, 31]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(arch) -> the family's tiny checkpoint, saved once."""
    cache = {}

    def get(arch):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(arch)
            tiny.save_tiny(arch, folder)
            cache[arch] = open_checkpoint(folder)
        return cache[arch]

    return get


def from_pretrained(checkpoint, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=dtype).eval()


def save(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return open_checkpoint(folder)


def part_paths(streaming):
    """The body's parts besides its layers (embeddings, rotary, final norm: named as the family
    names them), its layers, and the head."""
    others = [f"model.{name}" for name, _ in streaming.model.model.named_children() if name != "layers"]
    return [*others, *streaming.layer_paths(), "lm_head"]


def tensors(module):
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def assert_same_part(part, expected, path):
    got, want = tensors(part), tensors(expected)
    assert got.keys() == want.keys(), path
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), f"{path}.{name}"


def assert_on_meta(module):
    assert all(t.is_meta for t in tensors(module).values())


def parameter_bytes(module, resident_only=True):
    return sum(p.numel() * p.element_size() for p in module.parameters() if not (resident_only and p.is_meta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", tiny.SUPPORTED)
def test_every_part_equals_from_pretrained_and_unloads_to_meta(saved, arch, dtype):
    checkpoint = saved(arch)
    reference = from_pretrained(checkpoint, dtype)
    streaming = StreamingModel(checkpoint, dtype)
    assert not streaming.model.training
    assert_on_meta(streaming.model)
    for path in part_paths(streaming):
        assert_same_part(streaming.load(path), reference.get_submodule(path), path)
        streaming.unload(path)
        assert_on_meta(streaming.model.get_submodule(path))


# the families whose rotary embedding this harness calls as (hidden, position_ids)
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "granitemoe",
                                  "gpt_oss"])
def test_part_by_part_forward_gives_identical_logits(saved, arch):
    """Layers run with the kwargs (mask, positions) the full model passes them, captured by hooks."""
    checkpoint = saved(arch)
    reference = from_pretrained(checkpoint)
    layer_calls, logits = [], []
    hooks = [layer.register_forward_pre_hook(lambda _, args, kwargs: layer_calls.append((args, kwargs)),
                                             with_kwargs=True) for layer in reference.model.layers]
    hooks.append(reference.lm_head.register_forward_hook(lambda _, args, out: logits.append(out)))
    with torch.no_grad():
        reference(input_ids=PROMPT, use_cache=False)
    for hook in hooks:
        hook.remove()

    streaming = StreamingModel(checkpoint)
    with torch.no_grad():
        embedded = streaming.load("model.embed_tokens")(PROMPT)
        streaming.unload("model.embed_tokens")
        assert torch.equal(embedded, reference.model.embed_tokens(PROMPT))
        hidden = layer_calls[0][0][0]  # some families scale the embedding before layer 0
        position_embeddings = streaming.load("model.rotary_emb")(hidden, layer_calls[0][1]["position_ids"])
        for got, want in zip(position_embeddings, layer_calls[0][1]["position_embeddings"]):
            assert torch.equal(got, want)
        for path, (_, kwargs) in zip(streaming.layer_paths(), layer_calls):
            hidden = streaming.load(path)(hidden, **{**kwargs, "position_embeddings": position_embeddings})
            streaming.unload(path)
        hidden = streaming.load("model.norm")(hidden)
        assert torch.equal(streaming.load("lm_head")(hidden), logits[0])


def test_sharded_checkpoint(saved, tmp_path):
    reference = from_pretrained(saved("mixtral"))
    sharded = save(reference, tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(sharded.weight_files) > 2
    streaming = StreamingModel(sharded)
    for path in part_paths(streaming):
        assert_same_part(streaming.load(path), reference.get_submodule(path), path)


def test_tied_embeddings(tmp_path):
    config = tiny.configs()["mixtral"]
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    checkpoint = save(transformers.AutoModelForCausalLM.from_config(config), tmp_path)
    reference = from_pretrained(checkpoint)
    streaming = StreamingModel(checkpoint)
    assert_same_part(streaming.load("lm_head"), reference.lm_head, "lm_head")
    assert_on_meta(streaming.model.model.embed_tokens)  # borrowed for the tie, then given back
    assert_same_part(streaming.load("model.embed_tokens"), reference.model.embed_tokens, "model.embed_tokens")
    streaming.unload("lm_head")
    assert not streaming.model.model.embed_tokens.weight.is_meta


def test_memory_stays_at_about_one_layer(tmp_path):
    config = transformers.MixtralConfig(**{**tiny.COMMON, "hidden_size": 256}, intermediate_size=512,
                                        num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2)
    checkpoint = save(transformers.AutoModelForCausalLM.from_config(config), tmp_path)
    streaming = StreamingModel(checkpoint)
    layer_bytes = parameter_bytes(streaming.model.model.layers[0], resident_only=False)
    assert layer_bytes > 4e6 and parameter_bytes(streaming.model) == 0

    first = [weakref.ref(p) for p in streaming.load("model.layers.0").parameters()]
    assert parameter_bytes(streaming.model) == layer_bytes
    streaming.unload("model.layers.0")
    gc.collect()
    assert all(ref() is None for ref in first), "an unloaded layer's tensors must be freed"
    streaming.load("model.layers.1")
    assert parameter_bytes(streaming.model) == layer_bytes


def test_compile_materializes_at_most_one_layer(tmp_path, monkeypatch):
    """Tracing on the meta device, writing lazily and the streamed reference keep a compile at
    one decoder layer (plus embeddings, final norm and head for the reference) at any time."""
    import moec

    config = transformers.MixtralConfig(**{**tiny.COMMON, "hidden_size": 256}, intermediate_size=512,
                                        num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=2)
    checkpoint = save(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "model")
    skeleton = StreamingModel(checkpoint).model
    layer_bytes = parameter_bytes(skeleton.model.layers[0], resident_only=False)
    total = parameter_bytes(skeleton, resident_only=False)
    outer = total - 3 * layer_bytes
    peak, loads = [0], []
    load = StreamingModel.load

    def watched_load(self, path):
        module = load(self, path)
        loads.append(path)
        peak[0] = max(peak[0], parameter_bytes(self.model))
        return module

    monkeypatch.setattr(StreamingModel, "load", watched_load)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moec-plan/1", "model": "tiny", "experts": {"bits": [[2, 4, 8, "float"]] * 3},
                                "non_expert": {**DEFAULT_NON_EXPERT, "attention": 4, "lm_head": 8},
                                "quantization": {"method": "rtn", "group_size": 32}, "pruning": {}}))
    record = moec.compile(checkpoint.path, tmp_path / "artifact", plan=plan, progress=False)
    assert record["verification"]["max_abs_logit_diff"] < 1e-3
    assert {f"model.layers.{i}" for i in range(3)} <= set(loads)
    assert 0 < peak[0] <= layer_bytes + outer < total / 2
    # netron readers see each expert's nodes by name with their width; the graph file says the average
    import onnx

    model = onnx.load(str(tmp_path / "artifact" / "model.onnx"), load_external_data=False)
    names = [n.name for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert any(n.startswith("layers.0.experts.0/") and n.endswith("(2-bit)") for n in names)
    assert any(n.startswith("layers.2.experts.2/") and n.endswith("(8-bit)") for n in names)
    assert {p.key: p.value for p in model.metadata_props}["moec.avg_expert_bits"] == \
        f"{record['quantization']['avg_expert_bits']:.4f}"


def test_routed_experts_of_a_bf16_checkpoint_stay_bf16_through_a_compile(tmp_path, monkeypatch):
    """A bf16 checkpoint's routed experts are loaded, traced and read in bf16 and upcast one expert
    at a time, so a sparse block is never held in fp32 (a Mixtral-8x7B block: 2.8 GB, not 5.6);
    everything else computes in fp32, and the quantized artifact still verifies."""
    import moec

    config = transformers.MixtralConfig(**{**tiny.COMMON, "hidden_size": 256}, intermediate_size=512,
                                        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    checkpoint = save(model, tmp_path / "model")
    loaded = []
    load = StreamingModel.load

    def watched_load(self, path):
        module = load(self, path)
        loaded.append({name: p.dtype for name, p in module.named_parameters()})
        return module

    monkeypatch.setattr(StreamingModel, "load", watched_load)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "moec-plan/1", "model": "tiny", "experts": {"bits": [[2, 4, 8, "float"]] * 2},
                                "non_expert": {**DEFAULT_NON_EXPERT, "attention": 8},
                                "quantization": {"method": "rtn", "group_size": 32}, "pruning": {}}))
    record = moec.compile(checkpoint.path, tmp_path / "artifact", plan=plan, progress=False)
    assert record["verification"]["max_abs_logit_diff"] < 1e-3
    layers = [dtypes for dtypes in loaded if "mlp.experts.gate_up_proj" in dtypes]
    assert layers, "no decoder layer was loaded"
    for dtypes in layers:
        assert {dtype for name, dtype in dtypes.items() if ".experts." in name} == {torch.bfloat16}
        assert {dtype for name, dtype in dtypes.items() if ".experts." not in name} == {torch.float32}


def test_no_shard_stays_mapped_while_a_part_converts(saved, tmp_path, monkeypatch):
    """Each checkpoint tensor is read by mapping its shard for that read only (the mapping lives as
    long as the tensor read from it): mapped shard pages count as resident memory, and a part's
    shards mapped for its whole conversion doubled a bf16 sparse block's footprint while it loaded."""
    from transformers import core_model_loading

    checkpoint = save(from_pretrained(saved("mixtral")), tmp_path, max_shard_size="200KB")
    shards = {str(f.resolve()) for f in checkpoint.weight_files}

    def mapped() -> set[str]:
        return {line.split()[-1] for line in open("/proc/self/maps") if line.split()[-1] in shards}

    at_conversion = []
    convert = core_model_loading.convert_and_load_state_dict_in_model

    def watched_convert(*args, **kwargs):
        at_conversion.append(mapped())
        return convert(*args, **kwargs)

    monkeypatch.setattr(core_model_loading, "convert_and_load_state_dict_in_model", watched_convert)
    streaming = StreamingModel(checkpoint)
    for path in part_paths(streaming):
        streaming.load(path)
        streaming.unload(path)
        gc.collect()
        assert not mapped(), f"{path}: a shard is still mapped after its part was unloaded"
    assert len(at_conversion) == len(part_paths(streaming)) and all(not m for m in at_conversion)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    config = transformers.MixtralConfig(**{**tiny.COMMON, "tie_word_embeddings": True}, intermediate_size=96,
                                        num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return save(transformers.AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("tied") / "model")


@pytest.mark.xdist_group("tied")  # one worker traces the model once for both
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_compile_with_tied_embeddings(tied_checkpoint, tmp_path, quantized):
    """The head shares the embedding's weight: traced from the meta skeleton, written lazily,
    named lm_head (so the plan's lm_head width applies) and verified."""
    import moec

    checkpoint = tied_checkpoint
    plan = None
    if quantized:
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"format": "moec-plan/1", "model": "tiny", "experts": {"bits": [[4] * 4] * 2},
                                    "non_expert": {**DEFAULT_NON_EXPERT, "lm_head": 8},
                                    "quantization": {"method": "rtn", "group_size": 32}, "pruning": {}}))
    record = moec.compile(checkpoint.path, tmp_path / "artifact", plan=plan, progress=False)
    assert record["verification"]["max_abs_logit_diff"] < (1e-3 if quantized else 1e-4)
    if quantized:
        assert record["quantization"]["non_expert"]["lm_head.weight"]["bits"] == 8


def rewrite(file, edit):
    """Rewrite one safetensors file after `edit(tensors)` changes its tensors in place."""
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"),
     "has no tensor for model.layers.1.self_attn.q_proj.weight"),
    (lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     "cannot build model.layers.1.mlp.experts.gate_up_proj"),
    (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 32)}),
     "model.layers.1.self_attn.o_proj.weight: checkpoint gives shape [64, 32], model expects [64, 64]"),
    (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 64, dtype=torch.int32)}),
     "tensor model.layers.1.self_attn.o_proj.weight is stored as I32; moec reads floating-point weights"),
], ids=["missing", "missing-expert", "wrong-shape", "wrong-dtype"])
def test_broken_tensor_is_a_moec_error(saved, tmp_path, edit, message):
    checkpoint = save(from_pretrained(saved("mixtral")), tmp_path)
    rewrite(tmp_path / "model.safetensors", edit)
    streaming = StreamingModel(checkpoint)
    streaming.load("model.layers.0")  # other parts are unaffected
    with pytest.raises(MoecError, match=re.escape(message)):
        streaming.load("model.layers.1")
    assert_on_meta(streaming.model.model.layers[1])


def test_index_naming_an_absent_shard_is_a_moec_error(saved, tmp_path):
    checkpoint = save(from_pretrained(saved("mixtral")), tmp_path, max_shard_size="200KB")
    shard = checkpoint.weight_files[-1]
    shard.unlink()
    with pytest.raises(MoecError, match=f"names shard {shard.name}, which is not in"):
        StreamingModel(checkpoint)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/dir.safetensors"])
def test_index_naming_a_shard_outside_the_folder_is_refused(saved, tmp_path, name):
    checkpoint = save(from_pretrained(saved("mixtral")), tmp_path / "model", max_shard_size="200KB")
    index = checkpoint.path / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    first = next(iter(content["weight_map"]))
    content["weight_map"][first] = name
    index.write_text(json.dumps(content))
    with pytest.raises(MoecError, match="which is not a file name in"):
        StreamingModel(checkpoint)


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_truncated_shard_is_a_moec_error(saved, tmp_path, sharded):
    sharding = {"max_shard_size": "200KB"} if sharded else {}
    checkpoint = save(from_pretrained(saved("mixtral")), tmp_path, **sharding)
    victim = checkpoint.weight_files[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(MoecError, match=f"cannot read .*{victim.name}"):
        streaming = StreamingModel(checkpoint)
        for path in part_paths(streaming):
            streaming.load(path)
