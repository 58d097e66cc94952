"""A1111's sampler names are aliases of sdserve's schedulers: the same class and config overrides,
so the same diffusers scheduler config; and PNG (sampler, schedule type) pairs round-trip."""

import diffusers
import pytest

from sdserve.engine.schedulers import (
    A1111_SAMPLERS,
    ALIASES,
    from_a1111,
    make_scheduler,
    resolve_scheduler,
    to_a1111,
)
from sdserve.errors import InvalidArgument

# Independent of the table under test: what A1111's sampler means in diffusers' terms.
EXPECTED = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
}
BASE_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "skip_prk_steps": True, "steps_offset": 1}


@pytest.mark.parametrize("name", sorted(A1111_SAMPLERS))
def test_a1111_name_builds_the_aliased_scheduler(name):
    choice = resolve_scheduler(name)
    assert choice == ALIASES[A1111_SAMPLERS[name]]
    assert resolve_scheduler(name.upper()) == choice  # case does not matter
    canonical = next(k for k, v in A1111_SAMPLERS.items() if v == A1111_SAMPLERS[name] and not k.startswith("k_"))
    class_name, config = EXPECTED[canonical]
    ours = make_scheduler(choice, BASE_CONFIG)
    theirs = getattr(diffusers, class_name).from_config(BASE_CONFIG, **config)
    assert type(ours) is type(theirs)
    assert _settings(ours) == _settings(theirs)


def _settings(scheduler) -> dict:
    # diffusers' bookkeeping of which values were defaulted is not a setting
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_png_pair_round_trips(alias):
    sampler, schedule = to_a1111(alias)
    assert ALIASES[from_a1111(sampler, schedule)] == ALIASES[alias]
    assert to_a1111(ALIASES[alias].class_name)[0] in A1111_SAMPLERS or ALIASES[alias].overrides


def test_legacy_and_new_karras_forms_agree():
    assert from_a1111("DPM++ 2M Karras") == from_a1111("DPM++ 2M", "Karras") == "dpmpp_2m_karras"
    assert from_a1111("DPM++ 2M", "Automatic") == from_a1111("DPM++ 2M") == "dpmpp_2m"
    assert from_a1111("EulerDiscreteScheduler") == "EulerDiscreteScheduler"
    assert to_a1111("SomeFutureScheduler") == ("SomeFutureScheduler", "")
    assert from_a1111("Euler", "Karras") == "euler_karras" and from_a1111("DPM++ 2M SDE", "Karras") == "dpmpp_2m_sde_karras"


@pytest.mark.parametrize("sampler,schedule", [("LMS", ""), ("DPM++ SDE", ""), ("Heun", "Karras"),
                                              ("DPM++ 2M", "Exponential")])
def test_samplers_sdserve_lacks_are_refused(sampler, schedule):
    with pytest.raises(InvalidArgument):
        from_a1111(sampler, schedule)
