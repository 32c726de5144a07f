"""Megatron-Core's own engine on a CPU-only torch with gloo, after `bridge.runtime.cpu_mode.enable_cpu_mode()`.

Every scenario runs in freshly spawned processes (each one calls `enable_cpu_mode()` itself), so the
pytest process is never patched and no `torch.distributed` / `parallel_state` state leaks between tests.
"""

from __future__ import annotations

import pytest
import torch

from bridge.runtime import cpu_mode
from bridge.runtime.local_launch import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode only exists on machines without CUDA")

SEED = 1234
VOCAB, SEQ, BATCH = 128, 16, 2


# --------------------------------------------------------------------------------------------
# Multi-process launcher: the project's own (``run_distributed``), with CPU mode on in every rank.
# --------------------------------------------------------------------------------------------


def _in_cpu_mode(fn, args) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    torch.set_num_threads(1)
    cpu_mode.enable_cpu_mode()
    try:
        fn(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        parallel_state.destroy_model_parallel()


def run_workers(fn, world_size: int, *args) -> None:
    """Run module-level `fn(rank, world_size, *args)` on `world_size` gloo ranks, CPU mode on."""
    run_distributed(_in_cpu_mode, world_size, fn, args)


# --------------------------------------------------------------------------------------------
# Model helpers (used inside the workers).
# --------------------------------------------------------------------------------------------


def _config(tp=1, pp=1, num_layers=4, **overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=num_layers,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        perform_initialization=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _gpt(config, tied=True, spec=None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config,
        transformer_layer_spec=spec or get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True),
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=tied,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _batch(batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch, -1)
    return ids, position_ids, labels


def _causal_mask():
    return torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]


def _init(tp=1, pp=1, **kwargs):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tp, pp, **kwargs)
    model_parallel_cuda_manual_seed(SEED)


# --------------------------------------------------------------------------------------------
# enable_cpu_mode itself.
# --------------------------------------------------------------------------------------------


def test_noop_when_cuda_available(monkeypatch):
    if cpu_mode.cpu_mode_enabled():
        pytest.skip("this process is already in CPU mode")
    current_device = torch.cuda.current_device
    modes = torch._C._len_torch_function_stack()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_mode.cuda_available()
    cpu_mode.enable_cpu_mode()
    assert not cpu_mode.cpu_mode_enabled()
    assert torch.cuda.current_device is current_device
    assert torch._C._len_torch_function_stack() == modes
    assert cpu_mode._APPLIED == []


def _rng_and_recompute_worker(rank, world_size):
    import logging

    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    # Calling it again (the bootstrap already did) changes nothing.
    applied, modes = list(cpu_mode._APPLIED), torch._C._len_torch_function_stack()
    cpu_mode.enable_cpu_mode()
    assert cpu_mode.cpu_mode_enabled()
    assert cpu_mode._APPLIED == applied and torch._C._len_torch_function_stack() == modes == 1
    assert torch.zeros(1, device="cuda").device.type == "cpu"

    _init()  # model_parallel_cuda_manual_seed works

    # The tracker forks a CPU generator state seeded like Megatron's model-parallel state and
    # gives the default generator back untouched; no "CPU RNG state changed" warning.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    expected = torch.rand(8, generator=torch.Generator().manual_seed(SEED + 2718))
    assert torch.equal(torch.cat([a, b]), expected)
    assert not records

    # Activation recomputation replays the forward inside backward, where the function mode is
    # inactive: the default and the sliding-window causal masks still have to come out on CPU,
    # and dropout must replay identically.
    ids, pos, labels = _batch()
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    for window_size in (None, (4, 0)):
        grads = []
        for extra in ({}, recompute):
            config = _config(
                num_layers=2,
                perform_initialization=True,
                attention_dropout=0.2,
                hidden_dropout=0.2,
                window_size=window_size,
                **extra,
            )
            torch.manual_seed(SEED)
            model = _gpt(config)
            model.train()
            model_parallel_cuda_manual_seed(SEED)  # the same tracker state for both runs
            torch.manual_seed(SEED + 1)
            model(ids, pos, None, labels=labels).mean().backward()
            grads.append([p.grad for p in model.parameters()])
        for g0, g1 in zip(*grads):
            torch.testing.assert_close(g0, g1, rtol=0, atol=0)


