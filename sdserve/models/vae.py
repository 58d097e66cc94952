"""A separate VAE for a model (`--vae`, `[models] vae`): a file or a directory in place of its own.

Accepted: a diffusers AutoencoderKL directory (`config.json` + weights, fp16 variant included),
a model directory with a `vae/` subfolder, or one `.safetensors` file in either the original
layout (`encoder.down.*`/`decoder.up.*`, optionally under `first_stage_model.`, as
`vae-ft-mse-840000-ema-pruned.safetensors` ships) or diffusers' (`encoder.down_blocks.*`). A
file has no config: it takes the model's own VAE config, and must fit it exactly (every tensor,
every shape) or it is refused; a VAE of another latent space would decode noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdserve.errors import InvalidArgument
from sdserve.models.single_file import VAE_PREFIX, _looks_like, read_header
from sdserve.models.variants import weights_variant


@dataclass(frozen=True)
class VaeSource:
    """Where a model's VAE comes from when it is not the model's own `vae/`."""

    path: Path
    kind: str  # "dir" (an AutoencoderKL directory) | "file" (one safetensors file)
    config: dict[str, Any]  # the AutoencoderKL config it loads with


def _refuse(path: Path, problem: str) -> InvalidArgument:
    return InvalidArgument(f"VAE {path.name!r}: {problem}", field="vae")


def resolve_vae(source: str | Path, model_dir: Path) -> VaeSource:
    """Check `source` names a VAE sdserve can load for the model at `model_dir` (no weights read)."""
    path = Path(source).expanduser()
    if path.is_dir():
        directory = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (directory / "config.json").is_file():
            raise _refuse(path, "is a directory without config.json (or vae/config.json)")
        config = json.loads((directory / "config.json").read_text())
        if config.get("_class_name") not in (None, "AutoencoderKL"):
            raise _refuse(path, f"holds a {config.get('_class_name')}, not an AutoencoderKL")
        source_kind, resolved = "dir", directory.resolve()
    elif path.is_file():
        try:
            keys = set(read_header(path).shapes)  # pickles are refused here, unopened
        except InvalidArgument as exc:
            raise _refuse(path, exc.message.split(": ", 1)[-1]) from None
        if not any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
            raise _refuse(path, f"looks like {_looks_like(keys)}")
        config = json.loads((model_dir / "vae" / "config.json").read_text())
        source_kind, resolved = "file", path.resolve()
    else:
        raise _refuse(path, "no such file or directory")
    own = json.loads((model_dir / "vae" / "config.json").read_text())
    if int(config.get("latent_channels", 4)) != int(own.get("latent_channels", 4)):
        raise _refuse(path, f"has {config.get('latent_channels', 4)} latent channels; the model's VAE has "
                            f"{own.get('latent_channels', 4)}")
    return VaeSource(path=resolved, kind=source_kind, config=config)


def load_vae(source: VaeSource, dtype: Any) -> Any:
    """The AutoencoderKL of `source`, in `dtype`, on the CPU."""
    from diffusers import AutoencoderKL

    if source.kind == "dir":
        return AutoencoderKL.from_pretrained(source.path, torch_dtype=dtype, variant=weights_variant(source.path))
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors import safe_open

    # Only the VAE's tensors: a whole checkpoint given as --vae is not read whole.
    wanted = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX)
    with safe_open(str(source.path), framework="pt") as handle:
        names = [k for k in handle.keys() if k.startswith(wanted)]  # noqa: SIM118 - not iterable
        state = {k: handle.get_tensor(k) for k in names}
    if any(k.startswith(("encoder.down.", "decoder.up.", VAE_PREFIX)) for k in state):
        state = convert_ldm_vae_checkpoint(state, source.config)
    vae = AutoencoderKL.from_config(source.config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:200]]
        raise _refuse(source.path, f"does not fit the model's VAE config ({first[0].strip()})") from None
    return vae.to(dtype)
