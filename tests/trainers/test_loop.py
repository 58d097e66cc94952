"""The shared loop: determinism, exact resume, stops on NaN and on signals, the objective, the
batch stream and atomic files. The LoRA method on tiny-sd1 is the method under the loop."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdserve.errors import InvalidArgument
from sdserve.trainers.loop import (
    CHECKPOINT_FILE,
    Diverged,
    Interrupted,
    LoopConfig,
    _loss,
    batch_indices,
    check_loop_config,
    learning_rate,
    train,
    trigger_tokens,
)
from sdserve.trainers.lora import LoRAConfig, LoRAMethod
from sdserve.trainers.objective import NoiseObjective
from sdserve.trainers.output import atomic_write, load_checkpoint
from tests.trainers.conftest import write_folder

LORA = LoRAConfig(rank=2, alpha=4.0, text_encoder=True)
CFG = LoopConfig(steps=4, lr=1e-2, batch_size=2, progress=False)
COSINE = replace(CFG, lr_schedule="cosine")


class _Sabotaged(LoRAMethod):
    """LoRA whose `at`-th predict call sends a signal to this process or returns NaN."""

    def __init__(self, *args, at: int, signum: int | None = None, nan: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.signum, self.nan, self.calls = at, signum, nan, 0

    def predict(self, noisy, timesteps, captions):
        self.calls += 1
        prediction = super().predict(noisy, timesteps, captions)
        if self.calls == self.at and self.signum is not None:
            os.kill(os.getpid(), self.signum)  # the handler only sets a flag; this step completes
        if self.calls == self.at and self.nan:
            return prediction * float("nan")
        return prediction


def _run(components_of, data, reg, out: Path, cfg: LoopConfig = CFG, method=LoRAMethod, **kwargs):
    from sdserve.trainers.data import load_folder

    components = components_of("tiny-sd1")
    images = load_folder(data, 32)
    reg_images = load_folder(reg, 32, caption="a photo of a dog") if reg is not None else None
    return train(method(components, LORA, seed=cfg.seed, **kwargs), components, images, cfg, out, reg=reg_images)


@pytest.fixture
def folders(tmp_path):
    return write_folder(tmp_path / "data", count=3), write_folder(tmp_path / "reg", count=2, seed=5)


def test_same_seed_same_bytes_and_resume_is_exact(components_of, folders, tmp_path):
    data, reg = folders
    straight = _run(components_of, data, reg, tmp_path / "a.safetensors")
    again = _run(components_of, data, reg, tmp_path / "b.safetensors")
    other_seed = _run(components_of, data, reg, tmp_path / "c.safetensors", replace(CFG, seed=1))
    assert all(map(torch.isfinite, map(torch.tensor, straight.losses))) and len(straight.losses) == 4
    assert straight.out.read_bytes() == again.out.read_bytes()
    assert straight.out.read_bytes() != other_seed.out.read_bytes()

    # Half the steps, stop, resume to the full count: the same bytes as the straight run.
    half = _run(components_of, data, reg, tmp_path / "d.safetensors", replace(CFG, steps=2))
    assert load_checkpoint(half.state_dir / CHECKPOINT_FILE)["step"] == 2
    resumed = _run(components_of, data, reg, tmp_path / "d2.safetensors", replace(CFG, resume=half.state_dir))
    assert resumed.losses == straight.losses[2:]
    assert resumed.out.read_bytes() == straight.out.read_bytes()
    # The resumed run's flags apply (the optimizer state holds the first run's learning rate).
    slower = _run(components_of, data, reg, tmp_path / "e.safetensors", replace(CFG, resume=half.state_dir, lr=1e-6))
    assert slower.losses[0] == straight.losses[2] and slower.losses[1] != straight.losses[3]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_at_the_step_boundary_and_resume_continues_exactly(components_of, folders, tmp_path,
                                                                          signum):
    """On the cosine schedule, whose learning rate depends on the step: the resumed run must pick
    the curve up where the stopped one left it."""
    data, _ = folders
    out = tmp_path / "s.safetensors"
    with pytest.raises(Interrupted) as stopped:
        _run(components_of, data, None, out, COSINE, method=_Sabotaged, at=2, signum=signum)
    assert stopped.value.step == 2 and stopped.value.signum == signum
    assert signal.Signals(signum).name in str(stopped.value) and "--resume" in str(stopped.value)
    assert not out.exists()
    assert load_checkpoint(stopped.value.checkpoint)["step"] == 2
    assert signal.getsignal(signum) is not None  # the handler was put back (pytest's or the default)
    resumed = _run(components_of, data, None, out, replace(COSINE, resume=stopped.value.checkpoint.parent))
    straight = _run(components_of, data, None, tmp_path / "t.safetensors", COSINE)
    assert resumed.out.read_bytes() == straight.out.read_bytes()
    constant = _run(components_of, data, None, tmp_path / "u.safetensors")
    assert constant.losses[:2] == straight.losses[:2] and constant.losses[2:] != straight.losses[2:]


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(components_of, folders, tmp_path):
    data, _ = folders
    out = tmp_path / "n.safetensors"
    with pytest.raises(Diverged) as stopped:
        _run(components_of, data, None, out, replace(CFG, save_every=2), method=_Sabotaged, at=3, nan=True)
    assert "at step 3" in str(stopped.value) and "step 2" in str(stopped.value)
    assert not out.exists()
    state = stopped.value.checkpoint.parent
    assert load_checkpoint(state / CHECKPOINT_FILE)["step"] == 2
    assert [p.name for p in state.iterdir()] == [CHECKPOINT_FILE]  # no temporary left behind
    # The kept checkpoint is the good one: resuming from it gives the uninterrupted run's bytes.
    resumed = _run(components_of, data, None, out, replace(CFG, resume=state))
    straight = _run(components_of, data, None, tmp_path / "t.safetensors")
    assert resumed.out.read_bytes() == straight.out.read_bytes()


def test_a_huge_learning_rate_diverges(components_of, folders, tmp_path):
    data, _ = folders
    with pytest.raises(Diverged, match="became (nan|inf)"):
        _run(components_of, data, None, tmp_path / "x.safetensors", replace(CFG, lr=1e30, steps=20))


def test_resume_refuses_another_method_shape(components_of, folders, tmp_path):
    data, _ = folders
    first = _run(components_of, data, None, tmp_path / "a.safetensors", replace(CFG, steps=1))
    components = components_of("tiny-sd1")
    from sdserve.trainers.data import load_folder

    method = LoRAMethod(components, replace(LORA, rank=3))
    with pytest.raises(InvalidArgument, match="--resume: the checkpoint was made with rank '2', this run has '3'"):
        train(method, components, load_folder(data, 32), replace(CFG, resume=first.state_dir), tmp_path / "b.st")
    assert not (tmp_path / "b.st").exists()


def test_v_and_epsilon_targets_and_min_snr_weights_match_closed_forms():
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)  # [1000]
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    a = alphas[t].float()[:, None, None, None]
    v = NoiseObjective({**config, "prediction_type": "v_prediction"})
    eps = NoiseObjective({**config, "prediction_type": "epsilon"})
    torch.testing.assert_close(v.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    torch.testing.assert_close(eps.target(x0, noise, t), noise)
    torch.testing.assert_close(eps.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    snr = (alphas[t] / (1 - alphas[t])).float()
    torch.testing.assert_close(eps.weights(t, 5.0), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(v.weights(t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    assert torch.equal(v.weights(t, None), torch.ones(3))


def test_cosine_schedule_halves_at_the_middle_and_ends_near_zero():
    cfg = replace(CFG, steps=100, lr=2e-3, lr_schedule="cosine")
    assert learning_rate(cfg, 0) == 2e-3 and learning_rate(replace(cfg, lr_schedule="constant"), 99) == 2e-3
    assert learning_rate(cfg, 50) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) == pytest.approx(2e-3 * (1 + math.cos(math.pi * 0.99)) / 2)
    with pytest.raises(InvalidArgument, match="--lr-schedule: must be one of constant, cosine"):
        check_loop_config(replace(cfg, lr_schedule="linear"))


class _Fixed:
    """A method whose prediction is given, to read _loss's weighting."""

    def __init__(self, prediction: torch.Tensor) -> None:
        self.prediction = prediction

    def predict(self, noisy, timesteps, captions):
        return self.prediction


