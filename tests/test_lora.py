"""LoRA (issue 18): adapters on the bridged model equal peft on transformers; PEFT adapter export and import; merged export.

The fast tier checks the settings, the target names read off the mapping registry and where each
role's rows sit in a fused ``linear_qkv`` shard. The distributed tests run every case of one world
size in one group of spawned ranks (``tests/case_matrix.py``): TP1 on one rank, TP2·PP2 on four.
Models are the tiny bf16 "llama" loaded as fp32 on both sides; B is drawn non-zero.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from bridge.mappings import MappingContext, QKVMapping
from bridge.models import bridge_for
from safetensors.torch import load_file

from bridge.lora import LoraConfig, LoraError, resolve_targets
from bridge.lora.layers import column_role_rows
from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.tiny_checkpoints import tiny_config

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"all": ALL_LINEARS, "qv": ("q_proj", "v_proj")}
LAYOUTS = {1: (1, 1), 4: (2, 2)}  # world size → (tp, pp)
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FUSED_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # Phi-3's linear modules
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")  # transformers 5's stacked experts, as peft targets them
# world size → the MoE layouts: at TP2 the experts are split over expert TP (2) with sequence parallelism; EP2 puts
# two experts on each rank (DP2: each DP rank runs half the micro-batches)
MOE_LAYOUTS = {
    1: {"tp1": dict(tp=1, pp=1)},
    4: {"tp2-pp2": dict(tp=2, pp=2), "pp2-ep2": dict(tp=1, pp=2, ep=2), "tp2-ep2-etp1": dict(tp=2, pp=1, ep=2, etp=1)},
}
R, ALPHA, SEED, B_STD = 4, 8, 1, 0.05
EXPERT_CONFIG = LoraConfig(r=R, alpha=ALPHA, targets=MOE_TARGETS, target_parameters=EXPERT_PARAMETERS)
_TRAIN_GRADS: dict[int, list[dict]] = {}  # world size → the first stage's "train" results, filled by ``session``
_EXPERT_GRADS: dict[str, list[dict]] = {}  # MoE layout → the first stage's "experts" results, filled by ``session``


def _llama_bridge():

    return bridge_for(tiny_config("llama", architectures=["LlamaForCausalLM"]))


# ---------------------------------------------------------------- fast tier: settings, targets, row layout


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0, alpha=8, targets=["q_proj"]), "rank r=0"),
        (dict(r=-2, alpha=8, targets=["q_proj"]), "rank r=-2"),
        (dict(r=4, alpha=0, targets=["q_proj"]), "alpha=0"),
        (dict(r=4, alpha=8, targets=[]), "name at least one module"),
        (dict(r=4, alpha=8, targets=["q_proj", "q_proj"]), "'q_proj' given twice"),
        (dict(r=4, alpha=8, targets=["q_proj"], dropout=1.0), "dropout=1.0"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(LoraError, match=match):
        LoraConfig(**kwargs)


def test_a_target_the_architecture_lacks_is_named():
    model_bridge = _llama_bridge()
    with pytest.raises(LoraError, match=r"'gate_up_proj' do not exist in LlamaForCausalLM; its linear modules are: down_proj, gate_proj"):
        resolve_targets(model_bridge.mapping_registry(), ("q_proj", "gate_up_proj"), "LlamaForCausalLM")


def test_targets_come_from_the_mapping_registry():
    adapted = resolve_targets(_llama_bridge().mapping_registry(), ("q_proj", "v_proj", "down_proj"), "LlamaForCausalLM")
    found = {linear.module: [role.target for role in linear.roles] for linear in adapted}
    assert found == {"decoder.layers.*.self_attention.linear_qkv": ["q_proj", "v_proj"], "decoder.layers.*.mlp.linear_fc2": ["down_proj"]}
    (qkv, fc2) = adapted
    assert not qkv.row_parallel and fc2.row_parallel
    assert qkv.roles[0].peft_name("A") == "base_model.model.model.layers.*.self_attn.q_proj.lora_A.weight"


def _mixtral_bridge():
    return bridge_for(tiny_config("mixtral", architectures=["MixtralForCausalLM"]))


def test_routed_experts_are_target_parameters_named_as_peft_nests_them():
    """transformers 5 stacks Mixtral's experts (``mlp.experts.gate_up_proj``/``down_proj``, stored per expert as
    ``block_sparse_moe.experts.*.w1/w3/w2``); peft wraps the module's first parameter innermost (``base_layer.``)."""
    model_bridge = _mixtral_bridge()

    def names(parameters: tuple[str, ...]) -> dict[str, tuple[str, str]]:
        adapted = resolve_targets(model_bridge.mapping_registry(), (), "MixtralForCausalLM", (), (), parameters, model_bridge.hf_views)
        return {linear.module: (linear.roles[0].peft_name("A"), linear.roles[0].peft_name("B")) for linear in adapted}

    experts = "base_model.model.model.layers.*.mlp.experts."
    fc1, fc2 = "decoder.layers.*.mlp.experts.local_experts.*.linear_fc1", "decoder.layers.*.mlp.experts.local_experts.*.linear_fc2"
    assert names(("experts.gate_up_proj", "mlp.experts.down_proj")) == {
        fc1: (experts + "base_layer.lora_A.weight[*]", experts + "base_layer.lora_B.weight[*]"),
        fc2: (experts + "lora_A.weight[*]", experts + "lora_B.weight[*]"),
    }
    assert names(("gate_up_proj",)) == {fc1: (experts + "lora_A.weight[*]", experts + "lora_B.weight[*]")}
    # a text model stored apart from transformers' module tree (as Gemma 3 image-text's): named by the module path too
    paths = (("model.", "model.language_model."),)
    adapted = resolve_targets(model_bridge.mapping_registry(), ("q_proj",), "", paths, (), ("down_proj",), model_bridge.hf_views)
    assert [linear.roles[0].peft_name("A") for linear in adapted] == [
        "base_model.model.model.language_model.layers.*.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.language_model.layers.*.mlp.experts.lora_A.weight[*]",
    ]


