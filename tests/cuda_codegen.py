"""Inductor's CUDA output code for a compiled function, on a machine without a GPU.

``generated_cuda_code(fn, *inputs)`` compiles ``fn`` with torch.compile as usual on CPU tensors,
and has Inductor generate every graph it compiles (forward, and backward when the function's
output is differentiated) for an H100 instead: the graph's devices become ``cuda:0``, its fake
values are propagated again on CUDA, and Inductor's codegen runs under a fake device (an sm_90
interface, device properties and Triton target). The code is returned, not loaded: the compiled
function runs the graph eagerly on CPU, so that forward and backward proceed.

Why not fake CUDA tensors through dynamo: a CPU-only torch build has no CUDA device guard, and
autograd aborts the process on a CUDA tensor that requires grad; the graphs past AOTAutograd have
no autograd left. Run without TRITON_INTERPRET (wrap_triton needs compiled-mode kernels): tests/test_cuda_codegen.py
runs ``python tests/cuda_codegen.py OUT.json [CASE ...]`` in a subprocess, which generates the
``cases()`` and compiles their kernels for sm_90.
"""

import contextlib
import copy
import functools
import json
import re
import sys
import types
from typing import NamedTuple
from unittest import mock

import torch
from torch._guards import detect_fake_mode
from torch._inductor import compile_fx as inductor_compile
from torch._inductor.fx_passes import joint_graph
from torch._inductor.graph import GraphLowering
from torch._inductor.select_algorithm import AlgorithmSelectorCache
from torch._subclasses.fake_tensor import is_fake
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

CUDA = torch.device("cuda", 0)

# what Inductor and Triton ask of an H100 SXM
H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, total_memory=80 * 2**30,
    warp_size=32, max_threads_per_multi_processor=2048, max_threads_per_block=1024, regs_per_multiprocessor=65536,
    shared_memory_per_block=49152, shared_memory_per_block_optin=232448, shared_memory_per_multiprocessor=233472,
    L2_cache_size=50 * 2**20, gcnArchName="", uuid="fake-h100", is_integrated=False, clock_rate=1980000,
    memory_clock_rate=2619000, memory_bus_width=5120,
)


_getitem = torch.Tensor.__getitem__


def _fake_cuda_getitem(tensor, key):
    """``tensor[key]`` through aten ops for a fake CUDA tensor: Python indexing takes a CUDA
    device guard first, which a CPU-only build lacks."""
    if not (is_fake(tensor) and tensor.is_cuda):
        return _getitem(tensor, key)
    key = list(key) if isinstance(key, tuple) else [key]
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        spanned = tensor.dim() - sum(k is not None for k in key if k is not Ellipsis)
        key[at:at + 1] = [slice(None)] * spanned
    out, dim, indices = tensor, 0, []
    for k in key:
        if k is None:
            out, index = out.unsqueeze(dim), None
        elif isinstance(k, (int, torch.SymInt)):
            out = out.select(dim, k)
            continue
        elif isinstance(k, slice):
            out, index = torch.ops.aten.slice.Tensor(out, dim, k.start, k.stop, k.step or 1), None
        else:
            index = k
        indices.append(index)
        dim += 1
    return torch.ops.aten.index.Tensor(out, indices) if any(i is not None for i in indices) else out


class Generated(NamedTuple):
    code: str  # the output module's source
    cudagraph_blocker: str | None  # why CUDA graphs could not capture it, as Inductor decides (None: they can)
    autotuned: list  # the choices of each max-autotune selection, by name


def _cudagraph_blocker(graph: GraphLowering) -> str | None:
    from torch._inductor.cudagraph_utils import check_lowering_disable_cudagraph
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    node = get_first_incompatible_cudagraph_node(graph.module)
    return (graph.disable_cudagraphs_reason or (node is not None and f"incompatible op {node.target}")
            or check_lowering_disable_cudagraph(graph.device_node_mapping))


