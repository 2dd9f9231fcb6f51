"""Where a training step's time goes: the trainer's own loop under torch.profiler, each operator's own time (on a
GPU its kernels' time) put in a class by the aten operator that did the work, with its input shapes.

Classes: depthwise convolution (forward, input gradient, weight gradient; "backward" where one kernel does both),
dense convolution, matrix multiply, LayerNorm (forward, backward: its weight-gradient kernels included), GELU and
other element-wise work, permute/copy/cast, the optimizer step (with gradient clipping), other. A kernel is classed by
the outermost aten operator above it (`aten::convolution_backward`, not the `aten::fill_` inside it); one with no
aten operator above it (a compiled graph's fused Triton kernel) by its name, where a fused kernel whose name mentions
a convolution is element-wise work fused around the convolution, never the convolution itself. Shares are of the
busy time and add up to 1; `idle_share` is the rest of the wall time (on a GPU, the device waiting for the host).
"""

from __future__ import annotations

import time

import torch

from cxr_fast.config import RunConfig
from cxr_fast.data.datasets import nih
from cxr_fast.data.loaders.loader import LoaderSpec, SyntheticLoader
from cxr_fast.training.engine import train_one_epoch
from cxr_fast.training.setup import build_trainer

DW_FORWARD, DW_INPUT_GRAD, DW_WEIGHT_GRAD = ("depthwise conv forward", "depthwise conv input grad",
                                             "depthwise conv weight grad")
DW_BACKWARD, DENSE_CONV, MATMUL = "depthwise conv backward", "dense conv", "matrix multiply"
LN_FORWARD, LN_BACKWARD = "layer norm forward", "layer norm backward"
ELEMENTWISE, COPY, OPTIMIZER, OTHER = "GELU and element-wise", "permute, copy and cast", "optimizer", "other"
CLASSES = (DW_FORWARD, DW_INPUT_GRAD, DW_WEIGHT_GRAD, DW_BACKWARD, DENSE_CONV, MATMUL, LN_FORWARD, LN_BACKWARD,
           ELEMENTWISE, COPY, OPTIMIZER, OTHER)

CONVOLUTIONS = {"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::cudnn_convolution",
                "aten::mkldnn_convolution", "aten::_conv_depthwise2d", "aten::thnn_conv2d",
                "aten::_slow_conv2d_forward", "aten::convolution_overrideable"}
MATMULS = {"aten::linear", "aten::addmm", "aten::mm", "aten::matmul", "aten::bmm", "aten::baddbmm",
           "aten::_addmm_activation"}
COPIES = {"aten::permute", "aten::contiguous", "aten::clone", "aten::copy_", "aten::_to_copy", "aten::to",
          "aten::transpose", "aten::reshape", "aten::view", "aten::t", "aten::as_strided", "aten::_reshape_alias",
          "aten::expand", "aten::flatten", "aten::empty_like", "aten::empty_strided", "aten::empty", "aten::detach"}
ELEMENTWISE_WORDS = ("add", "mul", "div", "sub", "gelu", "sigmoid", "neg", "fill", "zero", "where", "sum", "mean",
                     "pow", "sqrt", "exp", "log", "clamp", "binary_cross_entropy", "masked", "isfinite", "isinf",
                     "isnan", "abs", "ones", "rsub", "stack", "cat", "dropout", "bernoulli", "lerp", "addcmul",
                     "addcdiv", "max", "min", "norm", "logical", "bitwise", "eq", "ne", "lt", "gt", "rand")


def _depthwise(weight_shape) -> bool:
    return bool(weight_shape) and len(weight_shape) == 4 and weight_shape[1] == 1 and weight_shape[0] > 1


def _shape(shapes, index: int):
    return list(shapes[index]) if shapes and len(shapes) > index and shapes[index] else None


def classify_aten(name: str, shapes, kernel: str = "") -> str:
    """The class of work an aten operator (outermost above the time) does, with its input shapes."""
    if "adam" in name or "_foreach_" in name:
        return OPTIMIZER
    if name in CONVOLUTIONS:
        return DW_FORWARD if _depthwise(_shape(shapes, 1)) else DENSE_CONV
    if name == "aten::convolution_backward":
        if not _depthwise(_shape(shapes, 2)):
            return DENSE_CONV
        lowered = kernel.lower()
        if "wgrad" in lowered or "grad_weight" in lowered or "weight" in lowered:
            return DW_WEIGHT_GRAD
        if "dgrad" in lowered or "grad_input" in lowered or "backward_input" in lowered:
            return DW_INPUT_GRAD
        return DW_BACKWARD
    if name in MATMULS:
        return MATMUL
    if name in ("aten::layer_norm", "aten::native_layer_norm"):
        return LN_FORWARD
    if name == "aten::native_layer_norm_backward":
        return LN_BACKWARD
    if name in COPIES:
        return COPY
    return ELEMENTWISE if any(word in name for word in ELEMENTWISE_WORDS) else OTHER