def test_masked_loss_is_the_mask_weighted_mean_and_ignores_what_the_mask_hides():
    objective = NoiseObjective({"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"})
    components = SimpleNamespace(objective=objective)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # [B, C, h, w]
    prediction = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cfg, captions = replace(CFG, batch_size=2), ["a", "b"]

    def loss(predicted, masks=None):
        return float(_loss(_Fixed(predicted), components, latents, captions, cfg, step=3, masks=masks))

    masks = torch.zeros(2, 1, 4, 4)
    masks[0, :, :1, :1] = 1.0  # one latent pixel of the first image
    masks[1, :, 2:] = 0.25  # the lower half of the second, partly
    elsewhere = prediction.clone()
    elsewhere[:, :, 3:, :1] += 5.0  # outside the first mask, inside the second
    elsewhere[0, :, 1:] -= 3.0  # outside the first mask only
    inside = prediction.clone()
    inside[0, :, 0, 0] += 1.0
    assert loss(prediction, masks) != loss(inside, masks)
    assert loss(elsewhere, masks) != loss(prediction, masks)  # the second image's mask covers (3, 0)
    first_only = prediction.clone()
    first_only[0, :, 1:] -= 3.0
    assert loss(first_only, masks) == pytest.approx(loss(prediction, masks), rel=1e-6)
    # A mean, not a sum: a mask weighs by its shape, not its size; all-white is the plain loss.
    assert loss(prediction, masks * 0.5) == pytest.approx(loss(prediction, masks), rel=1e-6)
    assert loss(prediction, torch.ones(2, 1, 4, 4)) == pytest.approx(loss(prediction), rel=1e-6)


