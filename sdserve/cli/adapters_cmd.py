"""`sdserve adapters convert IN OUT`: A1111 pickles (embeddings, hypernetworks) to safetensors.

Conversion is offline and weights-only (`torch.load(weights_only=True)`): a pickle that holds
anything but tensors and plain data is refused, never unpickled. The server loads only the
safetensors files this writes.

`sdserve adapters extract --base A --tuned B --rank R --out FILE`: the rank-R LoRA closest to a
fine-tuned model's difference to its base (sdserve/adapters/extract.py).

`sdserve adapters inspect FILE [--model MODEL]`: the file's kind (LoRA, LoCon, LoHa, LoKr, DoRA,
embedding, hypernetwork), ranks, targets and base family (sdserve/adapters/inspect.py); with
--model, whether it loads against that model and how each LyCORIS module is served.

`sdserve adapters pack controlnet|ip-adapter DIR --out FILE`: a ControlNet directory (diffusers'
layout, what `sdserve train controlnet` writes) or an IP-Adapter directory (ip_adapter.safetensors
+ image_encoder/, what `sdserve train ip-adapter` writes) as one safetensors file, the form a
server's UploadAdapter takes (sdserve/adapters/conditioning.py). `sdserve client adapters upload
DIR --kind controlnet|ip_adapter` packs on the fly instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sdserve.cli.common import fail, fail_on
from sdserve.errors import SdserveError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adapters", help="convert adapter files, extract a LoRA from a fine-tuned model", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="adapters_command", required=True)
    convert = sub.add_parser("convert", help="convert an A1111 .pt embedding or hypernetwork to safetensors")
    convert.add_argument("input", metavar="IN.pt", help="the A1111 file (.pt/.bin)")
    convert.add_argument("output", metavar="OUT.safetensors", help="where to write the safetensors file")
    convert.add_argument("--kind", choices=("embedding", "hypernetwork"), default=None,
                         help="what the file must hold (default: detected)")
    convert.add_argument("--token", default=None,
                         help="the embedding's token (default: the name stored in the file)")
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    convert.set_defaults(func=_convert)
    _register_extract(sub)
    _register_inspect(sub)
    _register_pack(sub)


def _register_pack(sub: argparse._SubParsersAction) -> None:
    pack = sub.add_parser(
        "pack", help="pack a ControlNet or IP-Adapter directory into one file to upload to a server",
        description="Write a ControlNet directory (config.json + diffusion_pytorch_model.safetensors) or an "
                    "IP-Adapter directory (ip_adapter.safetensors + image_encoder/) as one safetensors file: the "
                    "tensors unchanged, the configs in its header. Upload it with `sdserve client adapters upload "
                    "FILE --kind controlnet|ip_adapter`; the server unpacks it to the same directory.")
    pack.add_argument("kind", choices=("controlnet", "ip-adapter"), help="what DIR holds")
    pack.add_argument("directory", type=Path, metavar="DIR", help="the model's directory")
    pack.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors", help="the file to write")
    pack.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    pack.set_defaults(func=_pack)


def _pack(args: argparse.Namespace) -> None:
    from sdserve.adapters.conditioning import pack

    if args.out.suffix != ".safetensors":
        fail(f"{args.out}: the output must be a .safetensors file")
    if args.out.exists() and not args.force:
        fail(f"{args.out} exists; pass --force to overwrite it")
    try:
        data = pack(args.kind.replace("-", "_"), args.directory)
    except SdserveError as error:
        fail_on(error)
    # Written beside FILE and renamed: a FILE that exists is never left half-written.
    staged = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        staged.write_bytes(data)
        os.replace(staged, args.out)
    except OSError as exc:
        staged.unlink(missing_ok=True)
        fail(f"{args.out}: cannot write ({exc.__class__.__name__})")
    print(f"wrote {args.kind} {args.out} ({len(data)} bytes)")


def _convert(args: argparse.Namespace) -> None:
    from sdserve.adapters.convert import convert_file

    if not os.path.isfile(args.input):
        fail(f"{args.input}: no such file")
    if not args.output.endswith(".safetensors"):
        fail(f"{args.output}: the output must be a .safetensors file")
    if os.path.exists(args.output) and not args.force:
        fail(f"{args.output} exists; pass --force to overwrite it")
    try:
        kind = convert_file(args.input, args.output, kind=args.kind, token=args.token)
    except SdserveError as error:
        fail_on(error)
    print(f"wrote {kind} {args.output}")


def _register_extract(sub: argparse._SubParsersAction) -> None:
    extract = sub.add_parser(
        "extract", help="extract a LoRA from a fine-tuned model (its difference to the base, by SVD)",
        description="Write the rank-R LoRA closest (in the Frobenius norm) to the difference between a "
                    "fine-tuned model and its base, for every linear and conv module the two differ in. "
                    "Both are built-in model names or diffusers-format directories of one architecture.",
    )
    extract.add_argument("--base", required=True, metavar="MODEL", help="the model that was fine-tuned")
    extract.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model")
    extract.add_argument("--rank", type=int, required=True, help="rank of every module's factors (1 to 128)")
    extract.add_argument("--out", type=Path, required=True, metavar="FILE.safetensors", help="the LoRA to write")
    extract.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                         help="key layout: diffusers/PEFT (lora_A/lora_B) or kohya (lora_unet_...) (default diffusers)")
    extract.add_argument("--text-encoder", action="store_true", help="also extract the text encoders' differences")
    extract.add_argument("--min-delta", type=float, default=1e-6,
                         help="skip modules whose weights differ by at most this anywhere (default 1e-6)")
    extract.add_argument("--device", default="cpu", help="where the SVDs run: cpu, cuda or cuda:N (default cpu)")
    extract.add_argument("--report", type=Path, metavar="FILE.json", help="also write every module's error as JSON")
    extract.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.set_defaults(func=_extract)


def _load_for_extract(name: str, flag: str):
    """(ModelInfo, adapter components) of a built-in name or a diffusers directory, on the CPU in
    float32 (the difference of two float16 weights would lose the bits the fine-tune changed)."""
    import torch

    from sdserve.engine.model import load_model, read_model_info
    from sdserve.models.builtin import builtin_names, builtin_path

    if name in builtin_names():
        path = builtin_path(name)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            fail(f"{flag}: {name!r} is neither a built-in model ({', '.join(builtin_names())}) nor a directory")
    try:
        info = read_model_info(name, path.resolve())
    except SdserveError as error:
        fail(f"{flag}: {error}")
    return info, load_model(info, torch.device("cpu"), torch.float32).adapter_components()


def _extract(args: argparse.Namespace) -> None:
    from sdserve.cli.common import quiet_libraries

    quiet_libraries()
    import torch

    from sdserve.adapters.extract import ExtractConfig, check_config, extract_lora, write_extraction
    from sdserve.trainers.output import atomic_write, check_writable

    config = ExtractConfig(rank=args.rank, text_encoder=args.text_encoder, min_delta=args.min_delta,
                           device=args.device)
    try:
        check_config(config)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {args.device}: no CUDA device is available")
        if not str(args.out).endswith(".safetensors"):
            fail(f"--out {args.out}: the output must be a .safetensors file")
        if args.out.exists() and not args.force:
            fail(f"--out {args.out} exists; pass --force to overwrite it")
        check_writable(args.out, "--out")
        base_info, base = _load_for_extract(args.base, "--base")
        tuned_info, tuned = _load_for_extract(args.tuned, "--tuned")
        if base_info.family != tuned_info.family:
            fail(f"--base {args.base} ({base_info.family}) and --tuned {args.tuned} ({tuned_info.family}) "
                 f"are different architectures")
        extraction = extract_lora(base, tuned, config, base_name=args.base, tuned_name=args.tuned,
                                  progress=not args.no_progress)
    except SdserveError as error:
        fail_on(error)
    atomic_write(args.out, lambda temporary: write_extraction(extraction, temporary, args.format))
    errors = sorted(extraction.errors, key=lambda e: -e.relative_error)
    print(f"extracted {len(errors)} modules at rank <= {args.rank}, skipped {len(extraction.skipped)} "
          f"unchanged; relative error max {extraction.max_error:.3g}, mean {extraction.mean_error:.3g}")
    for error in errors[:5]:
        print(f"  {error.relative_error:9.3g}  rank {error.rank:<3d} {error.target}")
    if extraction.changed_biases:
        count = len(extraction.changed_biases)
        print(f"note: {count} module{'s' if count != 1 else ''} changed their bias too; a LoRA holds no biases")
    for component in extraction.changed_elsewhere:
        print(f"note: {component} differs from the base too; pass --text-encoder to extract it")
    if args.report is not None:
        report = {
            "base": args.base, "tuned": args.tuned, "rank": args.rank,
            "max_relative_error": extraction.max_error, "mean_relative_error": extraction.mean_error,
            "modules": [{"target": e.target, "rank": e.rank, "relative_error": e.relative_error,
                         "delta_norm": e.delta_norm} for e in extraction.errors],
            "skipped": list(extraction.skipped), "changed_biases": list(extraction.changed_biases),
        }
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({args.format} layout)")


def _register_inspect(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser(
        "inspect", help="report an adapter file's kind, rank, targets and base family",
        description="Read an adapter file's keys, shapes and metadata and report its kind (LoRA, LoCon, LoHa, "
                    "LoKr, DoRA, embedding, hypernetwork), ranks, targets and base family. Kinds that are not "
                    "served (OFT, BOFT, GLoRA, IA3, kohya diff) are refused, naming the kind. With --model, the "
                    "file is also loaded against that model, as the server would load it. A ControlNet or "
                    "IP-Adapter packed by `sdserve adapters pack` is reported as such (with --model: the "
                    "server's upload check against that model).",
    )
    inspect.add_argument("file", metavar="FILE.safetensors", help="the adapter file")
    inspect.add_argument("--model", metavar="MODEL", help="a built-in model name or a diffusers directory to check "
                                                          "the file against")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--all-targets", action="store_true", help="list every target module, not the first ten")
    inspect.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from sdserve.adapters.inspect import describe
    from sdserve.cli.common import quiet_libraries

    quiet_libraries()
    if not os.path.isfile(args.file):
        fail(f"{args.file}: no such file")
    name = os.path.basename(args.file)
    from sdserve.adapters.conditioning import pack_kind

    packed = pack_kind(args.file)
    if packed is not None:
        _inspect_pack(args, name, packed)
        return
    try:
        summary = describe(args.file, name)
        check = _check_against(args.file, name, args.model, summary.kind) if args.model else None
    except SdserveError as error:
        fail_on(error)
    report = {"file": name, **asdict(summary), **({"model": check} if check else {})}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    ranks = ", ".join(str(rank) if rank else "full (a LoKr of two whole halves)" for rank in summary.ranks)
    family = summary.family + (f" ({summary.family_source})" if summary.family_source else "")
    rows = [("kind", summary.kind), ("family", family)]
    if summary.rank is not None:
        rows.append(("rank", f"{summary.rank or 'full'}" + (f" (ranks {ranks})" if len(summary.ranks) > 1 else "")))
        rows.append(("modules", ", ".join(f"{kind} {count}" for kind, count in summary.modules.items())))
    if summary.layout:
        rows.append(("layout", summary.layout))
    rows.append(("components", ", ".join(summary.components)))
    shown = summary.targets if args.all_targets else summary.targets[:10]
    more = len(summary.targets) - len(shown)
    rows.append(("targets", "\n".ljust(13).join(shown) + (f"\n{'':12}... {more} more" if more else "")))
    if check:
        rows.append(("model", f"{args.model}: {check['verdict']}"))
        for line in check.get("served", []):
            rows.append(("", line))
    for label, value in rows:
        print(f"{label:<12}{value}")


def _inspect_pack(args: argparse.Namespace, name: str, kind: str) -> None:
    """A packed ControlNet / IP-Adapter (`sdserve adapters pack`): what it is and, with --model,
    the server's upload check against that model."""
    from sdserve.adapters import conditioning

    try:
        report = conditioning.summary(args.file, name, kind)
        if args.model:
            info, _ = _load_for_extract(args.model, "--model")
            facts = conditioning.model_facts(info.name, info.family, info.backend, info.unet_config,
                                             info.vae_scale_factor, info.unet_in_channels)
            check = conditioning.check_controlnet if kind == conditioning.CONTROLNET else conditioning.check_ip_adapter
            try:
                check(args.file, name, facts)
                report["model"] = {"verdict": f"fits ({info.family})"}
            except SdserveError as error:
                problem = getattr(error, "problem", None) or error.message
                report["model"] = {"verdict": f"does not fit: {problem}"}
    except SdserveError as error:
        fail_on(error)
    report = {"file": name, **report}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for label, value in report.items():
        if label == "model":
            value = f"{args.model}: {value['verdict']}"
        elif isinstance(value, dict):
            value = ", ".join(f"{key}={item}" for key, item in value.items()) or "-"
        print(f"{label:<20}{value}")


