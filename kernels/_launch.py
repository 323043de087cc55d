"""What every kernel module's launchers and launch configurations share: starting a kernel so
that torch.compile sees it, and the signature of a kernel for ahead-of-time compilation."""
import torch
import triton


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), through wrap_triton for a JIT kernel."""
    # wrap_triton lets torch.compile (through torch.library.triton_op) see the kernel; it calls
    # the kernel directly outside tracing, and the interpreter's kernels are launched as they are.
    if isinstance(kernel, triton.runtime.JITFunction):
        kernel = torch.library.wrap_triton(kernel)
    kernel[grid](*args, **kwargs)


def aot_signature(kernel, constexprs, pointer_types):
    """AOT signature: pointers typed from `pointer_types` (default fp32), other arguments i32."""
    return {name: "constexpr" if name in constexprs
            else "*" + pointer_types.get(name, "fp32") if name.endswith("_ptr") else "i32"
            for name in kernel.arg_names}
