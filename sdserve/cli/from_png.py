"""`sdserve generate --from-png FILE`: the request an image's `parameters` chunk describes.

The chunk is read as A1111 reads it (engine/png.py `parse_parameters`); flags given on the command
line override its values. Files the chunk only names by hash must be given again: `--lora FILE`
for each entry of `Lora hashes` (matched by A1111's LoRA hash; scale and interval come from the
chunk's `Lora stack`), `--embedding FILE` for each of `TI hashes`, `--init-image` when it has a
`Denoising strength`, `--controlnet`/`--ip-adapter` for each `ControlNet N` unit (the flags'
values are used: the units are only counted). What is missing is refused in one line naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdserve.cli.common import fail


def _number(parsed: dict[str, str], key: str, kind: type, where: str) -> Any:
    try:
        return kind(parsed[key])
    except ValueError:
        fail(f"--from-png {where}: {key} {parsed[key][:32]!r} is not a number")


def request_values(
    path: Path, loras: list[str], embeddings: list[str], has_init_image: bool, given_units: int = 0
) -> dict[str, Any]:
    """GenerateRequest field values (proto names) of the image at `path`."""
    from sdserve.engine.png import (
        file_shorthash,
        lora_shorthash,
        parse_hash_list,
        parse_parameters,
        read_parameters,
    )
    from sdserve.engine.schedulers import from_a1111
    from sdserve.errors import SdserveError

    where = path.name
    try:
        text = read_parameters(path.read_bytes())
    except OSError as exc:
        fail(f"--from-png: cannot read {where} ({exc.__class__.__name__})")
    except Exception:  # PIL's errors for a non-image have no common base
        fail(f"--from-png: {where} is not a PNG")
    if not text:
        fail(f"--from-png {where}: no 'parameters' text chunk")
    parsed = parse_parameters(text)
    missing = [k for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1") if k not in parsed]
    if missing:
        fail(f"--from-png {where}: the parameters lack {', '.join(missing)}")
    try:
        scheduler = from_a1111(parsed["Sampler"], parsed.get("Schedule type", ""))
    except SdserveError as exc:
        fail(f"--from-png {where}: sampler {parsed['Sampler'][:40]!r}: {exc}")
    values: dict[str, Any] = {
        "prompt": parsed["Prompt"],
        "steps": _number(parsed, "Steps", int, where),
        "scheduler": scheduler,
        "guidance_scale": _number(parsed, "CFG scale", float, where),
        "seed": _number(parsed, "Seed", int, where),
        "width": _number(parsed, "Size-1", int, where),
        "height": _number(parsed, "Size-2", int, where),
        "clip_skip": _number(parsed, "Clip skip", int, where),
    }
    # A written `Negative prompt:` line, even empty, is a negative prompt; none is an absent one
    # (SDXL encodes "" but zeroes an absent one).
    if any(line.startswith("Negative prompt:") for line in text.split("\n")):
        values["negative_prompt"] = parsed["Negative prompt"]
    if "Model" in parsed:
        values["model"] = parsed["Model"]
    if "Batch size" in parsed:
        values["num_images"] = _number(parsed, "Batch size", int, where)
    if "Prompt syntax" in parsed:
        values["prompt_syntax"] = parsed["Prompt syntax"]
    if "Guidance interval" in parsed:
        start, _, end = parsed["Guidance interval"].partition("-")
        values["guidance_start"] = _number({"Guidance interval": start}, "Guidance interval", float, where)
        values["guidance_end"] = _number({"Guidance interval": end}, "Guidance interval", float, where)
    if "Denoising strength" in parsed:
        if not has_init_image:
            fail(f"--from-png {where}: made from an init image (Denoising strength "
                 f"{parsed['Denoising strength'][:16]}); give it with --init-image")
        values["strength"] = _number(parsed, "Denoising strength", float, where)
    units = [key for key in parsed if key.startswith("ControlNet ")]
    if len(units) != given_units:
        fail(f"--from-png {where}: made with {len(units)} ControlNet/IP-Adapter unit(s) "
             f"({'; '.join(parsed[k][:80] for k in units) or 'none'}); give each with --controlnet or --ip-adapter")
    if "Lora hashes" in parsed:
        values["adapters"] = _adapters(parsed, loras, where, lora_shorthash, parse_hash_list)
    elif loras:
        fail(f"--from-png {where}: the image used no LoRA; drop --lora")
    if "TI hashes" in parsed:
        given = {file_shorthash(_embedding_path(text_flag)) for text_flag in embeddings}
        for name, digest in parse_hash_list(parsed["TI hashes"]):
            if digest not in given:
                fail(f"--from-png {where}: embedding {name!r} (hash {digest}) is not among the --embedding files given")
    return values


def _embedding_path(flag: str) -> str:
    path, _, _ = flag.rpartition(":") if ":" in flag and not Path(flag).exists() else (flag, "", "")
    return path


def _adapters(parsed, loras, where, lora_shorthash, parse_hash_list) -> list[dict[str, Any]]:
    from sdserve.cli.generate_cmd import parse_lora_flag

    by_hash = {}
    for flag in loras:
        entry_path = parse_lora_flag(flag)["path"]
        by_hash.setdefault(lora_shorthash(entry_path), entry_path)
    hashes = parse_hash_list(parsed["Lora hashes"])
    # `Lora stack` lists the same entries in the same order (names may repeat); absent: scale 1
    stack = [item.rpartition(":")[2].split() for item in parsed.get("Lora stack", "").split(",") if item.strip()]
    if stack and len(stack) != len(hashes):
        fail(f"--from-png {where}: Lora stack and Lora hashes list different numbers of LoRAs")
    adapters = []
    for index, (name, digest) in enumerate(hashes):
        if digest not in by_hash:
            fail(f"--from-png {where}: LoRA {name!r} (hash {digest}) is not among the --lora files given")
        entry: dict[str, Any] = {"path": by_hash[digest]}
        numbers = stack[index] if stack else []
        if numbers:
            if len(numbers) != 3:
                fail(f"--from-png {where}: Lora stack entry {name!r} is not 'scale start end'")
            for key, number in zip(("scale", "start", "end"), numbers):
                entry[key] = _number({"Lora stack": number}, "Lora stack", float, where)
        adapters.append(entry)
    return adapters
