"""`sdserve train lora`: a run end to end, --help, and bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import argparse
import re
import signal

import pytest
import safetensors

from sdserve.adapters import load_lora, targets_of
from sdserve.cli.main import build_parser
from sdserve.trainers.lora import LoRAMethod  # noqa: F401  (imported once here, not per CLI call)
from sdserve.trainers.output import load_checkpoint
from tests.trainers.conftest import run_cli, write_folder

BRIEF_FLAGS = [
    "--model", "--data", "--out", "--rank", "--alpha", "--steps", "--lr", "--batch-size", "--seed", "--resume",
    "--save-every", "--threads", "--text-encoder", "--format", "--reg-data", "--prior-loss-weight",
    "--resolution", "--caption", "--no-progress",
]


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "train", "lora", "--no-progress", *args)


def _lora_parser() -> argparse.ArgumentParser:
    parser = build_parser("train")
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    kinds = next(a for a in train._actions if isinstance(a, argparse._SubParsersAction))
    return kinds.choices["lora"]


def test_help_explains_every_flag():
    actions = [a for a in _lora_parser()._actions if a.option_strings and a.dest != "help"]
    flags = {flag for action in actions for flag in action.option_strings}
    assert set(BRIEF_FLAGS) <= flags
    assert all(action.help and len(action.help) > 10 for action in actions), [
        a.option_strings for a in actions if not a.help
    ]


def test_a_run_writes_a_loadable_kohya_file(capsys, tmp_path, sd1):
    data = write_folder(tmp_path / "d", count=2)
    out = tmp_path / "o.safetensors"
    code, stdout, _ = _cli(capsys, "--model", "tiny-sd1", "--data", str(data), "--out", str(out), "--steps", "2",
                           "--format", "kohya", "--rank", "2", "--save-every", "1")
    assert code == 0 and stdout.startswith(f"wrote {out} (lora, 2 steps")
    adapter = load_lora(out, "o", targets_of(sd1.adapter_components()))
    assert adapter.layout == "kohya" and adapter.max_rank == 2
    assert (tmp_path / "o.state" / "checkpoint.pt").is_file()


def _refused(capsys, tmp_path, *args: str) -> str:
    code, stdout, stderr = _cli(capsys, *args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdserve: error: "), stderr
    assert not any(p.suffix in (".safetensors", ".state") for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rank", "0"], "--rank"),
        (["--rank", "4", "--alpha", "nan"], "--alpha"),
        (["--targets", "attn,everything"], "--targets"),
        (["--steps", "-1"], "--steps"),
        (["--lr", "0"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--prior-loss-weight", "-1"], "--prior-loss-weight"),
        (["--resolution", "30"], "--resolution"),  # not a multiple of tiny-sd1's 4
        (["--model", "no-such-model"], "--model"),
    ],
)
def test_bad_flags(capsys, tmp_path, flags, named):
    data = write_folder(tmp_path / "d", count=1)
    line = _refused(capsys, tmp_path, "--model", "tiny-sd1", "--data", str(data),
                    "--out", str(tmp_path / "o.safetensors"), *flags)
    assert named in line


def test_bad_paths(capsys, tmp_path):
    data = write_folder(tmp_path / "d", count=1)
    common = ["--model", "tiny-sd1", "--data", str(data)]
    assert "--out" in _refused(capsys, tmp_path, *common, "--out", str(tmp_path / "missing" / "o.safetensors"))
    assert "--out" in _refused(capsys, tmp_path, *common, "--out", str(tmp_path))
    out = ["--out", str(tmp_path / "o.safetensors")]
    assert "--data" in _refused(capsys, tmp_path, "--model", "tiny-sd1", "--data", str(tmp_path / "nope"), *out)
    assert "--reg-data" in _refused(capsys, tmp_path, *common, *out, "--reg-data", str(tmp_path / "nope"))
    assert "--mask-data" in _refused(capsys, tmp_path, *common, *out, "--mask-data", str(tmp_path / "nope"))
    assert "no mask for img0.png" in _refused(capsys, tmp_path, *common, *out, "--mask-data", str(tmp_path))
    assert "--resume" in _refused(capsys, tmp_path, *common, *out, "--resume", str(tmp_path / "d"))
    (data / "img0.txt").unlink()
    assert "img0.png" in _refused(capsys, tmp_path, *common, *out)


def test_resume_from_a_model_of_another_family(capsys, tmp_path):
    data = write_folder(tmp_path / "d", count=1)
    sd2_state = tmp_path / "sd2"
    code, _, stderr = _cli(capsys, "--model", "tiny-sd2", "--data", str(data), "--out", str(tmp_path / "a.bin"),
                           "--state-dir", str(sd2_state), "--steps", "1")
    assert code == 0, stderr
    (tmp_path / "a.bin").unlink()
    line = _refused(capsys, tmp_path, "--model", "tiny-sd1", "--data", str(data),
                    "--out", str(tmp_path / "b.safetensors"), "--resume", str(sd2_state), "--steps", "2")
    assert "--resume" in line and "'sd2'" in line and "'sd1'" in line


def test_a_diverging_run_exits_2_naming_the_step(capsys, tmp_path):
    data = write_folder(tmp_path / "d", count=2)
    line = _refused(capsys, tmp_path, "--model", "tiny-sd1", "--data", str(data),
                    "--out", str(tmp_path / "o.safetensors"), "--lr", "1e30", "--steps", "20")
    assert "at step" in line and "no checkpoint was saved" in line


def test_the_embedded_default_model_trains_at_its_native_size_with_v_prediction(capsys, tmp_path):
    data = write_folder(tmp_path / "d", count=1, size=(80, 70))
    out = tmp_path / "o.safetensors"
    masks = write_folder(tmp_path / "masks", count=1, size=(80, 70))  # random pixels: a mask of mixed weights
    code, _, stderr = _cli(capsys, "--data", str(data), "--out", str(out), "--steps", "1", "--text-encoder",
                           "--mask-data", str(masks), "--lr-schedule", "cosine")
    assert code == 0, stderr
    with safetensors.safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["sdserve_base_model"] == "default" and metadata["sdserve_resolution"] == "64"
    assert metadata["sdserve_prediction_type"] == "v_prediction"
    assert metadata["sdserve_masked_loss"] == "true" and metadata["sdserve_lr_schedule"] == "cosine"


def test_sigterm_saves_a_checkpoint_and_exits_with_one_line(capsys, tmp_path, monkeypatch):
    """A real SIGTERM to this process during step 2 (sent by the method, so it lands mid-step):
    a checkpoint at the next step boundary, one line naming the step, exit 128 + 15, no output."""
    import sdserve.trainers.lora as lora_module
    from tests.trainers.test_loop import _Sabotaged

    class SignalledLoRA(_Sabotaged):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, at=2, signum=signal.SIGTERM, **kwargs)

    monkeypatch.setattr(lora_module, "LoRAMethod", SignalledLoRA)
    data = write_folder(tmp_path / "d", count=2)
    out = tmp_path / "o.safetensors"
    code, _, stderr = _cli(capsys, "--model", "tiny-sd1", "--data", str(data), "--out", str(out), "--steps", "1000")
    assert code == 128 + signal.SIGTERM, stderr
    (line,) = stderr.strip().splitlines()
    assert re.fullmatch(r"sdserve: stopped by SIGTERM after step 2; checkpoint saved in .*o\.state "
                        r"\(continue with --resume .*o\.state\)", line), line
    assert load_checkpoint(tmp_path / "o.state" / "checkpoint.pt")["step"] == 2
    assert not out.exists()
