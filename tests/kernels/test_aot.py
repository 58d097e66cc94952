"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90: no compile errors, no spills.

The compiles run in a child process without TRITON_INTERPRET and with an empty Triton cache:
this test process runs under TRITON_INTERPRET=1 (the kernel tests need it), whose interpreted
`triton.language` helpers the compiler cannot lower, and a warm cache from an earlier compile
would hide exactly the compile errors this test is for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

from sdserve.kernels import aot  # noqa: E402

ARCHES = (80, 90)


def all_specs() -> list[aot.KernelSpec]:
    from sdserve.kernels import attention_triton, lora_triton

    return lora_triton.aot_specs() + attention_triton.aot_specs()


# One fast representative per kernel in the default set (fp16, the largest tiles); all in slow.
DEFAULT = {
    "lora_shrink_fp16_tf32_r64",
    "lora_expand_fp16_tf32_r32",
    "lora_expand_fp32_ieee_r16",
    "multi_branch_attention_fp16_tf32_d160",
}

_CHILD = """
import dataclasses, json, sys
from sdserve.kernels import aot, attention_triton, lora_triton
specs = {s.name: s for s in lora_triton.aot_specs() + attention_triton.aot_specs()}
out = {}
for name in sys.argv[1].split(","):
    for arch in (80, 90):
        try:
            usage = aot.resource_usage(aot.compile_for_arch(specs[name], arch), arch)
            out[f"{name}-sm{arch}"] = dataclasses.asdict(usage)
        except Exception as exc:  # reported per kernel by the test
            out[f"{name}-sm{arch}"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
print(json.dumps(out))
"""


def compile_in_child(names: list[str]) -> dict[str, object]:
    """name-smXX -> ResourceUsage fields, or the compile error's text."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="sdserve-aot-cache-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, ",".join(names)], env=env, capture_output=True, text=True, timeout=1800
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _usages(names: list[str]) -> dict[str, object]:
    if aot.bundled_tool("cuobjdump") is None or any(aot.ptxas_for_arch(arch) is None for arch in ARCHES):
        pytest.skip("ptxas/cuobjdump are not bundled with this Triton wheel")
    return compile_in_child(names)


@pytest.fixture(scope="module")
def default_usages() -> dict[str, object]:
    return _usages(sorted(DEFAULT))


@pytest.fixture(scope="module")
def all_usages() -> dict[str, object]:
    return _usages(sorted(spec.name for spec in all_specs() if spec.name not in DEFAULT))


def _check(usages: dict[str, object], name: str, arch: int) -> None:
    usage = usages[f"{name}-sm{arch}"]
    assert isinstance(usage, dict), f"{name} on sm_{arch} does not compile: {usage}"
    usage = aot.ResourceUsage(**usage)
    assert not usage.spills, f"{name} on sm_{arch} spills: {usage}"
    assert usage.registers <= 255


def _params(default_only: bool):
    names = [spec.name for spec in all_specs()]
    return [
        pytest.param(name, arch, id=f"{name}-sm{arch}")
        for name in names
        if (name in DEFAULT) == default_only
        for arch in ARCHES
    ]


def test_default_set_names_exist() -> None:
    assert {spec.name for spec in all_specs()} >= DEFAULT


@pytest.mark.parametrize(("name", "arch"), _params(default_only=True))
def test_compiles_without_spills(default_usages, name: str, arch: int) -> None:
    _check(default_usages, name, arch)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), _params(default_only=False))
def test_every_config_compiles_without_spills(all_usages, name: str, arch: int) -> None:
    _check(all_usages, name, arch)
