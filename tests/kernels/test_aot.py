"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90: no compile errors, no spills."""

from __future__ import annotations

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


def _params(default_only: bool):
    names = [spec.name for spec in all_specs()]
    return [
        pytest.param(name, arch, id=f"{name}-sm{arch}")
        for name in names
        if (name in DEFAULT) == default_only
        for arch in ARCHES
    ]


def _check(name: str, arch: int) -> None:
    if aot.bundled_tool("cuobjdump") is None or aot.ptxas_for_arch(arch) is None:
        pytest.skip("ptxas/cuobjdump are not bundled with this Triton wheel")
    spec = next(spec for spec in all_specs() if spec.name == name)
    usage = aot.resource_usage(aot.compile_for_arch(spec, arch), arch)
    assert not usage.spills, f"{name} on sm_{arch} spills: {usage}"
    assert usage.registers <= 255


def test_default_set_names_exist() -> None:
    assert {spec.name for spec in all_specs()} >= DEFAULT


@pytest.mark.parametrize(("name", "arch"), _params(default_only=True))
def test_compiles_without_spills(name: str, arch: int) -> None:
    _check(name, arch)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch"), _params(default_only=False))
def test_every_config_compiles_without_spills(name: str, arch: int) -> None:
    _check(name, arch)


def test_parse_resource_usage_reads_spills() -> None:
    dump = " Function _k:\n  REG:96 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0"
    ptxas = "ptxas info    : Function properties for _k\n    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads"
    usage = aot.parse_resource_usage(dump, ptxas)
    assert (usage.registers, usage.spill_store_bytes, usage.spill_load_bytes, usage.stack_bytes) == (
        96,
        8,
        4,
        16,
    )
    assert usage.spills
