"""What an adapter file is, read from its keys, shapes and metadata alone (no base model needed).

`describe` reports the file's kind (LoRA, LoCon, LoHa, LoKr, DoRA, embedding, hypernetwork; a
LyCORIS file mixing algorithms per module type is e.g. "LoHa+LoCon"), its ranks, the modules or
tokens it targets, and the base family it was made for. Kinds that are not served (OFT, BOFT,
GLoRA, IA3, kohya diff) are refused with UnsupportedAdapterKind naming the kind, as loading does.

The family is read, in this order, from what the file says (sdserve's trainers'
"sdserve_base_model_family", kohya's "ss_base_model_version", "modelspec.architecture"), from
keys only SDXL files have (a second text encoder, the original UNet's block names), and from
widths: the cross-attention context (attn2.to_k/to_v inputs: 768 SD 1.x, 1024 SD 2.x, 2048
SDXL) or the text encoder's (768 / 1024). Otherwise "unknown": a file for the tiny test models
says nothing the real families differ in. Whether a file fits a given model is `load_lora`'s
verdict against that model's modules, which also names any key that does not fit.

`listing` reduces a description to what the server lists for a registered file (AdapterInfo's
form, rank and targets, and a Concept Slider's trained scales and suggested start); the server runs
it once per upload, in its upload-check worker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from sdserve.adapters import detect
from sdserve.adapters.formats.kohya import LOHA_ROLES, LOKR_ROLES, PREFIXES
from sdserve.adapters.hypernetwork import METADATA_KEY as HYPERNETWORK_METADATA
from sdserve.adapters.hypernetwork import PREFIX as HYPERNETWORK_PREFIX
from sdserve.adapters.reader import Source, read_safetensors
from sdserve.errors import AdapterError, UnsupportedAdapterKind

# Context width of the UNet's cross-attention (its text encoders' output) -> family.
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_FAMILY = {768: "sd1", 1024: "sd2"}
_KIND_ORDER = ("DoRA", "LoHa", "LoKr", "LoCon", "LoRA")
# Suffix of a factor key -> the role it plays in its module; longest first, so ".lora_A.weight" wins.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"), (".dora_scale", "dora"), (".lora_magnitude_vector", "dora"),
    (".alpha", "alpha"),
) + tuple((f".{role}", role) for role in LOHA_ROLES + LOKR_ROLES)
_SGM_BLOCKS = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks)_")
_FORM = re.compile(r"(lora|locon|loha|lokr|dora)(\+(lora|locon|loha|lokr|dora)){0,4}|")
# A slider's listed scales: what a request may use (engine.request.MAX_ADAPTER_SCALE; adapters
# does not import the engine) and few enough to list; a file saying more lists none.
_MAX_SLIDER_SCALE = 100.0
_MAX_SLIDER_SCALES = 16


@dataclass(frozen=True)
class AdapterSummary:
    """One file, described."""

    kind: str  # "LoRA", "LoCon", "LoHa", "LoKr", "DoRA", "embedding", "hypernetwork", or kinds joined by "+"
    modules: Mapping[str, int]  # module kind -> how many modules of the file have it (empty for others)
    rank: int | None  # the highest rank of any module (LoHa: its dim; a LoKr of two whole halves: 0)
    ranks: tuple[int, ...]  # every distinct module rank, ascending
    targets: tuple[str, ...]  # module names as the file writes them; an embedding's tokens; hypernetwork widths
    components: tuple[str, ...]  # "unet", "text_encoder", "text_encoder_2"
    family: str  # "sd1", "sd2", "sdxl" or "unknown"
    family_source: str  # what told the family
    layout: str | None  # "kohya", "peft", "peft_legacy" for the LoRA kinds
    vectors: int = 0  # an embedding's vectors per token (SDXL: per text encoder); 0 for the other kinds
    slider: Mapping[str, str] = dataclass_field(default_factory=dict)  # a Concept Slider's scale_range, start (else empty)


@dataclass(frozen=True)
class Listing:
    """What a server lists about a registered file (AdapterInfo's form, rank, targets, slider_scales
    and slider_start): `describe` reduced to five values; the empty values for a file it could not
    describe."""

    form: str = ""  # the LoRA kinds' `kind` in lower case ("lora", "locon", "loha", "lokr", "loha+locon"); else ""
    rank: int = 0  # the LoRA kinds' highest module rank; else 0
    targets: int = 0  # modules (LoRA kinds), vectors (embedding) or attention widths (hypernetwork)
    slider_scales: tuple[float, ...] = ()  # a Concept Slider's trained scales as its file lists them; else ()
    slider_start: float = 0.0  # a Concept Slider's suggested start (fraction of the schedule, [0, 1]); else 0

    @classmethod
    def of(cls, summary: AdapterSummary) -> Listing:
        if summary.kind == "embedding":
            return cls(targets=summary.vectors)
        if summary.kind == "hypernetwork":
            return cls(targets=len(summary.targets))
        # A slider's two values are read independently: a file that garbles one still lists the other.
        scales = _slider_scales(summary.slider.get("scale_range", "")) or ()
        start = _slider_start(_number(summary.slider.get("start", "0"))) or 0.0
        return cls(form=summary.kind.lower(), rank=summary.rank or 0, targets=len(summary.targets),
                   slider_scales=scales, slider_start=start)

    def to_json(self) -> dict[str, str | int | float]:
        """The worker's report: JSON scalars only (`upload_check` passes nothing else back), so the
        scales travel as one comma-separated string of exact (repr) floats."""
        return {"form": self.form, "rank": self.rank, "targets": self.targets,
                "slider_scales": ",".join(repr(scale) for scale in self.slider_scales),
                "slider_start": self.slider_start}

    @classmethod
    def from_json(cls, value: object) -> Listing:
        """Read back what `listing` returned, as it came from an upload-check worker: a worker that
        parsed a hostile file is not trusted, so anything out of shape or range reads as empty
        (all five values). The slider values may be absent (the empty ones)."""
        if not isinstance(value, dict):
            return cls()
        form, rank, targets = value.get("form"), _count(value.get("rank")), _count(value.get("targets"))
        scales_text, start = value.get("slider_scales", ""), _slider_start(value.get("slider_start", 0.0))
        scales = _slider_scales(scales_text) if isinstance(scales_text, str) else None
        if (not isinstance(form, str) or not _FORM.fullmatch(form) or rank is None or targets is None
                or scales is None or start is None):
            return cls()
        return cls(form, rank, targets, scales, start)


def describe(source: Source, name: str) -> AdapterSummary:
    """Describe an adapter file (path or bytes); AdapterError / UnsupportedAdapterKind for files
    that are not one of the kinds above, or are not safetensors at all."""
    raw = read_safetensors(source, name)
    keys = set(raw.tensors)
    if HYPERNETWORK_METADATA in raw.metadata or (keys and all(k.startswith(HYPERNETWORK_PREFIX) for k in keys)):
        return _hypernetwork(keys)
    if keys and (keys <= {"clip_l", "clip_g"} or keys == {"emb_params"} or len(keys) == 1 and _token_like(keys)):
        return _embedding(raw.tensors)
    try:
        detect.check_kind(name, keys, raw.metadata)
    except UnsupportedAdapterKind as refused:
        if refused.kind != "dora":
            raise
    layout = detect.detect_layout(name, keys)
    modules = _modules(name, raw.tensors)
    kinds: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for module, roles in modules.items():
        kind, rank = _module_kind(roles)
        kinds[kind] = kinds.get(kind, 0) + 1
        ranks[module] = rank
    if detect.metadata_says_dora(raw.metadata):  # PEFT's config flag: every LoRA module is DoRA
        kinds = {("DoRA" if kind in ("LoRA", "LoCon") else kind): count for kind, count in kinds.items()}
    present = [kind for kind in _KIND_ORDER if kind in kinds]
    if "LoCon" in present and "LoRA" in present:
        present.remove("LoRA")  # a LoCon is a LoRA that also adapts convs
    family, evidence = _family(raw.metadata, raw.tensors, modules)
    return AdapterSummary(
        kind="+".join(present), modules=dict(sorted(kinds.items())), rank=max(ranks.values()),
        ranks=tuple(sorted(set(ranks.values()))), targets=tuple(sorted(modules)),
        components=tuple(sorted({_component(module) for module in modules})), family=family,
        family_source=evidence, layout=layout, slider=_slider(raw.metadata),
    )


def _slider(metadata: Mapping[str, str]) -> dict[str, str]:
    """What a slider file says of how to serve it (sdserve's trainer writes the scale range it
    trained and a suggested start fraction of the steps); empty for other files."""
    if not detect.is_slider(metadata):
        return {}
    keys = ("scale_range", "start")
    return {key: metadata[f"sdserve_slider_{key}"] for key in keys if f"sdserve_slider_{key}" in metadata}


def listing(source: Source, name: str, kind: str) -> dict[str, str | int | float]:
    """`Listing.of(describe(...)).to_json()`, for a file the loader of `kind` ("lora",
    "embedding", "hypernetwork") has accepted: the job an upload-check worker runs. A file that
    `describe` cannot read, or reads as another kind than the loader did, lists the empty values
    rather than wrong ones (the loader, not this, decides what is served)."""
    try:
        summary = describe(source, name)
    except AdapterError:
        return Listing().to_json()
    served_as = summary.kind if summary.kind in ("embedding", "hypernetwork") else "lora"
    return (Listing.of(summary) if served_as == kind else Listing()).to_json()


def _count(value: object) -> int | None:
    """An int32 count (not a bool, which JSON's true reads as), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31 else None


def _number(text: str) -> float | None:
    """A decimal number as metadata writes it ("-1", "0.3", "2e-1"), else None."""
    try:
        return float(text)
    except ValueError:
        return None


def _slider_scales(text: str) -> tuple[float, ...] | None:
    """A slider's scale range as its metadata writes it ("-2,-1,0,1,2"; "" for none): at most 16
    finite scales a request may use; None for anything else."""
    if not text:
        return ()
    if len(text) > 64 * _MAX_SLIDER_SCALES:  # before splitting: a hostile string may be long
        return None
    scales = tuple(_number(part.strip()) for part in text.split(","))
    if len(scales) > _MAX_SLIDER_SCALES or any(s is None or not abs(s) <= _MAX_SLIDER_SCALE for s in scales):
        return None  # `not <=` is True for NaN too
    return scales  # type: ignore[return-value]  # no None left


def _slider_start(value: object) -> float | None:
    """A suggested start: a fraction of the schedule in [0, 1] (an int or float, not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        return None  # NaN fails the range too
    return float(value)


def _token_like(keys: set[str]) -> bool:
    """A diffusers embedding's one key is its token: no LoRA or hypernetwork key looks like that."""
    (key,) = keys
    return "." not in key and not key.startswith("lora_")


def _hypernetwork(keys: set[str]) -> AdapterSummary:
    widths = sorted({int(key.split(".")[1]) for key in keys if key.count(".") >= 2 and key.split(".")[1].isdigit()})
    family = next((_CONTEXT_FAMILY[w] for w in widths if w in _CONTEXT_FAMILY), "unknown")
    return AdapterSummary(kind="hypernetwork", modules={}, rank=None, ranks=(),
                          targets=tuple(f"attention width {w}" for w in widths), components=("unet",),
                          family=family, family_source="attention widths" if family != "unknown" else "",
                          layout=None)


def _embedding(tensors: Mapping[str, torch.Tensor]) -> AdapterSummary:
    keys = set(tensors)
    if keys <= {"clip_l", "clip_g"}:
        family, evidence, components = "sdxl", "clip_l/clip_g keys", ("text_encoder", "text_encoder_2")
    else:
        width = next(iter(tensors.values())).shape[-1] if next(iter(tensors.values())).ndim else 0
        family = _TEXT_FAMILY.get(width, "unknown")
        evidence, components = (f"text width {width}" if family != "unknown" else ""), ("text_encoder",)
    (first,) = keys if len(keys) == 1 else ("clip_l",)
    vectors = tensors[first].shape[0] if tensors[first].ndim == 2 else 1
    token = first if first not in ("emb_params", "clip_l") else "(the file's name)"
    return AdapterSummary(kind="embedding", modules={}, rank=None, ranks=(),
                          targets=(f"{token} ({vectors} vector{'s' if vectors != 1 else ''})",),
                          components=components, family=family, family_source=evidence, layout=None,
                          vectors=vectors)


def _modules(name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module name (as the file writes it) -> role -> tensor."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        role = next(((key[: -len(suffix)], role) for suffix, role in _ROLE_SUFFIXES if key.endswith(suffix)), None)
        if role is None:
            continue  # e.g. PEFT's bias-free extras; loading judges them
        modules.setdefault(role[0], {})[role[1]] = tensor
    modules = {module: roles for module, roles in modules.items() if set(roles) - {"alpha"}}
    if not modules:
        raise AdapterError(name, "not an adapter file (no LoRA, LyCORIS, embedding or hypernetwork keys found)")
    return modules


def _module_kind(roles: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """(kind, rank) of one module from its roles' shapes."""
    if "hada_w1_b" in roles:
        return "LoHa", int(roles["hada_w1_b"].shape[0])
    if any(role.startswith("lokr_") for role in roles):
        factored = roles.get("lokr_w1_b", roles.get("lokr_w2_b"))
        return "LoKr", int(factored.shape[0]) if factored is not None and factored.ndim else 0
    down = roles.get("down")
    rank = int(down.shape[0]) if down is not None and down.ndim else 0
    if "dora" in roles:
        return "DoRA", rank
    return ("LoCon" if down is not None and down.ndim == 4 and tuple(down.shape[2:]) != (1, 1) else "LoRA"), rank


def _component(module: str) -> str:
    for prefix, component in PREFIXES.items():
        if module.startswith(prefix):
            return component
    return module.split(".")[0]


def _in_width(roles: Mapping[str, torch.Tensor]) -> int | None:
    """A linear module's input width as its factors give it."""
    down = roles.get("down", roles.get("hada_w1_b"))
    if down is not None and down.ndim == 2:
        return int(down.shape[1])
    first = roles.get("lokr_w1", roles.get("lokr_w1_b"))
    second = roles.get("lokr_w2", roles.get("lokr_w2_b"))
    if first is not None and second is not None and first.ndim == 2 and second.ndim == 2:
        return int(first.shape[1] * second.shape[1])
    return None


def _family(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
            modules: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[str, str]:
    said = metadata.get("sdserve_base_model_family", "")
    if said in ("sd1", "sd2", "sdxl"):
        return said, "sdserve_base_model_family metadata"
    for field in ("ss_base_model_version", "modelspec.architecture"):
        text = metadata.get(field, "").lower()
        if "xl" in text:
            return "sdxl", f"{field} metadata"
        if re.search(r"(sd_v2|v2[-_]|stable-diffusion-v2)", text):
            return "sd2", f"{field} metadata"
        if re.search(r"(sd_v1|v1[-_]|stable-diffusion-v1)", text):
            return "sd1", f"{field} metadata"
    if any(_component(module) == "text_encoder_2" for module in modules) or any(_SGM_BLOCKS.match(m) for m in modules):
        return "sdxl", "SDXL-only keys"
    for module, roles in modules.items():
        flat = module.replace(".", "_")
        if flat.endswith(("attn2_to_k", "attn2_to_v")):
            width = _in_width(roles)
            if width in _CONTEXT_FAMILY:
                return _CONTEXT_FAMILY[width], f"cross-attention width {width}"
    for module, roles in modules.items():
        if _component(module) == "text_encoder" and module.replace(".", "_").endswith("q_proj"):
            width = _in_width(roles)
            if width in _TEXT_FAMILY:
                return _TEXT_FAMILY[width], f"text encoder width {width}"
    return "unknown", ""
