"""Multi-token-prediction layers built as Megatron-Core's MTP block (``AutoBridge.from_hf_pretrained(mtp=True)``).

Tiny DeepSeek-V3 and GLM-4.5 checkpoints with one MTP layer as released (``tests.edited_checkpoints.with_mtp_layer``:
``model.layers.4.*``, ``enorm``/``hnorm``/``eh_proj``/``shared_head``, the embedding and output layer again), fp32,
on four gloo ranks at TP2·EP2 (sequence parallel), PP2·EP2 (the MTP block and its copy of the embedding on the
last stage) and PP2·VPP2:

- every MTP parameter holds its independently computed slice (``tests.checks.expected_shard``) and the export
  gives the checkpoint back bit for bit, the MTP layer now written from Megatron-Core's parameters;
- the MTP head's logits equal a reference built from transformers' own modules: the checkpoint loaded with one
  more decoder layer (the MTP layer's), fed ``eh_proj([enorm(embed(next tokens)), hnorm(main hidden states)])``,
  then ``shared_head.norm`` and the output layer (fp32, ≤ 1e-4);
- the main model's logits are unchanged by the MTP block;
- a checkpoint whose MTP ``embed_tokens`` copy differs from the model's, and ``mtp=True`` on a checkpoint
  without MTP layers, are refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bridge.runtime.local_launch import run_distributed
from tests.case_matrix import case_results, run_cases
from tests.edited_checkpoints import edited_copy, with_mtp_layer
from tests.tiny_checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.distributed

NAMES = ("deepseek_v3", "glm4_moe")
LAYOUTS = {"tp2-ep2": dict(tp=2, ep=2), "pp2-ep2": dict(pp=2, ep=2), "pp2-vpp2": dict(pp=2, vpp=2)}
TOKENS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(3))


def mtp_session(checkpoints: dict[str, str], out_root: str, tokens: torch.Tensor) -> dict:
    """Each (model, layout) case on this rank: shard problems, the export's differences, MTP and main logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from bridge import AutoBridge
    from bridge.checks.forward import megatron_logits
    from bridge.checks.verify import compare_hf_folders, load_hf_tensors
    from bridge.megatron.chunks import global_names, unwrap_chunks
    from tests.checks import check_model_shards

    def run_case(case: tuple[str, str]) -> dict:
        name, layout = case
        parallel_state.destroy_model_parallel()
        bridge = AutoBridge.from_hf_pretrained(checkpoints[name], dtype=torch.float32, mtp=True)
        model = bridge.to_megatron_model(**LAYOUTS[layout])
        chunks = unwrap_chunks(model)
        shard_problems, _ = check_model_shards(model, bridge, load_hf_tensors(checkpoints[name]))
        result: dict = {
            "shards": shard_problems,
            "mtp_params": sum(name.startswith("mtp.") for chunk in chunks for name in global_names(chunk).values()),
            "main": megatron_logits(model, tokens, bridge.model_bridge.vocab_size),
            "mtp": _mtp_logits(chunks, tokens, bridge.model_bridge.vocab_size, gather_from_tensor_model_parallel_region),
        }
        out = Path(out_root) / f"{name}-{layout}"
        bridge.save_hf_pretrained(model, out)
        if dist.get_rank() == 0:
            result["roundtrip"] = compare_hf_folders(checkpoints[name], out)
        return result

    cases = [(name, layout) for name in checkpoints for layout in LAYOUTS]
    return run_cases(cases, run_case)