def test_batch_stream_visits_every_image_once_per_epoch_and_steps_are_independent():
    count, batch = 5, 2
    stream = [i for step in range(10) for i in batch_indices(7, 11, step, batch, count)]  # 4 epochs
    for epoch in range(4):
        assert sorted(stream[epoch * count : (epoch + 1) * count]) == list(range(count))
    assert batch_indices(7, 11, 6, batch, count) == stream[12:14]
    assert stream != [i for step in range(10) for i in batch_indices(8, 11, step, batch, count)]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    def fail(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    atomic_write(target, lambda path: path.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_trigger_tokens_are_the_words_every_caption_holds():
    assert trigger_tokens(["a photo of sks dog, sitting", "sks dog running", "SKS Dog."]) == ["sks", "dog"]
    assert trigger_tokens([]) == []


def test_prior_loss_weight_scales_the_regularization_term(components_of, folders, tmp_path):
    """Step 1's loss (before any update) is L_instance + w·L_reg over the same draws for every w."""
    data, reg = folders
    first = [
        _run(components_of, data, reg, tmp_path / f"w{w}.safetensors",
             replace(CFG, steps=1, prior_loss_weight=w)).losses[0]
        for w in (0.0, 1.0, 2.0)
    ]
    without_reg = _run(components_of, data, None, tmp_path / "none.safetensors", replace(CFG, steps=1)).losses[0]
    assert first[1] - first[0] > 1e-4
    assert first[2] - first[1] == pytest.approx(first[1] - first[0], rel=1e-5)
    assert first[0] != without_reg  # reg images share the step's noise stream, so draws differ