@contextlib.contextmanager
def fake_h100(run_instead, prefer: str | None = None):
    """Inductor's CUDA codegen without a GPU: device queries answer as an H100 does, Triton
    targets sm_90, and each output module is recorded (``Generated``, in the list this yields)
    instead of loaded; its ``call`` runs ``run_instead`` (the graph, eagerly on CPU). Max-autotune
    has no device to time its choices on: each takes its place in Inductor's list, except that a
    choice whose name matches ``prefer`` comes first."""
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    generated, autotuned = [], []

    def record(graph: GraphLowering, wrapper_code):
        generated.append(Generated(wrapper_code.value, _cudagraph_blocker(graph), autotuned[:]))
        autotuned.clear()

        def call(args):
            inputs = list(args)
            args.clear()
            return run_instead(*inputs)

        return types.SimpleNamespace(call=call, __file__="<not loaded: generated for a fake H100>")

    def timings(choices) -> dict:
        autotuned.append([choice.name for choice in choices])
        return {choice: 0.0 if prefer and re.search(prefer, choice.name) else float(rank)
                for rank, choice in enumerate(choices, 1)}

    queries = dict(get_device_properties=lambda device=None: H100, get_device_capability=lambda device=None: (9, 0),
                   current_device=lambda: 0, device_count=lambda: 1,
                   is_bf16_supported=lambda including_emulation=False: True)
    interface = dict(get_device_properties=queries["get_device_properties"], current_device=queries["current_device"],
                     device_count=queries["device_count"], is_bf16_supported=queries["is_bf16_supported"],
                     get_compute_capability=lambda device=None: 90, is_available=lambda: True)
    target = types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32), get_current_device=lambda: 0,
                                   get_active_torch_device=lambda: CUDA, get_current_stream=lambda device=None: 0)
    lazy_init = joint_graph.lazy_init
    has_triton = torch.utils._triton.has_triton
    with contextlib.ExitStack() as stack:
        for name, value in queries.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, value))
        for name, value in interface.items():
            stack.enter_context(mock.patch.object(CudaInterface, name, staticmethod(value)))
        stack.enter_context(mock.patch.object(CudaInterface.Worker, "get_device_properties",
                                              staticmethod(lambda device=None: H100)))
        from torch._inductor.runtime import triton_helpers

        set_driver = triton_helpers.set_driver_to_gpu
        for module in [m for name, m in sys.modules.items() if name.startswith("torch")]:
            for name, original, fake in (("has_triton", has_triton, lambda: True),
                                         ("set_driver_to_gpu", set_driver, lambda: None)):
                if getattr(module, name, None) is original:
                    stack.enter_context(mock.patch.object(module, name, fake))
        # Inductor's own patterns are traced on real tensors of the graph's device: on CPU instead
        stack.enter_context(mock.patch.object(joint_graph, "lazy_init", lambda input_device=None: lazy_init(torch.device("cpu"))))
        stack.enter_context(mock.patch.object(GraphLowering, "_compile_to_module_lines", record))
        stack.enter_context(mock.patch.object(torch.Tensor, "__getitem__", _fake_cuda_getitem))
        stack.enter_context(mock.patch.object(AlgorithmSelectorCache, "make_benchmark_fn",
                                              lambda *args, **kwargs: timings))
        active, driver._active = driver._active, target
        stack.callback(setattr, driver, "_active", active)
        yield generated


def _on_cuda(value):
    return CUDA if isinstance(value, torch.device) and value.type == "cpu" else value


