"""Ahead-of-time compilation of the Triton kernels for a CUDA arch, on machines without a GPU.

Used by the tests (compile errors and register spills for sm_80/sm_90) and by the bench. The
ptxas and cuobjdump bundled in the Triton wheel do the work; no driver is needed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import types
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget


@dataclass(frozen=True)
class KernelSpec:
    """One launch configuration of a kernel, specialised the way Triton's JIT would specialise it.

    At launch, Triton's JIT treats an int argument equal to 1 as a constant and marks pointers and
    ints divisible by 16; that decides vectorisation and register use, so the AOT compile mirrors
    it (see `make_spec`) for the shapes the serving path sees.
    """

    name: str
    kernel: Any  # a @triton.jit function (or its interpreted twin)
    signature: dict[str, str]  # every kernel parameter -> "*fp16", "i32", "fp32" or "constexpr"
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list[list[Any]]]  # (arg index,) -> [["tt.divisibility", 16]]
    num_warps: int


def make_spec(
    name: str,
    kernel: Any,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    ones: tuple[str, ...] = (),
    not_divisible: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
) -> KernelSpec:
    """Spec of `kernel`: `pointers` map names to "*dtype" (16-byte aligned), `ones` are ints equal
    to 1 (contiguous strides), `floats` are fp32 scalars, other ints are i32 and divisible by 16
    unless listed in `not_divisible`.
    """
    constexprs = {**constexprs, **dict.fromkeys(ones, 1)}
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        signature[arg] = pointers.get(arg) or ("fp32" if arg in floats else "i32")
        if arg not in floats and arg not in not_divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return KernelSpec(name, kernel, signature, constexprs, attrs, num_warps)


@dataclass(frozen=True)
class ResourceUsage:
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def spills(self) -> bool:
        # Spills land in the stack frame (STACK) or local memory.
        return (
            self.spill_store_bytes > 0
            or self.spill_load_bytes > 0
            or self.local_bytes > 0
            or self.stack_bytes > 0
        )


def _jit_function(kernel: Any) -> Any:
    """The compilable JITFunction, also when TRITON_INTERPRET=1 made `kernel` an interpreted one.

    An interpreted kernel's globals hold interpreted helpers too, so the function is rebuilt over
    a copy of its globals in which every interpreted function is swapped for a JITFunction.
    """
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return kernel
    if kernel in _JIT_TWINS:
        return _JIT_TWINS[kernel]
    from triton.runtime.interpreter import InterpretedFunction

    fn = kernel.fn
    namespace = dict(fn.__globals__)
    for name in fn.__code__.co_names:
        if isinstance(namespace.get(name), InterpretedFunction):
            namespace[name] = _jit_function(namespace[name])
    rebuilt = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    rebuilt.__module__ = fn.__module__
    rebuilt.__qualname__ = fn.__qualname__
    _JIT_TWINS[kernel] = triton.runtime.jit.JITFunction(rebuilt)
    return _JIT_TWINS[kernel]


_JIT_TWINS: dict[Any, Any] = {}


def compile_for_arch(spec: KernelSpec, arch: int) -> Any:
    """Compile `spec` to a cubin for sm_<arch>; returns Triton's CompiledKernel."""
    source = triton.compiler.ASTSource(
        fn=_jit_function(spec.kernel), signature=spec.signature, constexprs=spec.constexprs, attrs=spec.attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps})


def bundled_tool(name: str) -> str | None:
    """Path of a tool shipped in the Triton wheel (ptxas, cuobjdump), or None if absent."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.access(path, os.X_OK) else None


def ptxas_for_arch(arch: int) -> str | None:
    """The ptxas Triton itself uses for this arch (a newer one from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(arch).path
    return path if path and os.access(path, os.X_OK) else None


def resource_usage(compiled: Any, arch: int) -> ResourceUsage:
    """Registers and spills of a compiled kernel, from cuobjdump (cubin) and ptxas -v (PTX)."""
    cuobjdump, ptxas = bundled_tool("cuobjdump"), ptxas_for_arch(arch)
    if cuobjdump is None or ptxas is None:
        raise FileNotFoundError("cuobjdump or ptxas is not bundled with this Triton")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(cubin, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        dump = subprocess.run(
            [cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
        ).stdout
        gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        # The flags Triton's own make_cubin passes, so the spill report matches its cubin.
        flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}"]
        verbose = subprocess.run(
            [ptxas, *flags, ptx, "-o", os.path.join(tmp, "check.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    usage = parse_resource_usage(dump, verbose)
    # Triton's shared memory is dynamic, so the cubin does not show it; the metadata does.
    return dataclasses.replace(usage, shared_bytes=max(usage.shared_bytes, int(compiled.metadata.shared)))


def parse_resource_usage(cuobjdump_text: str, ptxas_verbose: str) -> ResourceUsage:
    """Parse `cuobjdump --dump-resource-usage` and `ptxas -v` output of one kernel."""
    # Only the kernel's own function block (the cubin may hold helpers).
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", cuobjdump_text.split("Function", 1)[-1]))
    if "REG" not in fields:
        raise ValueError(f"no resource usage in cuobjdump output: {cuobjdump_text!r}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_verbose)
    if spills is None:
        raise ValueError(f"no spill line in ptxas output: {ptxas_verbose!r}")
    return ResourceUsage(
        registers=int(fields["REG"]),
        stack_bytes=int(fields.get("STACK", 0)),
        local_bytes=int(fields.get("LOCAL", 0)),
        shared_bytes=int(fields.get("SHARED", 0)),
        spill_store_bytes=int(spills.group(1)),
        spill_load_bytes=int(spills.group(2)),
    )