@pytest.mark.distributed
def test_enable_twice_rng_tracker_and_recompute():
    run_workers(_rng_and_recompute_worker, 1)


# --------------------------------------------------------------------------------------------
# Scenario 1: GPTModel at TP=1, and at TP=2 x PP=2 against TP=1 on the same weights.
# --------------------------------------------------------------------------------------------


def _tp1_worker(rank, world_size, out_path):
    _init()
    torch.manual_seed(SEED)
    model = _gpt(_config(perform_initialization=True))
    ids, pos, labels = _batch()

    with torch.no_grad():
        logits = model(ids, pos, _causal_mask())
        default_mask_logits = model(ids, pos, None)
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(default_mask_logits, logits, rtol=0, atol=0)

    loss = model(ids, pos, _causal_mask(), labels=labels)
    assert loss.shape == (BATCH, SEQ)
    loss.mean().backward()
    torch.save(
        {
            "state_dict": {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)},
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "logits": logits,
            "loss": loss.detach(),
        },
        out_path,
    )


@pytest.fixture(scope="module")
def tp1_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu_mode") / "tp1.pt"
    run_workers(_tp1_worker, 1, str(path))
    return path


@pytest.mark.distributed
def test_gpt_tp1_forward(tp1_reference):
    ref = torch.load(tp1_reference)
    assert ref["logits"].shape == (BATCH, SEQ, VOCAB)
    # A randomly initialised model predicts roughly uniformly.
    assert abs(ref["loss"].mean().item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0
    assert all(torch.isfinite(g).all() for g in ref["grads"].values())


_COLUMN_PARALLEL = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")
_ROW_PARALLEL = ("linear_proj.weight", "linear_fc2.weight")


def _shard(name, full, tp_rank, tp):
    """This TP rank's slice of a TP=1 tensor (Megatron's grouped-QKV layout splits on dim 0)."""
    if name.endswith("linear_fc1.weight"):  # [gate; up], each split separately
        return torch.cat([half.chunk(tp, dim=0)[tp_rank] for half in full.chunk(2, dim=0)])
    if name.endswith(_COLUMN_PARALLEL):
        return full.chunk(tp, dim=0)[tp_rank]
    if name.endswith(_ROW_PARALLEL):
        return full.chunk(tp, dim=1)[tp_rank]
    return full


def _global_name(local_name, layer_offset):
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    elif local_name == "output_layer.weight":  # the last stage's copy of the tied embedding
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


def _tp2pp2_worker(rank, world_size, ref_path):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp, pp = 2, 2
    _init(tp, pp)
    ref = torch.load(ref_path)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _config(tp, pp)
    model = _gpt(config)

    offset = pp_rank * config.num_layers // pp
    names = {}
    with torch.no_grad():
        for local_name, tensor in model.state_dict().items():
            if torch.is_tensor(tensor):
                names[local_name] = _global_name(local_name, offset)
                tensor.copy_(_shard(local_name, ref["state_dict"][names[local_name]], tp_rank, tp))

    ids, pos, labels = _batch()
    vocab_slice = slice(tp_rank * VOCAB // tp, (tp_rank + 1) * VOCAB // tp)
    seen = {}

    def forward_step(data_iterator, model):
        with_labels = next(data_iterator)
        output = model(ids, pos, None, labels=labels if with_labels else None)

        def loss_func(output_tensor):
            seen["labels" if with_labels else "logits"] = output_tensor.detach()
            loss = output_tensor.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    forward_backward = get_forward_backward_func()
    common = dict(
        forward_step_func=forward_step,
        model=[model],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
    )
    forward_backward(data_iterator=iter([False]), forward_only=True, **common)
    model.zero_grad()
    losses = forward_backward(data_iterator=iter([True]), forward_only=False, **common)

    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(seen["logits"], ref["logits"][..., vocab_slice], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(seen["labels"], ref["loss"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses[0]["loss"], ref["loss"].mean(), rtol=1e-5, atol=1e-5)
    else:
        assert not seen and not losses

    # Backward through TP and PP gives the TP=1 gradients. Megatron's finalize_model_grads (it
    # needs Megatron DDP) sums the TP-partial q/k-layernorm grads across TP, done here by hand, and
    # the two copies of the tied embedding across the first and last stage: not compared here.
    compared = 0
    for local_name, param in model.named_parameters():
        if names[local_name] == "embedding.word_embeddings.weight":
            continue
        if "q_layernorm" in local_name or "k_layernorm" in local_name:
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        expected = _shard(local_name, ref["grads"][names[local_name]], tp_rank, tp)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=local_name: f"{n}: {m}")
        compared += 1
    assert compared > 0


@pytest.mark.distributed
def test_gpt_tp2_pp2_matches_tp1(tp1_reference):
    run_workers(_tp2pp2_worker, 4, str(tp1_reference))


# --------------------------------------------------------------------------------------------
# Scenario 2: Megatron DDP + distributed Adam, one step at DP=2 against one process on the
# whole batch.
# --------------------------------------------------------------------------------------------


def _dp2_worker(rank, world_size):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _init()
    config = _config(num_layers=2, perform_initialization=True)
    config.finalize_model_grads_func = finalize_model_grads
    torch.manual_seed(SEED)
    model = _gpt(config)
    torch.manual_seed(SEED)
    reference = _gpt(_config(num_layers=2, perform_initialization=True))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)

    # A large Adam eps keeps the first update a smooth function of the gradient (with eps=1e-8 it is
    # ~lr * sign(grad), which flips on near-zero grads that differ only in summation order).
    lr, eps, clip = 1e-2, 1e-3, 1.0
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            adam_eps=eps,
            weight_decay=0.0,
            clip_grad=clip,
            use_distributed_optimizer=True,
            bf16=False,
            fp16=False,
        ),
        [ddp],
    )

    ids, pos, labels = _batch(batch=2 * BATCH)  # the global batch; each rank takes its half
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    def forward_step(data_iterator, model):
        next(data_iterator)
        output = model(ids[mine], pos[mine], None, labels=labels[mine])
        return output, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    initial = [p.detach().clone() for p in model.parameters()]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([None]),
        model=[ddp],
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful

    # The same step in one process on the whole batch, with plain torch.
    reference(ids, pos, None, labels=labels).mean().backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip)
    assert ref_norm > clip  # so Megatron's clipping path ran too
    assert grad_norm == pytest.approx(ref_norm.item(), rel=1e-5)
    torch.optim.AdamW(reference.parameters(), lr=lr, eps=eps, weight_decay=0.0).step()
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), initial):
        assert not torch.equal(p, p0), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.distributed
def test_ddp_distributed_optimizer_dp2():
    run_workers(_dp2_worker, 2)


# --------------------------------------------------------------------------------------------
# MoE (EP=2): the all-to-all dispatcher with overlapped shared experts gives the all-gather
# dispatcher's result.
# --------------------------------------------------------------------------------------------


def _moe_worker(rank, world_size):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    _init(expert_model_parallel_size=2)
    ids, pos, labels = _batch()
    results = []
    for dispatcher, overlap in (("allgather", False), ("alltoall", True)):
        config = _config(
            num_layers=2,
            perform_initialization=True,
            num_moe_experts=4,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            expert_model_parallel_size=2,
            moe_token_dispatcher_type=dispatcher,
            moe_shared_expert_intermediate_size=32,
            moe_shared_expert_overlap=overlap,
        )
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        torch.manual_seed(SEED)
        model = _gpt(config, spec=spec)
        loss = model(ids, pos, None, labels=labels)
        loss.mean().backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for g1, g0 in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)


@pytest.mark.distributed
def test_moe_alltoall_ep2():
    run_workers(_moe_worker, 2)