def on_cuda(gm: torch.fx.GraphModule, example_inputs):
    """A copy of an AOTAutograd graph with every device cuda:0, and its example inputs and fake
    values on CUDA (the same symbolic sizes)."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, _on_cuda)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, _on_cuda)
    gm.recompile()
    fake_mode = detect_fake_mode(example_inputs)
    with fake_mode:
        inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=CUDA) if isinstance(t, torch.Tensor)
                  else t for t in example_inputs]
    with fake_h100(run_instead=gm):
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
    return gm, inputs


def generated_cuda_code(fn, *inputs, backward: bool = False, dynamic: bool | None = None, options: dict | None = None,
                        then: tuple = (), prefer: str | None = None) -> list[Generated]:
    """What Inductor generates for an H100 from ``fn(*inputs)`` (CPU tensors): a ``Generated``
    per graph it compiles, forward first. With ``backward`` the sum of the outputs is
    differentiated too; ``then``: more input tuples the same compiled function runs (a graph
    compiled again for them shows as another entry). ``options``: Inductor config values;
    ``prefer``: which max-autotune choices win (``fake_h100``)."""
    generated = []

    def cuda_codegen(gm, example_inputs, **kwargs):
        cuda_gm, cuda_inputs = on_cuda(gm, example_inputs)
        with fake_h100(run_instead=gm, prefer=prefer) as recorded:
            compiled = inductor_compile.compile_fx_inner(cuda_gm, cuda_inputs, **kwargs)
        generated.extend(recorded)
        return compiled

    torch._dynamo.reset()
    backend = functools.partial(inductor_compile.compile_fx, inner_compile=cuda_codegen)
    with torch._inductor.config.patch(force_disable_caches=True, **(options or {})):
        compiled_fn = torch.compile(fn, backend=backend, dynamic=dynamic)
        for args in (inputs, *then):
            out = compiled_fn(*args)
            if backward:
                outputs = out if isinstance(out, (tuple, list)) else (out,)
                sum(o.float().sum() for o in outputs if o.requires_grad).backward()
    return generated


def compile_kernels_for_sm90(code: str) -> dict:
    """Every Triton kernel of an output code compiled as Inductor's runtime would, for the fake
    H100 (sm_90, Triton's bundled ptxas), without loading it: kernel name -> None, or the error."""
    from torch._inductor.codecache import PyCodeCache

    kernels = re.findall(r"^\w+ = async_compile\.triton\('(\w+)', '''(.*?)''', device_str='cuda'\)", code, re.S | re.M)
    errors = {}
    with fake_h100(run_instead=None):
        for name, source in kernels:
            try:
                tuner = getattr(PyCodeCache.load(source), name)
                tuner.precompile(warm_cache_only=True)
                errors[name] = None if tuner.compile_results else "no compiled config"
            except Exception as error:  # noqa: BLE001  (reported per kernel by the test)
                errors[name] = f"{type(error).__name__}: {error}"
    return errors


HIDDEN = 256


def _case(model, backward: bool, tokens=(20, 33, 257), **kwargs) -> list[Generated]:
    """A block compiled for dynamic token counts (training, or inference under no_grad): the first
    count compiles, the others must not (a count of 1 would: dynamo specializes sizes 0 and 1)."""
    inputs = [(torch.randn(1, t, HIDDEN, dtype=torch.bfloat16, requires_grad=backward),) for t in tokens]
    with torch.set_grad_enabled(backward):
        return generated_cuda_code(model, *inputs[0], backward=backward, dynamic=True, then=tuple(inputs[1:]), **kwargs)


def cases() -> dict:
    """The graphs the CUDA codegen tests read: name -> a function generating them."""
    from inductor_moe import config, models

    def block(style="dense_loop", **overrides):
        cfg = models.MoEConfig(**{"hidden": HIDDEN, "intermediate": 128, "num_experts": 8, "top_k": 2, **overrides})
        return models.build(style, cfg).to(torch.bfloat16)

    def fp8(recipe):
        def run():
            with config.patch(fp8=recipe):
                return _case(block(), backward=True)
        return run

    return {
        "inference": lambda: _case(block(), backward=False),
        "training": lambda: _case(block(), backward=True),
        **{f"fp8_{recipe}": fp8(recipe) for recipe in ("rowwise", "blockwise", "mxfp8")},
        "max_autotune": lambda: _case(block(), backward=False, options={"max_autotune": True}),
        "max_autotune_vendor": lambda: _case(block(), backward=False, options={"max_autotune": True}, prefer="_vendor"),
        "max_autotune_training": lambda: _case(block(), backward=True, options={"max_autotune": True}),
        "deepseek_v3": lambda: _case(block("deepseek_v3_grouped_mm"), backward=False),
        "gpt_oss": lambda: _case(block("gpt_oss_grouped_mm"), backward=True),
    }


def main(path: str, names: list[str]) -> None:
    """Generate the cases (all, or those named) and compile their kernels for sm_90: JSON to ``path``."""
    results, compiled = {}, {}
    for name, generate in cases().items():
        if names and name not in names:
            continue
        graphs = []
        for graph in generate():
            if graph.code not in compiled:
                compiled[graph.code] = compile_kernels_for_sm90(graph.code)
            graphs.append({**graph._asdict(), "sm90_errors": compiled[graph.code]})
        results[name] = graphs
        print(f"{name}: {len(graphs)} graphs", flush=True)
    with open(path, "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2:])