def classify_kernel(name: str) -> str:
    """A kernel with no aten operator above it (a compiled graph's), by its name."""
    lowered = name.lower()
    if "adam" in lowered or "foreach" in lowered:
        return OPTIMIZER
    if "layer_norm" in lowered:
        return LN_BACKWARD if "backward" in lowered else LN_FORWARD
    if any(word in lowered for word in ("gemm", "cutlass", "xmma", "nvjet", "_mm_", "fused_mm", "addmm", "bmm")):
        return MATMUL
    if "triton" in lowered:  # a fused point-wise or reduction kernel; "convolution" in its name is its neighbour
        only_layout = all(word in ("triton", "poi", "fused", "clone", "permute", "copy", "_to_copy", "convert")
                          or word.isdigit() for word in lowered.replace("__", "_").split("_") if word)
        return COPY if only_layout else ELEMENTWISE
    if any(word in lowered for word in ("copy", "permute", "transpose", "cast")):
        return COPY
    return ELEMENTWISE if any(word in lowered for word in ("elementwise", "vectorized", "reduce")) else OTHER


def _chain(event) -> list:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain[::-1]  # outermost first


def classify_event(event, kernel: str = "") -> str:
    chain = _chain(event)
    if any(e.name.startswith("Optimizer.") or "clip_grad" in e.name for e in chain):
        return OPTIMIZER
    aten = [e for e in chain if e.name.startswith("aten::")]
    if aten:
        outer = aten[0]
        return classify_aten(outer.name, getattr(outer, "input_shapes", None), kernel or event.name)
    return classify_kernel(kernel or event.name)


def timed(events, on_device: bool):
    """(name, class, seconds) of each piece of work: each CPU operator's own time (named with its input shapes), or
    on a GPU each kernel it launched."""
    for event in events:
        if on_device:
            for kernel in getattr(event, "kernels", []) or []:
                yield kernel.name, classify_event(event, kernel.name), kernel.duration / 1e6
        elif event.self_cpu_time_total > 0 and event.device_type == torch.autograd.DeviceType.CPU:
            yield f"{event.name} {getattr(event, 'input_shapes', '')}", classify_event(event), \
                event.self_cpu_time_total / 1e6


def attribute(events, on_device: bool) -> dict[str, float]:
    """Seconds per class."""
    seconds = dict.fromkeys(CLASSES, 0.0)
    for _name, label, spent in timed(events, on_device):
        seconds[label] += spent
    return seconds


def _top(events, on_device: bool, count: int = 15) -> list[dict]:
    times: dict[tuple, float] = {}
    for name, label, spent in timed(events, on_device):
        times[name[:160], label] = times.get((name[:160], label), 0.0) + spent
    top = sorted(times.items(), key=lambda kv: -kv[1])[:count]
    return [{"name": name, "class": label, "seconds": spent} for (name, label), spent in top]


def profile_training(run: RunConfig, steps: int, warmup: int = 3) -> dict:
    """`steps` optimizer steps of the trainer on on-device batches under torch.profiler, after `warmup` steps."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = device.type == "cuda"
    state, _model = build_trainer(run, device, tuple(nih.CLASSES), run.optim.batch_size * (warmup + steps))
    spec = LoaderSpec("", "train", run.data, batch_size=run.optim.batch_size, device=device)
    accum = state.accum
    train_one_epoch(state, SyntheticLoader(spec, warmup * accum, len(state.classes)), warmup * accum,
                    show_progress=False, warmup_steps=warmup)
    state.batch_in_epoch = 0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities, record_shapes=True) as prof:
        started = time.perf_counter()
        stats = train_one_epoch(state, SyntheticLoader(spec, steps * accum, len(state.classes)), steps * accum,
                                show_progress=False)
        wall = time.perf_counter() - started
    events = prof.events()
    seconds = attribute(events, on_device)
    busy = sum(seconds.values())
    return {"steps": steps, "warmup_steps": warmup, "images": stats.images, "wall_seconds": wall,
            "images_per_second": stats.images / wall, "busy_seconds": busy, "idle_share": max(0.0, 1 - busy / wall),
            "on": "device kernels" if on_device else "CPU operators (self time)",
            "seconds": seconds, "share": {k: v / busy for k, v in seconds.items()} if busy else {},
            "top": _top(events, on_device), "loss": stats.loss}