def _mtp_logits(chunks, tokens: torch.Tensor, vocab_size: int, gather) -> torch.Tensor | None:
    """The MTP head's logits ``[batch, seq, vocab]`` on the last stage (None elsewhere): the first of the output layer's
    two calls in a forward with labels (Megatron-Core computes the MTP loss before the main logits), one sequence
    per micro-batch through Megatron-Core's schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq = tokens.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1).view(1, 1, seq, seq)
    calls: list[torch.Tensor] = []
    last = chunks[-1]
    # a copy: the loss that follows works on the logits in place
    hook = last.output_layer.register_forward_hook(lambda _m, _a, out: calls.append(out[0].detach().clone())) if last.post_process else None

    def forward_step(data_iterator, chunk):
        ids = next(data_iterator)
        labels = torch.roll(ids, -1, dims=1)
        return chunk(ids, position_ids, causal, labels=labels), lambda loss: (loss.sum(), {})

    for chunk in chunks:
        chunk.eval()
    micro = list(tokens.split(1))
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro),
            seq_length=seq,
            micro_batch_size=1,
            forward_only=True,
        )
    if hook is None:
        return None
    hook.remove()
    if not parallel_state.is_pipeline_last_stage():
        return None
    mtp = torch.cat([gather(calls[i]) for i in range(0, len(calls), 2)], dim=1)  # [seq, batch, vocab]
    return mtp.transpose(0, 1)[..., :vocab_size].float()


def _reference_mtp_logits(checkpoint: Path, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(main logits, MTP logits) from transformers: the MTP layer is decoder layer ``num_hidden_layers`` of the same
    checkpoint loaded with one more layer; its own norms and projection applied as the released MTP module does."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint)
    last = config.num_hidden_layers
    fields = {k: v for k, v in config.to_dict().items() if not (isinstance(v, list) and len(v) == last)}  # per-layer lists
    deeper_config = type(config)(**{**fields, "num_hidden_layers": last + 1})
    main = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    deeper = AutoModelForCausalLM.from_pretrained(checkpoint, config=deeper_config, dtype=torch.float32, attn_implementation="eager")
    deeper.eval()
    hf = {k: v.float() for f in sorted(checkpoint.glob("*.safetensors")) for k, v in load_file(f).items()}
    p = f"model.layers.{last}."

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps))

    batch, seq = tokens.shape
    with torch.no_grad():
        logits = main(tokens).logits
        hidden = main.model(tokens).last_hidden_state  # after the final norm, as Megatron-Core hands it to the MTP block
        following = torch.cat([tokens[:, 1:], torch.zeros(batch, 1, dtype=tokens.dtype)], dim=1)  # Megatron's roll: 0 last
        embedded = main.model.embed_tokens(following)
        x = torch.cat([rms(embedded, hf[p + "enorm.weight"]), rms(hidden, hf[p + "hnorm.weight"])], dim=-1) @ hf[p + "eh_proj.weight"].T
        positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        causal = torch.full((seq, seq), float("-inf")).triu(1).expand(batch, 1, seq, seq)
        out = deeper.model.layers[last](
            x, attention_mask=causal, position_ids=positions, position_embeddings=deeper.model.rotary_emb(x, positions)
        )
        out = out[0] if isinstance(out, tuple) else out
        mtp = rms(out, hf[p + "shared_head.norm.weight"]) @ hf[p + "shared_head.head.weight"].T
    return logits, mtp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mtp")
    return {name: with_mtp_layer(build_tiny_checkpoint(name, root / f"{name}-plain", dtype=torch.float32), root / name) for name in NAMES}


@pytest.fixture(scope="module")
def session(checkpoints, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mtp-out")
    return run_distributed(mtp_session, 4, {k: str(v) for k, v in checkpoints.items()}, str(out), TOKENS)


def _held(results: list, case: tuple, key: str):
    """The value of ``key`` from the first rank that has one (the last stage's ranks all hold the logits)."""
    return next(result[key] for result in case_results(results, case) if result.get(key) is not None)


CASES = [pytest.param(name, layout, id=f"{name}-{layout}") for name in NAMES for layout in LAYOUTS]


@pytest.mark.parametrize("name,layout", CASES)
def test_mtp_parameters_hold_their_slices_and_export_bit_exact(session, name, layout):
    results = case_results(session, (name, layout))
    assert all(result["shards"] == [] for result in results), [result["shards"] for result in results]
    assert sum(result["mtp_params"] for result in results) > 0
    assert _held(session, (name, layout), "roundtrip") == []


@pytest.mark.parametrize("name,layout", CASES)
def test_mtp_logits_equal_transformers_modules(session, checkpoints, name, layout):
    main, mtp = _reference_mtp_logits(checkpoints[name], TOKENS)
    ours_main, ours_mtp = _held(session, (name, layout), "main"), _held(session, (name, layout), "mtp")
    diff = (ours_mtp - mtp).abs().max().item()
    print(f"MTP logits {name} {layout}: max abs diff {diff:.3g}")
    assert diff <= 1e-4 and torch.equal(ours_mtp.argmax(-1), mtp.argmax(-1))
    assert (ours_main - main).abs().max().item() <= 1e-4  # the MTP block leaves the main model's logits as they were


def test_mtp_on_a_checkpoint_without_mtp_layers_is_refused_by_name(tmp_path):
    from bridge import AutoBridge
    from bridge.model_bridge import UnsupportedArchitectureError

    plain = build_tiny_checkpoint("deepseek_v3", tmp_path / "plain", num_nextn_predict_layers=0)
    with pytest.raises(UnsupportedArchitectureError, match=r"num_nextn_predict_layers=0 .* no multi-token-prediction layers"):
        AutoBridge.from_hf_pretrained(plain, mtp=True)


def _run_load(src: str) -> None:
    from bridge import AutoBridge

    AutoBridge.from_hf_pretrained(src, mtp=True).to_megatron_model()


def test_an_mtp_embedding_copy_that_differs_is_refused_by_name(checkpoints, tmp_path):
    def perturb(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.4.embed_tokens.weight"] = tensors["model.layers.4.embed_tokens.weight"] + 1

    src = edited_copy(checkpoints["deepseek_v3"], tmp_path / "differs", perturb)
    with pytest.raises(Exception, match=re.escape("model.layers.4.embed_tokens.weight differs from model.embed_tokens.weight")):
        run_distributed(_run_load, 1, str(src))
    assert json.loads((src / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_hfmb_import_mtp_writes_the_mtp_block_and_export_reads_it_back(checkpoints, tmp_path):
    """``hfmb import --mtp`` writes ``mtp.layers.0.*`` (nothing carried); ``hfmb export`` sees them in the checkpoint and
    exports the MTP layer from them, bit for bit."""
    from bridge.checks.verify import compare_hf_folders
    from bridge.megatron.foreign_checkpoint import stored_mtp_layers
    from tests.commands import hfmb

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    for argv in (("import", str(checkpoints["glm4_moe"]), str(ckpt), "--mtp"), ("export", str(ckpt), str(out))):
        done = hfmb(*argv)
        assert done.returncode == 0, done.stdout + done.stderr
    assert stored_mtp_layers(ckpt, None) == 1 and json.loads((ckpt / "bridge.json").read_text())["carried"] == []
    assert "transformers load report: empty" in done.stdout  # the MTP layer unexpected to transformers, as released
    assert compare_hf_folders(checkpoints["glm4_moe"], out) == []
