"""CPU mode: run Megatron-Core's own engine on a CPU-only torch with the gloo backend.

Megatron-Core 0.16.1 assumes a CUDA device in a handful of places even when the model is
built with ``use_cpu_initialization=True`` and every fusion is switched off. ``enable_cpu_mode()``
neutralises exactly those places, so the real ``GPTModel`` / ``TransformerBlock`` / pipeline
schedules / ``DistributedDataParallel`` / ``get_megatron_optimizer`` (and MoE layers) run on CPU
under ``torch.distributed`` with gloo: tests, CI and CPU-only checkpoint conversion then use the
same code as a GPU run instead of a re-implementation of it.

It is a no-op when CUDA is available (the GPU path is never touched), is idempotent, and is
meant to be called once per process, before the model is built (each spawned worker calls it
itself: patches are not inherited by ``spawn`` children).

Every patch replaces one function or module attribute, the one Megatron-Core actually reads, and
each one was seen failing on megatron-core 0.16.1 / torch 2.13 (CPU build) without it
("no CUDA" below is ``AssertionError: Torch not compiled with CUDA enabled``):

 1. A ``TorchFunctionMode`` (``_CudaDeviceToCpu``) pushed for the process rewrites a
    ``device="cuda"`` / ``torch.device("cuda", i)`` keyword argument of any torch call to the CPU.
    Needed by ``pipeline_parallel/schedules.py`` (``total_num_tokens = torch.zeros([], ...,
    device="cuda")`` in every schedule); it equally covers the other literal ``"cuda"`` devices
    (``clip_grads.py``, ``tensor_parallel/data.py``, ...). Without it: no CUDA, in every
    ``get_forward_backward_func()`` call.
 2. ``torch.cuda.current_device`` -> ``torch.cpu.current_device`` (returns ``"cpu"``, valid wherever
    Megatron passes it as a device). Needed by ``device=torch.cuda.current_device()`` in the rotary
    embedding (``inv_freq.to(...)``), p2p shape exchange, TP mappings, DDP buffers. Without it: no
    CUDA at the first forward.
 3. ``torch.cuda.synchronize`` -> a no-op of its own (``_synchronize``). Needed by
    ``pipeline_parallel/p2p_communication.py`` after every send/recv. Without it: no CUDA at PP>1.
    Not ``torch.cpu.synchronize`` itself: torch's dynamo registers one handler per synchronize
    function, and with two names for one function the first compiled function (the router's
    ``_apply_expert_bias`` with ``moe_router_enable_expert_bias``) fails with ``Handler already
    registered for <function synchronize>``.
 4. ``torch.Tensor.cuda`` -> identity. Needed by ``LanguageModule.setup_embeddings_and_output_layer``
    (``weight.data.cuda()`` for tied embeddings at PP>1). Without it: no CUDA building the model.
 5. ``tensor_parallel.random._get_cuda_rng_state`` -> ``torch.get_rng_state()``. Needed by
    ``get_cuda_rng_tracker().fork()`` (around attention dropout, even with dropout 0) and activation
    recomputation. Without it: no CUDA in the attention forward.
 6. ``tensor_parallel.random._set_cuda_rng_state`` -> ``torch.set_rng_state(state)``. Same places.
    Without it nothing raises, but ``torch.cuda._lazy_call`` queues the call forever (the queue grows
    by two entries per fork) and the tracked RNG state is never applied.
 7. ``CudaRNGStatesTracker.add`` -> the same checks, with the state taken from a freshly seeded CPU
    ``torch.Generator`` (the default generator is left alone). Needed by
    ``model_parallel_cuda_manual_seed``. Without it: no CUDA (``torch.cuda.get_rng_state``).
 8. A ``logging.Filter`` on ``megatron.core.tensor_parallel.random`` drops "CPU RNG state changed
    within GPU RNG context", which ``CudaRNGStatesTracker.fork`` logs for every dropout inside a
    fork: on CPU the tracked generator *is* the CPU generator, so that check is moot.
 9. ``fusions.fused_softmax.get_default_causal_mask`` / ``get_sliding_window_causal_mask`` -> the
    same masks built on CPU. Needed by ``FusedScaleMaskSoftmax.forward_torch_softmax`` when no
    ``attention_mask`` is given (or a sliding window is set). Without it: no CUDA during activation
    recomputation (see the note below; in a plain forward 1 already covers it).
10. ``DistributedOptimizer._build_model_and_main_param_groups`` wrapped so that, for the duration of
    the call only, ``Tensor.type()`` names CPU float tensors ``torch.cuda.*Tensor``. Needed by its
    ``param.type() == 'torch.cuda.FloatTensor'``
    checks. Without it: ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor, ...
    Received torch.FloatTensor`` in ``get_megatron_optimizer(use_distributed_optimizer=True)``.
11. ``optimizer.optimizer.clip_grad_by_total_norm_fp32`` (the name ``optimizer.py`` calls) wrapped
    the same way. Needed by ``assert param.grad.type() == 'torch.cuda.FloatTensor'`` in
    ``clip_grads.py``. Without it: ``AssertionError`` in ``optimizer.step()`` when grads are clipped.
12. ``transformer.moe.moe_utils.te_general_gemm`` -> ``None`` (only bound when Transformer Engine
    imports). Needed by ``RouterGatingLinearFunction.forward``. Without it: ``NameError: name
    'te_general_gemm' is not defined`` in every MoE router.
13. ``torch.cuda.Stream`` -> ``_CpuStream`` (torch's ``torch.cpu.Stream`` stub, whose
    ``record_event()`` returns a ``torch.cpu.Event``). Needed by ``MoEAlltoAllTokenDispatcher``
    (its D2H stream and ``d2h_event.synchronize()``) and ``SharedExpertMLP`` with
    ``moe_shared_expert_overlap``. Without it: ``RuntimeError: torch.cuda.Stream requires CUDA
    support``; with the bare stub: ``'NoneType' object has no attribute 'synchronize'``.
14. ``torch.cuda.current_stream`` -> ``torch.cpu.current_stream``. Needed by the same two places.
    Without it: no CUDA.
15. ``transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu`` (the name the dispatcher calls)
    also turns a CPU tensor into numpy when ``as_numpy=True``, as it does for a CUDA tensor. Needed
    by ``MoEAlltoAllTokenDispatcher``: it hands the split sizes to ``all_to_all_single``, which
    rejects tensors. Without it: ``TypeError: all_to_all_single(): incompatible function
    arguments`` at EP>1 (gloo itself handles the uneven all-to-all fine).
16. ``CUDA_DEVICE_MAX_CONNECTIONS=1`` in the environment (unless set): Megatron-Core warns on every
    sequence-parallel linear layer without it, advice about CUDA streams a CPU run cannot act on.
17. A warnings filter drops torch's "The .grad attribute of a Tensor that is not a leaf Tensor is
    being accessed" where it is attributed to this module: the mode of 1 is the frame that runs
    Megatron-Core's ``.grad`` reads, so torch names it as the culprit (on a GPU nothing is shown).

Note on 1 and 9: torch runs a TorchFunctionMode's handler with the mode popped, and
``Tensor.backward`` / ``torch.autograd.backward`` are themselves torch functions, so the whole
backward pass (including the forward that activation recomputation replays in it) runs *without*
the mode. The causal masks are therefore patched directly; anything else reached only from a
backward that builds a tensor with a literal ``device="cuda"`` would still fail.

The mode is pushed in the calling thread (backward inherits it as above); threads started by
user code do not see it. It costs one Python call per torch operation, which shows only on tiny
models. It goes to the bottom of the function-mode stack (just above a
``torch.set_default_device`` context, which torch keeps at the bottom), so calling
``enable_cpu_mode()`` inside a ``with torch.device(...)`` block does not lose it on exit.

Not covered: what needs Transformer Engine (its layer spec; multi-latent attention, which fails
with the local spec in 0.16.1), CUDA graphs, NCCL-only paths, and the fp16/bf16 optimizer path
(``Float16OptimizerWithFloat16Params``, grad scaler), which has not been exercised on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import warnings

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cuda_available", "enable_cpu_mode", "cpu_mode_enabled"]

_CPU = torch.device("cpu")
_LOCK = threading.Lock()
_ENABLED = False
_MISSING = object()
# (owner, attribute, previous value or _MISSING) for every patch applied, in order; kept for
# inspection and debugging only (there is deliberately no public "disable").
_APPLIED: list[tuple[object, str, object]] = []


def cuda_available() -> bool:
    """True when torch can use a CUDA device (then CPU mode never changes anything)."""
    return torch.cuda.is_available()


def cpu_mode_enabled() -> bool:
    """True once `enable_cpu_mode()` has patched this process."""
    return _ENABLED


# --- 1. device="cuda" keyword arguments ---------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites a ``device="cuda"`` (or ``torch.device("cuda", i)``) keyword argument to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        else:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = dict(kwargs, device=_CPU)
        return func(*args, **kwargs)


def _push_mode_for_process(mode: TorchFunctionMode) -> None:
    """Push `mode` at the bottom of this thread's function-mode stack, so that leaving a
    ``with torch.device(...)`` or ``with SomeMode():`` block entered before this call (each pops
    the top of the stack) cannot pop it. Only the ``torch.set_default_device`` context stays below
    it: torch keeps that one at the very bottom itself."""
    stack = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    stack.reverse()  # bottom first
    default_device_context = getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None)
    below = 1 if stack and default_device_context is not None and stack[0] is default_device_context else 0
    for m in stack[:below] + [mode] + stack[below:]:
        torch._C._push_on_torch_function_stack(m)


# --- 3-4. synchronize, Tensor.cuda ---------------------------------------------------------------


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _synchronize(device=None) -> None:
    """Nothing to wait for on the CPU (a function of its own: see 3 above)."""


# --- 5-8. tensor-parallel RNG tracker ------------------------------------------------------------


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """`CudaRNGStatesTracker.add` with the CPU generator standing in for the CUDA one."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception("seed {} already exists".format(seed))
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception("cuda rng state {} already exists".format(name))
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _FORK_WARNING