def test_routed_experts_are_no_target_modules_and_unknown_parameters_are_named():
    model_bridge = _mixtral_bridge()
    registry, views = model_bridge.mapping_registry(), model_bridge.hf_views
    with pytest.raises(LoraError, match=r"'w1' do not exist in MixtralForCausalLM; .*target_parameters 'experts.gate_up_proj'"):
        resolve_targets(registry, ("w1",), "MixtralForCausalLM", (), (), (), views)
    with pytest.raises(LoraError, match=r"'experts.w2' do not exist .*: experts.gate_up_proj, experts.down_proj"):
        resolve_targets(registry, (), "MixtralForCausalLM", (), (), ("experts.w2",), views)
    with pytest.raises(LoraError, match=r"'experts.down_proj' do not exist in LlamaForCausalLM; .*: none"):
        resolve_targets(_llama_bridge().mapping_registry(), (), "LlamaForCausalLM", (), (), ("experts.down_proj",))


def test_gpt_oss_interleaved_experts_are_refused():
    model_bridge = bridge_for(tiny_config("gptoss", architectures=["GptOssForCausalLM"]))
    with pytest.raises(LoraError, match=r"LoRA on GptOssForCausalLM's experts.gate_up_proj .* is not supported"):
        resolve_targets(model_bridge.mapping_registry(), (), "GptOssForCausalLM", (), (), ("gate_up_proj",), model_bridge.hf_views)


def test_expert_slices_are_peft_reshapes_and_join_back_identical():
    """peft reads expert e's A as ``A.reshape(E, r, in)[e]`` and its B as ``B.reshape(out, r, E)[..., e]``."""
    from bridge.lora.expert_tensors import ExpertAdapterSlices, join_expert_slices

    experts, r = 3, 2
    stored = {"m.lora_A.weight": torch.randn(r * experts, 5), "m.lora_B.weight": torch.randn(7, r * experts)}
    view = ExpertAdapterSlices(("m.lora_A.weight", "m.lora_B.weight"), experts)
    slices = {}
    for name, tensor in stored.items():
        for sliced, source in view.expand(name, tensor).items():
            slices[sliced] = source.narrow(0, 0, source.shape[0])
            assert torch.equal(source.narrow(1, 1, 1), slices[sliced][:, 1:2])
    for e in range(experts):
        assert torch.equal(slices[f"m.lora_A.weight[{e}]"], stored["m.lora_A.weight"].reshape(experts, r, 5)[e])
        assert torch.equal(slices[f"m.lora_B.weight[{e}]"], stored["m.lora_B.weight"].reshape(7, r, experts)[..., e])
    joined = dict(join_expert_slices(reversed(list(slices.items())), experts))
    assert joined.keys() == stored.keys() and all(torch.equal(joined[name], stored[name]) for name in stored)
    with pytest.raises(LoraError, match=r"m.lora_B.weight is \[7, 6\]: its dim 1 does not split into the model's 4 experts"):
        ExpertAdapterSlices(("m.lora_B.weight",), 4).expand("m.lora_B.weight", stored["m.lora_B.weight"])
    with pytest.raises(LoraError, match=r"m.lora_A.weight: the export has the slices of experts \[0\], not all 3"):
        list(join_expert_slices([("m.lora_A.weight[0]", torch.zeros(2, 5))], experts))


