"""Every Triton kernel in sparse_attn.kernels, compiled ahead of time for sm_80 and sm_90 in every
launch configuration its launcher can choose: it must build (PTX and cubin) and its shared memory
must fit the device. No GPU is needed.

A kernel module takes part by defining ``launch_configurations()``, returning
(kernel, signature, constexprs, options) tuples. The compilations run in one subprocess with
TRITON_INTERPRET=0 (the test session decorates kernels for the interpreter, and the compiler needs
them as JIT functions); run this file as a script to see the figures."""
import concurrent.futures
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

TARGETS = (80, 90)
# Shared memory one block may opt in to, in bytes (CUDA C Programming Guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_modules():
    import sparse_attn.kernels

    names = [f"sparse_attn.kernels.{m.name}" for m in pkgutil.iter_modules(sparse_attn.kernels.__path__)]
    return [name for name in names if hasattr(importlib.import_module(name), "launch_configurations")]


def kernel_name(kernel):
    return getattr(kernel, "__name__", None) or kernel.fn.__name__


# Half-precision configurations compile in the slow tier (`make test-all`): the fast tier builds
# every kernel in fp32 on both targets, which is every kernel's code and the largest tiles in
# shared memory; fp16 and bf16 change the element types.
SLOW_POINTER_TYPES = {"*fp16", "*bf16"}


def cases():
    """(module, index, cc, test id, slow) of every configuration and target."""
    out = []
    for module in kernel_modules():
        for index, (kernel, signature, constexprs, options) in enumerate(
                importlib.import_module(module).launch_configurations()):
            pointers = sorted({t for t in signature.values() if t.startswith("*") and t != "*i32"})
            label = "-".join([kernel_name(kernel), *pointers, *(f"{k}={v}" for k, v in constexprs.items())])
            slow = bool(SLOW_POINTER_TYPES & set(pointers))
            out.extend((module, index, cc, f"{label}-sm{cc}", slow) for cc in TARGETS)
    return out


def compile_one(module, index, cc):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, constexprs, options = importlib.import_module(module).launch_configurations()[index]
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as exc:  # reported by the test that owns this configuration
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "ptx": bool(compiled.asm.get("ptx")), "cubin": bool(compiled.asm.get("cubin"))}


def compile_all(todo):
    """{"module:index:cc": result} for the (module, index, cc) cases in `todo`, two compilations
    at a time."""
    if not todo:
        return {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = pool.map(compile_one, *zip(*todo))
        return {f"{m}:{i}:{cc}": r for (m, i, cc), r in zip(todo, results)}


@pytest.fixture(scope="module")
def compiled(request):
    """The compilations of the cases this session selected (the tier, `-k`), in one subprocess."""
    selected = [item.callspec.params for item in request.session.items
                if item.originalname == "test_kernel_builds_and_fits_shared_memory"]
    todo = [(p["module"], p["index"], p["cc"]) for p in selected]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           # Compilations are cached by source, options and target: reruns only rebuild what changed.
           "TRITON_CACHE_DIR": os.path.join(ROOT, "build", "triton-aot-cache")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT, input=json.dumps(todo),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


CASES = cases()


def test_every_kernel_module_lists_configurations():
    modules = kernel_modules()
    assert "sparse_attn.kernels.sparse_channel_attention" in modules
    assert "sparse_attn.kernels.mixed_scale_dwconv" in modules
    assert "sparse_attn.kernels.layer_norm2d" in modules
    assert "sparse_attn.kernels.gated_dwconv" in modules
    assert "sparse_attn.kernels.block_sparse_attention" in modules
    assert "sparse_attn.kernels.patch_attention" in modules
    assert "sparse_attn.kernels.depthwise_conv2d" in modules
    assert CASES


@pytest.mark.parametrize("module, index, cc", [pytest.param(*c[:3], marks=[pytest.mark.slow] if c[4] else [])
                                               for c in CASES], ids=[c[3] for c in CASES])
def test_kernel_builds_and_fits_shared_memory(compiled, module, index, cc):
    result = compiled[f"{module}:{index}:{cc}"]
    assert "error" not in result, result.get("error")
    assert result["ptx"] and result["cubin"]
    assert result["shared"] <= SHARED_MEMORY_LIMIT[cc], (
        f"{result['shared']} bytes of shared memory > {SHARED_MEMORY_LIMIT[cc]} on sm_{cc}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    # the cases to compile as JSON on stdin (the fixture); a terminal: every case
    chosen = json.load(sys.stdin) if not sys.stdin.isatty() else [c[:3] for c in cases()]
    print(json.dumps(compile_all([tuple(c) for c in chosen])))
