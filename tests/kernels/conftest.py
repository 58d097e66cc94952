"""Kernel tests run the Triton kernels in Triton's interpreter on CPU tensors.

TRITON_INTERPRET is read when `@triton.jit` decorates a function, including Triton's own
`triton.language` helpers, so it must be set before anything imports Triton. This file sets it,
but a conftest above (or another test package) may import Triton first; then the `interpreted`
fixture skips in this process and `test_interpreter_subprocess.py` re-runs the Triton test files
in a child pytest with TRITON_INTERPRET=1 set from the start, failing if any of them fail.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TRITON_TEST_FILES = ("test_lora_triton.py", "test_attention_triton.py")
KERNELS = {
    "sdserve.kernels.lora_triton": ("_lora_shrink_kernel", "_lora_expand_kernel"),
    "sdserve.kernels.attention_triton": ("_multi_branch_attention_kernel", "_attend_branch"),
}


def interpreter_active() -> bool:
    """True when Triton's language helpers were built for the interpreter in this process."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture(scope="session")
def interpreted():
    """The Triton kernel modules with every kernel an InterpretedFunction."""
    pytest.importorskip("triton")
    if not interpreter_active():
        pytest.skip("Triton was imported before TRITON_INTERPRET=1; test_interpreter_subprocess runs this")
    from triton.runtime.interpreter import InterpretedFunction

    modules = {}
    for name, kernels in KERNELS.items():
        module = importlib.import_module(name)
        if not all(isinstance(getattr(module, kernel), InterpretedFunction) for kernel in kernels):
            module = importlib.reload(module)  # imported before the variable was set
        assert all(isinstance(getattr(module, kernel), InterpretedFunction) for kernel in kernels)
        modules[name.rsplit(".", 1)[1]] = module
    return modules


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