def test_mtp_layers_and_their_embedding_copies_are_never_targets():
    """With DeepSeek-V3's MTP block built, the MTP layer's linears (which transformers and peft do not have) and the
    embedding / output layer (stored twice, a ``CopiedMapping``) are not adapted."""
    from bridge.lora import adaptable_linears

    model_bridge = bridge_for(tiny_config("deepseek_v3", architectures=["DeepseekV3ForCausalLM"], num_nextn_predict_layers=1))
    mtp = model_bridge.with_mtp_layers()
    linears = adaptable_linears(mtp.mapping_registry(), mtp.hf_module_paths, mtp.hf_not_in_transformers)
    assert not [linear.module for linear in linears if linear.module.startswith("mtp.")]
    targets = {role.target for linear in linears for role in linear.roles}
    assert targets == {role.target for linear in adaptable_linears(model_bridge.mapping_registry()) for role in linear.roles}
    assert not targets & {"embed_tokens", "lm_head", "head", "eh_proj"}


def test_image_text_targets_are_named_by_transformers_module_paths():
    """Gemma 3 image-text stores ``language_model.model.layers.*`` but transformers (and so peft) holds
    ``model.language_model.layers.*``; the output layer and the vision tower are never targets."""
    from transformers import Gemma3Config

    model_bridge = bridge_for(Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]))
    registry, paths = model_bridge.mapping_registry(), model_bridge.hf_module_paths
    (o_proj,) = resolve_targets(registry, ("o_proj",), "Gemma3ForConditionalGeneration", paths)
    assert o_proj.mapping.hf_names == ["language_model.model.layers.*.self_attn.o_proj.weight"]
    assert o_proj.roles[0].peft_name("B") == "base_model.model.model.language_model.layers.*.self_attn.o_proj.lora_B.weight"
    assert LoraConfig(r=R, alpha=ALPHA, targets=["o_proj"]).peft_config("base", model_bridge.peft_exclude_modules)["exclude_modules"]


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_fused_qkv_rows_of_each_role_follow_megatrons_interleaved_groups(tp_rank):
    """4 heads of dim 2 in 2 groups at TP2: each rank holds one group, [q q k v] rows (q: 2 heads × 2 rows)."""
    ctx = MappingContext(
        tp_rank=tp_rank, tp_size=2, num_attention_heads=4, num_query_groups=2, head_dim=2, vocab_size=8, padded_vocab_size=8
    )
    mapping = QKVMapping("qkv.weight", q="q", k="k", v="v")
    rows = {found.target: found.positions.tolist() for found in column_role_rows(mapping, ctx, 8, {"q": "q_proj", "v": "v_proj"})}
    assert rows == {"q_proj": [0, 1, 2, 3], "v_proj": [6, 7]}


def test_peft_settings_that_change_the_update_are_refused():
    doc = LoraConfig(r=4, alpha=8, targets=["q_proj"]).peft_config("base")
    assert LoraConfig.from_peft_config(doc, "cfg") == LoraConfig(r=4, alpha=8, targets=["q_proj"])
    for key, value in [("use_dora", True), ("use_rslora", True), ("bias", "all"), ("modules_to_save", ["lm_head"])]:
        with pytest.raises(LoraError, match=f"{key}="):
            LoraConfig.from_peft_config({**doc, key: value}, "cfg")
    with pytest.raises(LoraError, match="regular expression"):
        LoraConfig.from_peft_config({**doc, "target_modules": ".*proj"}, "cfg")
    experts = LoraConfig(r=4, alpha=8, targets=[], target_parameters=["experts.down_proj"])
    assert experts.peft_config("base")["target_parameters"] == ["experts.down_proj"]
    assert LoraConfig.from_peft_config(experts.peft_config("base"), "cfg") == experts
    with pytest.raises(LoraError, match="dropout=0.1 with target_parameters"):
        LoraConfig(r=4, alpha=8, targets=["q_proj"], target_parameters=["experts.down_proj"], dropout=0.1)


# ---------------------------------------------------------------- distributed: one session per world size