def _check_against(path: str, name: str, model: str, kind: str) -> dict:
    """Load the file against a model as the engine would; the verdict and how LyCORIS modules are served."""
    from sdserve.adapters import load_embedding, load_hypernetwork, load_lora, targets_of

    info, components = _load_for_extract(model, "--model")
    if kind == "embedding":
        load_embedding(path, name, dict(info.text_widths))
        return {"verdict": f"loads ({info.family})"}
    if kind == "hypernetwork":
        loaded = load_hypernetwork(path, name, tuple(info.attention_widths))
        ignored = f"; widths {list(loaded.ignored_widths)} ignored" if loaded.ignored_widths else ""
        return {"verdict": f"loads ({info.family}){ignored}"}
    adapter = load_lora(path, name, targets_of(components))
    served = {}
    for lyco in adapter.lycoris.values():
        key = f"{lyco.kind} {lyco.form}"
        served.setdefault(key, []).append(lyco.served_rank)
    lines = [f"{key}: {len(ranks)} module{'s' if len(ranks) > 1 else ''} served at rank "
             + (f"{min(ranks)}" if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}")
             for key, ranks in sorted(served.items())]
    return {"verdict": f"loads ({info.family}): {len(adapter.modules)} modules, {adapter.nbytes / 2**20:.2f} MiB "
                       f"served in float32", "served": lines}