# --- 9. causal masks -----------------------------------------------------------------------------


def _default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, device=_CPU), diagonal=1).bool()


def _sliding_window_causal_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


# --- 10-11. optimizer param.type() checks ---------------------------------------------------------

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def _cpu_tensors_named_as_cuda():
    """While active, ``t.type()`` (no argument) on a CPU float tensor returns the CUDA type name."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cpu_tensors_named_as_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_named_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


# --- 13-15. MoE ----------------------------------------------------------------------------------


class _CpuStream(torch.cpu.Stream):
    """torch's CPU stream stub, accepting CUDA's constructor arguments and returning an event."""

    def __init__(self, device=None, priority=0, **kwargs):
        super().__init__()

    def record_event(self, event=None):
        return event if event is not None else torch.cpu.Event()


def _make_maybe_move_tensor_to_cpu(original):
    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return maybe_move_tensor_to_cpu


# --- applying ------------------------------------------------------------------------------------


def _patch(owner, name: str, value) -> None:
    if isinstance(owner, type):
        previous = owner.__dict__.get(name, _MISSING)
    else:
        previous = getattr(owner, name, _MISSING)
    _APPLIED.append((owner, name, previous))
    setattr(owner, name, value)


def enable_cpu_mode() -> None:
    """Patch this process so Megatron-Core runs on a CPU-only torch (see the module docstring).

    Does nothing at all when CUDA is available; calling it again is a no-op.
    """
    global _ENABLED
    if _ENABLED or cuda_available():
        return
    with _LOCK:
        if _ENABLED:
            return
        import megatron.core.fusions.fused_softmax as fused_softmax
        import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
        import megatron.core.optimizer.optimizer as optimizer
        import megatron.core.tensor_parallel.random as tp_random
        import megatron.core.transformer.moe.moe_utils as moe_utils
        import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

        _push_mode_for_process(_CudaDeviceToCpu())  # 1
        _patch(torch.cuda, "current_device", torch.cpu.current_device)  # 2
        _patch(torch.cuda, "synchronize", _synchronize)  # 3
        _patch(torch.Tensor, "cuda", _tensor_cuda)  # 4

        _patch(tp_random, "_get_cuda_rng_state", _get_rng_state)  # 5
        _patch(tp_random, "_set_cuda_rng_state", _set_rng_state)  # 6
        _patch(tp_random.CudaRNGStatesTracker, "add", _tracker_add)  # 7
        logging.getLogger(tp_random.__name__).addFilter(_DropForkWarning())  # 8

        _patch(fused_softmax, "get_default_causal_mask", _default_causal_mask)  # 9
        _patch(fused_softmax, "get_sliding_window_causal_mask", _sliding_window_causal_mask)

        build_groups = distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups
        _patch(  # 10
            distrib_optimizer.DistributedOptimizer,
            "_build_model_and_main_param_groups",
            classmethod(_with_cpu_tensors_named_as_cuda(build_groups.__func__)),
        )
        _patch(  # 11
            optimizer,
            "clip_grad_by_total_norm_fp32",
            _with_cpu_tensors_named_as_cuda(optimizer.clip_grad_by_total_norm_fp32),
        )

        if getattr(moe_utils, "te_general_gemm", None) is None:  # 12
            _patch(moe_utils, "te_general_gemm", None)
        _patch(torch.cuda, "Stream", _CpuStream)  # 13
        _patch(torch.cuda, "current_stream", torch.cpu.current_stream)  # 14
        _patch(  # 15
            token_dispatcher,
            "maybe_move_tensor_to_cpu",
            _make_maybe_move_tensor_to_cpu(token_dispatcher.maybe_move_tensor_to_cpu),
        )
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # 16
        warnings.filterwarnings(  # 17
            "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor", module=r"bridge\.runtime\.cpu_mode"
        )
        _ENABLED = True