def lora_session(
    checkpoint: str,
    moe_checkpoint: str,
    image_text_checkpoint: str,
    fused_checkpoint: str,
    peft_adapters: dict[str, str],
    root: str,
    tokens: torch.Tensor,
) -> dict:
    """Every LoRA case on this rank at the world size's layout (``LAYOUTS``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from bridge import AutoBridge
    from bridge.checks.forward import megatron_logits
    from bridge.lora import (
        apply_lora,
        load_peft_adapter,
        lora_config_of,
        save_merged_hf_pretrained,
        save_peft_adapter,
    )

    tp, pp = LAYOUTS[dist.get_world_size()]
    out = Path(root) / f"tp{tp}pp{pp}"

    def fresh(folder: str = checkpoint, layout: dict | None = None):
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(folder, dtype=torch.float32)
        return bridge, bridge.to_megatron_model(**(layout or dict(tp=tp, pp=pp)))

    def logits_of(model, bridge) -> dict:
        logits = megatron_logits(model, tokens, bridge.model_bridge.vocab_size)
        holder = logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
        return {"logits": logits} if holder and parallel_state.get_data_parallel_rank() == 0 else {}

    def run_case(case: tuple[str, str]) -> dict:
        kind, name = case
        if kind in ("experts", "experts_import"):  # attention and routed-expert adapters on Mixtral
            bridge, model = fresh(moe_checkpoint, MOE_LAYOUTS[dist.get_world_size()][name])
            if kind == "experts_import":
                load_peft_adapter(model, bridge, peft_adapters["experts"])
                save_peft_adapter(model, bridge, out / f"experts-{name}-reexport")
                return logits_of(model, bridge)
            apply_lora(model, bridge, EXPERT_CONFIG, seed=SEED, b_std=B_STD)
            result = logits_of(model, bridge)
            save_peft_adapter(model, bridge, out / f"experts-{name}-adapter")
            save_merged_hf_pretrained(model, bridge, out / f"experts-{name}-merged32", dtype=torch.float32)
            return {**result, **adapter_step(model, tokens)}
        bridge, model = fresh({"moe": moe_checkpoint, "image_text": image_text_checkpoint, "fused": fused_checkpoint}.get(kind, checkpoint))
        if kind == "fused":  # Phi-3: one adapter over each fused module (qkv_proj, gate_up_proj), as peft makes it
            if name == "import":
                load_peft_adapter(model, bridge, peft_adapters["fused"])
            else:
                apply_lora(model, bridge, LoraConfig(r=R, alpha=ALPHA, targets=FUSED_TARGETS), seed=SEED, b_std=B_STD)
                save_merged_hf_pretrained(model, bridge, out / "fused-merged32", dtype=torch.float32)
            save_peft_adapter(model, bridge, out / f"fused-{name}-adapter")
            return logits_of(model, bridge)
        if kind == "image_text":  # Gemma 3 image-text: adapters on its text model, named as transformers' modules
            if name == "import":
                load_peft_adapter(model, bridge, peft_adapters["image_text"])
            else:
                apply_lora(model, bridge, LoraConfig(r=R, alpha=ALPHA, targets=TARGETS["qv"]), seed=SEED, b_std=B_STD)
            save_peft_adapter(model, bridge, out / f"image-text-{name}-adapter")
            return logits_of(model, bridge)
        if kind == "moe":  # attention adapters on an MoE model: at TP > 1 Megatron's MoE runs with sequence parallelism
            apply_lora(model, bridge, LoraConfig(r=R, alpha=ALPHA, targets=MOE_TARGETS), seed=SEED, b_std=B_STD)
            save_peft_adapter(model, bridge, out / "moe-adapter")
            return logits_of(model, bridge)
        if kind == "apply":
            apply_lora(model, bridge, LoraConfig(r=R, alpha=ALPHA, targets=TARGETS[name]), seed=SEED, b_std=B_STD)
            result = logits_of(model, bridge)
            save_peft_adapter(model, bridge, out / f"{name}-adapter")
            save_merged_hf_pretrained(model, bridge, out / f"{name}-merged32", dtype=torch.float32)
            save_merged_hf_pretrained(model, bridge, out / f"{name}-merged")
            streamed = {key: value.clone() for key, value in bridge.export_hf_weights(model, adapters_only=True)}
            if dist.get_rank() == 0:
                result["streamed"] = streamed
            return result
        if kind == "import":
            load_peft_adapter(model, bridge, peft_adapters[name])
            result = logits_of(model, bridge)
            save_peft_adapter(model, bridge, out / f"{name}-reexport")
            return result
        if kind == "bad_adapter":
            try:
                load_peft_adapter(model, bridge, peft_adapters[name])
            except Exception as err:  # the test reads the message
                return {"error": (type(err).__name__, str(err)), "has_adapters": lora_config_of(model) is not None}
            return {"error": None}
        apply_lora(model, bridge, LoraConfig(r=R, alpha=ALPHA, targets=ALL_LINEARS), seed=SEED, b_std=B_STD)
        return adapter_step(model, tokens)

    cases = (
        [("apply", name) for name in TARGETS]
        + [("import", name) for name in TARGETS]
        + [("bad_adapter", "rank8"), ("train", ""), ("moe", ""), ("image_text", "apply"), ("image_text", "import")]
        + [("fused", "apply"), ("fused", "import")]
        + [(kind, name) for name in MOE_LAYOUTS[dist.get_world_size()] for kind in ("experts", "experts_import")]
    )
    return run_cases(cases, run_case)


def adapter_step(model, tokens: torch.Tensor) -> dict:
    """One forward/backward through Megatron's schedule and one Adam step on the adapters: what changed, what has grads.

    The micro-batches (one per sequence) are dealt out over the DP ranks; the adapters' gradients are then summed as
    Megatron-Core's ``finalize_model_grads`` and DDP would (over TP where sequence-parallel, over (expert) DP).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bridge.lora import adapter_parameters
    from bridge.megatron.chunks import global_names, unwrap_chunks

    (chunk,) = unwrap_chunks(model)
    base = {name: param.detach().clone() for name, param in chunk.named_parameters() if "lora_" not in name}
    adapters = {name: param.detach().clone() for name, param in chunk.named_parameters() if "lora_" in name}
    optimizer = torch.optim.Adam(adapter_parameters(model), lr=1e-2)
    seq = tokens.shape[1]
    micro = list(tokens.split(1))[parallel_state.get_data_parallel_rank() :: parallel_state.get_data_parallel_world_size()]
    position_ids = torch.arange(seq).unsqueeze(0)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)

    def forward_step(data_iterator, module):
        ids = next(data_iterator)
        output = module(ids, position_ids, causal, labels=ids)
        return output, lambda loss: (loss.float().mean(), {})

    chunk.train()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=chunk,
        num_microbatches=len(micro),
        seq_length=seq,
        micro_batch_size=1,
        forward_only=False,
    )
    for param in adapter_parameters(model):  # as finalize_model_grads and DDP (without its average over DP)
        if param.grad is None:
            continue
        if getattr(param, "sequence_parallel", False):  # summed over TP
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        routed = not getattr(param, "allreduce", True)  # a routed expert's at EP > 1: summed over expert DP, the rest over DP
        group = parallel_state.get_expert_data_parallel_group() if routed else parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(param.grad, group=group)
    grads = {name: param.grad is not None for name, param in chunk.named_parameters()}
    has_gradient = {name: param.grad is not None and bool(param.grad.any()) for name, param in chunk.named_parameters()}
    names = global_names(chunk)
    first_layer = {  # the adapters' gradients in layer 0, by global name, to compare across layouts
        names[name]: param.grad.clone()
        for name, param in chunk.named_parameters()
        if param.grad is not None and names[name].startswith("decoder.layers.0.")
    }
    optimizer.step()
    params = dict(chunk.named_parameters())
    return {
        "base_unchanged": all(torch.equal(params[name].detach(), value) for name, value in base.items()),
        "base_requires_grad": [name for name in base if params[name].requires_grad],
        "grads": grads,
        "adapters_unchanged": [name for name, value in adapters.items() if torch.equal(params[name].detach(), value)],
        "adapters_without_gradient": [name for name in adapters if not has_gradient[name]],
        "adapter_count": len(adapters),
        "optimizer_params": sum(len(group["params"]) for group in optimizer.param_groups),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "etp_rank": parallel_state.get_expert_tensor_parallel_rank(),
        "etp_size": parallel_state.get_expert_tensor_parallel_world_size(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "first_layer_grads": first_layer,
    }


def _peft_adapter(
    checkpoint: Path, folder: Path, targets: tuple[str, ...], r: int = R, exclude: str | None = None, parameters: tuple[str, ...] = ()
) -> Path:
    """An adapter made by peft on transformers (B drawn non-zero), saved with ``save_pretrained``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    config = PeftLoraConfig(
        r=r,
        lora_alpha=ALPHA,
        target_modules=list(targets),
        exclude_modules=exclude,
        target_parameters=list(parameters) or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, B_STD)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_inputs(tiny_checkpoints, tiny_moe_checkpoints, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    checkpoint = tiny_checkpoints["llama"]
    adapters = {name: _peft_adapter(checkpoint, root / f"peft-{name}", targets) for name, targets in TARGETS.items()}
    rank8 = _peft_adapter(checkpoint, root / "peft-rank8", TARGETS["qv"], r=8)  # its config then says r=4: shapes disagree
    config = json.loads((rank8 / "adapter_config.json").read_text())
    (rank8 / "adapter_config.json").write_text(json.dumps({**config, "r": R}))
    adapters["rank8"] = rank8
    image_text = tiny_checkpoints["gemma3-vision"]  # a user's own exclusion of the vision tower: another regex than the bridge's
    adapters["image_text"] = _peft_adapter(image_text, root / "peft-image-text", ALL_LINEARS, exclude=r".*vision_tower.*|.*projector.*")
    fused = tiny_checkpoints["phi3"]
    adapters["fused"] = _peft_adapter(fused, root / "peft-fused", FUSED_TARGETS)
    moe = tiny_moe_checkpoints["mixtral"]
    adapters["experts"] = _peft_adapter(moe, root / "peft-experts", ("q_proj", "v_proj"), parameters=EXPERT_PARAMETERS)
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
    return {
        "checkpoint": checkpoint,
        "moe": moe,
        "image_text": image_text,
        "fused": fused,
        "adapters": adapters,
        "root": root / "out",
        "tokens": tokens,
    }


@pytest.fixture(scope="module", params=sorted(LAYOUTS), ids=lambda world: "tp{}-pp{}".format(*LAYOUTS[world]))
def session(request, lora_inputs) -> dict:
    world = request.param
    results = run_distributed(
        lora_session,
        world,
        str(lora_inputs["checkpoint"]),
        str(lora_inputs["moe"]),
        str(lora_inputs["image_text"]),
        str(lora_inputs["fused"]),
        {k: str(v) for k, v in lora_inputs["adapters"].items()},
        str(lora_inputs["root"]),
        lora_inputs["tokens"],
    )
    tp, pp = LAYOUTS[world]
    _TRAIN_GRADS[world] = [result for result in case_results(results, ("train", "")) if result["pp_rank"] == 0]
    for layout in MOE_LAYOUTS[world]:
        _EXPERT_GRADS[layout] = [result for result in case_results(results, ("experts", layout)) if result["pp_rank"] == 0]
    return {"results": results, "out": lora_inputs["root"] / f"tp{tp}pp{pp}", "world": world, **lora_inputs}


def _held(results: list, case: tuple, key: str):
    (value,) = [result[key] for result in case_results(results, case) if key in result]
    return value


def _peft_model(checkpoint: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), adapter).eval()


def _peft_logits(checkpoint: Path, adapter: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _peft_model(checkpoint, adapter)(tokens).logits


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.distributed
@pytest.mark.parametrize("targets", list(TARGETS))
def test_forward_with_adapters_equals_peft_on_transformers(session, targets):
    ours = _held(session["results"], ("apply", targets), "logits")
    theirs = _peft_logits(session["checkpoint"], session["out"] / f"{targets}-adapter", session["tokens"])
    diff = (ours - theirs).abs().max().item()
    print(f"LoRA logits {session['out'].name} {targets}: max abs diff {diff:.3g}")
    assert diff <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.distributed
@pytest.mark.parametrize("targets", list(TARGETS))
def test_exported_adapter_folder_is_what_peft_writes(session, targets):
    folder = session["out"] / f"{targets}-adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", R, ALPHA)
    assert config["target_modules"] == sorted(TARGETS[targets])
    tensors = load_file(folder / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * len(TARGETS[targets]) * 4
    streamed = _held(session["results"], ("apply", targets), "streamed")  # adapters_only streaming: the same pairs
    assert streamed.keys() == tensors.keys() and all(torch.equal(streamed[k], tensors[k]) for k in tensors)


@pytest.mark.distributed
@pytest.mark.parametrize("targets", list(TARGETS))
def test_merged_export_equals_peft_merge_and_unload(session, targets):
    merged = _peft_model(session["checkpoint"], session["out"] / f"{targets}-adapter").merge_and_unload().state_dict()
    fp32 = _folder_tensors(session["out"] / f"{targets}-merged32")
    assert all(torch.equal(fp32[name], merged[name]) for name in fp32), "fp32 merge differs from peft's"
    stored = _folder_tensors(session["out"] / f"{targets}-merged")  # the source's bf16: peft's fp32 merge rounded once
    assert all(stored[name].dtype == torch.bfloat16 and torch.equal(stored[name], merged[name].to(torch.bfloat16)) for name in stored)


@pytest.mark.distributed
@pytest.mark.parametrize("targets", list(TARGETS))
def test_imported_peft_adapter_exports_byte_identical_and_matches_peft(session, targets):
    source = session["adapters"][targets]
    again = session["out"] / f"{targets}-reexport"
    theirs, ours = load_file(source / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].numpy().tobytes() == theirs[k].numpy().tobytes() for k in ours)
    a, b = (json.loads((folder / "adapter_config.json").read_text()) for folder in (source, again))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "bias", "fan_in_fan_out"):
        assert a[key] == b[key], key
    assert sorted(a["target_modules"]) == b["target_modules"]
    assert Path(a["base_model_name_or_path"]).resolve() == Path(b["base_model_name_or_path"]).resolve()
    logits = _held(session["results"], ("import", targets), "logits")
    diff = (logits - _peft_logits(session["checkpoint"], source, session["tokens"])).abs().max().item()
    print(f"LoRA logits {session['out'].name} imported {targets}: max abs diff {diff:.3g}")
    assert diff <= 1e-4


@pytest.mark.distributed
def test_an_adapter_whose_shapes_disagree_with_its_config_is_named(session):
    (result, *_) = case_results(session["results"], ("bad_adapter", "rank8"))
    kind, message = result["error"]
    assert kind == "CheckpointError" and re.search(
        r"wrong shapes: .*q_proj\.lora_A\.weight .* is \[8, 64\], the model needs \[4, 64\]", message
    )
    assert not result["has_adapters"]


@pytest.mark.distributed
def test_only_adapters_train_and_the_base_stays_bit_identical(session):
    for result in case_results(session["results"], ("train", "")):
        assert result["base_unchanged"] and not result["base_requires_grad"]
        assert {name for name, has in result["grads"].items() if has} == {name for name in result["grads"] if "lora_" in name}
        assert result["adapters_unchanged"] == [] and result["adapter_count"] == result["optimizer_params"] > 0


@pytest.mark.distributed
def test_attention_adapters_on_an_moe_model_equal_peft_with_and_without_sequence_parallelism(session):
    ours = _held(session["results"], ("moe", ""), "logits")
    theirs = _peft_logits(session["moe"], session["out"] / "moe-adapter", session["tokens"])
    diff = (ours - theirs).abs().max().item()
    print(f"LoRA logits {session['out'].name} mixtral attention: max abs diff {diff:.3g}")
    assert diff <= 1e-4 and torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.distributed
def test_adapter_gradients_at_tp2_pp2_are_the_tp1_gradients_split_like_the_adapters(session):
    """Same seed, same tokens: replicated adapters (A of a column-parallel linear, B of a row-parallel one) get the whole
    TP1 gradient on every TP rank, split ones (B column-parallel, A row-parallel) their slice of it."""
    if session["out"].name == "tp1pp1" or 1 not in _TRAIN_GRADS:
        pytest.skip("compares the TP2·PP2 session with the TP1 one (run both)")
    (tp1,) = _TRAIN_GRADS[1]
    whole = tp1["first_layer_grads"]
    assert len(whole) == 2 * len(ALL_LINEARS)
    for result in _TRAIN_GRADS[4]:
        t = result["tp_rank"]
        assert result["first_layer_grads"].keys() == whole.keys()
        for name, grad in result["first_layer_grads"].items():
            full = whole[name]
            expected = full if grad.shape == full.shape else full.chunk(2, dim=0 if grad.shape[0] != full.shape[0] else 1)[t]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_image_text_adapters_equal_peft_and_import_back_byte_identical(session):
    """Gemma 3 image-text: adapters on the text model equal peft on Gemma3ForConditionalGeneration; the folder names
    transformers' modules and excludes the vision tower; a peft-made adapter imports, matches and exports byte-identical."""
    out, checkpoint, tokens = session["out"], session["image_text"], session["tokens"]
    for case, adapter in (("apply", out / "image-text-apply-adapter"), ("import", session["adapters"]["image_text"])):
        ours = _held(session["results"], ("image_text", case), "logits")
        theirs = _peft_logits(checkpoint, adapter, tokens)
        diff = (ours - theirs).abs().max().item()
        print(f"LoRA logits {out.name} gemma3 image-text {case}: max abs diff {diff:.3g}")
        assert diff <= 1e-4 and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    written = load_file(out / "image-text-apply-adapter" / "adapter_model.safetensors")
    assert written and all(name.startswith("base_model.model.model.language_model.layers.") for name in written)
    assert json.loads((out / "image-text-apply-adapter" / "adapter_config.json").read_text())["exclude_modules"]
    source, again = session["adapters"]["image_text"], out / "image-text-import-adapter"
    theirs, ours = load_file(source / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].numpy().tobytes() == theirs[k].numpy().tobytes() for k in ours)
    a, b = (json.loads((folder / "adapter_config.json").read_text()) for folder in (source, again))
    assert a["exclude_modules"] == b["exclude_modules"]


MOE_LAYOUT_NAMES = [name for layouts in MOE_LAYOUTS.values() for name in layouts]


def _moe_layout(session, layout: str) -> None:
    if layout not in MOE_LAYOUTS[session["world"]]:
        pytest.skip(f"{layout} runs in the other session")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", MOE_LAYOUT_NAMES)
def test_expert_adapters_equal_peft_and_export_as_peft_writes_them(session, layout):
    """Attention and routed-expert adapters (``target_parameters``) on Mixtral equal peft on transformers 5's stacked
    experts, at expert TP, EP and both; the folder holds peft's nested, stacked expert tensors."""
    _moe_layout(session, layout)
    folder = session["out"] / f"experts-{layout}-adapter"
    ours = _held(session["results"], ("experts", layout), "logits")
    theirs = _peft_logits(session["moe"], folder, session["tokens"])
    diff = (ours - theirs).abs().max().item()
    print(f"LoRA logits mixtral experts {layout}: max abs diff {diff:.3g}")
    assert diff <= 1e-4 and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["target_parameters"] == list(EXPERT_PARAMETERS) and config["target_modules"] == sorted(MOE_TARGETS)
    tensors = load_file(folder / "adapter_model.safetensors")
    experts = "base_model.model.model.layers.1.mlp.experts."
    shapes = {name.removeprefix(experts): list(tensors[name].shape) for name in tensors if name.startswith(experts)}
    assert shapes == {  # 4 experts, hidden 64, intermediate 32
        "base_layer.lora_A.weight": [4 * R, 64],
        "base_layer.lora_B.weight": [64, 4 * R],
        "lora_A.weight": [4 * R, 32],
        "lora_B.weight": [64, 4 * R],
    }


@pytest.mark.distributed
@pytest.mark.parametrize("layout", MOE_LAYOUT_NAMES)
def test_expert_adapters_merge_as_peft_merge_and_unload(session, layout):
    """The merged fp32 export, loaded by transformers (which stacks the experts), equals peft's ``merge_and_unload``."""
    from transformers import AutoModelForCausalLM

    _moe_layout(session, layout)
    merged = _peft_model(session["moe"], session["out"] / f"experts-{layout}-adapter").merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(session["out"] / f"experts-{layout}-merged32", dtype=torch.float32).state_dict()
    assert ours.keys() == merged.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], merged[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", MOE_LAYOUT_NAMES)
def test_peft_expert_adapter_imports_matches_peft_and_exports_byte_identical(session, layout):
    _moe_layout(session, layout)
    source, again = session["adapters"]["experts"], session["out"] / f"experts-{layout}-reexport"
    theirs, ours = load_file(source / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and any(".mlp.experts.base_layer.lora_B." in name for name in ours)
    assert all(ours[k].dtype == theirs[k].dtype and ours[k].numpy().tobytes() == theirs[k].numpy().tobytes() for k in ours)
    logits = _held(session["results"], ("experts_import", layout), "logits")
    diff = (logits - _peft_logits(session["moe"], source, session["tokens"])).abs().max().item()
    print(f"LoRA logits mixtral imported experts {layout}: max abs diff {diff:.3g}")
    assert diff <= 1e-4


def _expected_grad(name: str, full: torch.Tensor, grad: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """``full`` (the TP1 gradient) as the rank ``rank`` of ``size`` holds it: whole, or split like its adapter matrix."""
    if grad.shape == full.shape:
        return full
    if name.endswith("linear_fc1.lora.lora_B.gate_up_proj"):  # this rank's gate rows, then its up rows
        return torch.cat([part.chunk(size)[rank] for part in full.chunk(2)])
    return full.chunk(size, dim=0 if grad.shape[0] != full.shape[0] else 1)[rank]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [name for name in MOE_LAYOUT_NAMES if name not in MOE_LAYOUTS[1]])
def test_expert_adapter_gradients_are_the_tp1_gradients_at_every_layout(session, layout):
    """Same seed and tokens: every adapter's gradient (a routed expert's replicated matrix summed over expert TP in the
    backward pass) equals the TP1 one, split like the adapter, at expert TP, EP over DP ranks and EP over TP ranks.
    The base stays frozen."""
    _moe_layout(session, layout)
    (tp1,) = _EXPERT_GRADS.get("tp1") or pytest.skip("compares with the TP1 session (run both)")
    whole = tp1["first_layer_grads"]
    assert len(whole) == 2 * (4 + 2 * 4)  # q, k, v, o; 4 experts' fc1, fc2
    seen = set()
    for result in _EXPERT_GRADS[layout]:
        assert result["base_unchanged"] and result["adapter_count"] == result["optimizer_params"]
        # the tiny random model routes no token to some experts of its last layer: only those adapters have no gradient
        assert result["adapters_unchanged"] == result["adapters_without_gradient"]
        for name, grad in result["first_layer_grads"].items():
            expert = ".local_experts." in name
            rank, size = (result["etp_rank"], result["etp_size"]) if expert else (result["tp_rank"], result["tp_size"])
            # the schedule divides each micro-batch's loss by the micro-batches a rank runs, 1/dp of TP1's: summed over
            # (expert) DP, each gradient is dp times TP1's (DDP's average divides it back)
            full = whole[name] * result["dp_size"]
            torch.testing.assert_close(grad, _expected_grad(name, full, grad, rank, size), rtol=1e-4, atol=1e-6, msg=name)
            seen.add(name)
    assert {name for name in whole if ".local_experts." in name} <= seen


@pytest.mark.distributed
def test_fused_module_adapters_equal_peft_merge_and_import_back_byte_identical(session):
    """Phi-3 stores q/k/v and gate/up fused (``qkv_proj``, ``gate_up_proj``), and peft adapts each fused module with one
    A and B: B's rows follow the weight's (Megatron's query groups, this rank's gate then up rows) at every layout."""
    out, checkpoint, tokens = session["out"], session["fused"], session["tokens"]
    for case, adapter in (("apply", out / "fused-apply-adapter"), ("import", session["adapters"]["fused"])):
        ours = _held(session["results"], ("fused", case), "logits")
        theirs = _peft_logits(checkpoint, adapter, tokens)
        diff = (ours - theirs).abs().max().item()
        print(f"LoRA logits {out.name} phi3 fused {case}: max abs diff {diff:.3g}")
        assert diff <= 1e-4 and torch.equal(ours.argmax(-1), theirs.argmax(-1))
    written = load_file(out / "fused-apply-adapter" / "adapter_model.safetensors")
    assert list(written["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"].shape) == [64 + 2 * 32, R]
    merged = _peft_model(checkpoint, out / "fused-apply-adapter").merge_and_unload().state_dict()
    fp32 = _folder_tensors(out / "fused-merged32")
    assert all(torch.equal(fp32[name], merged[name]) for name in fp32), "fp32 merge differs from peft's"
    source, again = session["adapters"]["fused"], out / "fused-import-adapter"
    theirs, ours = load_file(source / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].numpy().tobytes() == theirs[k].numpy().tobytes() for k in ours)
