"""pb <-> domain conversion: the only module that touches the generated protobuf types.

Also the one reader of the request schema for JSON request files and CLI flags, so that a
field has one name, one type and one comment everywhere (ARCHITECTURE rule 1).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.descriptor import FieldDescriptor

from sdserve.api.types import (
    AdapterSpec,
    ControlSpec,
    EmbeddingSpec,
    HypernetworkSpec,
    IPAdapterSpec,
    RequestSpec,
    spec_field_names,
)
from sdserve.errors import InvalidArgument
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb

_INT_TYPES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT_TYPES = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}


@dataclass(frozen=True)
class RequestField:
    """One scalar field of GenerateRequest, as the CLI and the JSON reader see it."""

    name: str
    python_type: type
    optional: bool
    comment: str


@cache
def _descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    from sdserve.protos.generate import DESCRIPTOR_SET

    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


@cache
def field_comments(message: str) -> dict[str, str]:
    """Field name -> its comment in the .proto, for a top-level message of sdserve.v1, read from
    the descriptor set `make protos` writes with source info (the stubs carry no comments)."""
    for file in _descriptor_set().file:
        names = [m.name for m in file.message_type]
        if message not in names:
            continue
        index = names.index(message)
        fields = file.message_type[index].field
        comments = {}
        for location in file.source_code_info.location:
            # path: 4 (message_type), message index, 2 (field), field index
            path = list(location.path)
            if len(path) == 4 and path[:3] == [4, index, 2]:
                comments[fields[path[3]].name] = " ".join(location.leading_comments.split())
        return comments
    raise KeyError(message)


def _python_type(field: FieldDescriptor) -> type:
    if field.type in _INT_TYPES:
        return int
    if field.type in _FLOAT_TYPES:
        return float
    if field.type == FieldDescriptor.TYPE_BOOL:
        return bool
    return str


@cache
def request_fields() -> tuple[RequestField, ...]:
    comments = field_comments("GenerateRequest")
    out = []
    for field in pb.GenerateRequest.DESCRIPTOR.fields:
        if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES):
            continue  # nested fields and images get their own CLI flags (files, shorthands)
        optional = field.has_presence and field.containing_oneof is not None
        out.append(RequestField(field.name, _python_type(field), optional, comments.get(field.name, "")))
    return tuple(out)


_DECIMAL = re.compile(r"-?[0-9]{1,20}")


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return type(value).__name__


def _check_scalar(field: FieldDescriptor, value: Any, name: str) -> None:
    if field.type in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return
            raise InvalidArgument(f"must be an integer (got {_shown(value)})", field=name)
        low, high = _INT_TYPES[field.type]
        if not low <= value <= high:
            raise InvalidArgument(f"is out of range (got {value})", field=name)
    elif field.type in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"must be a number (got {_shown(value)})", field=name)
    elif field.type == FieldDescriptor.TYPE_STRING and not isinstance(value, str):
        raise InvalidArgument(f"must be a string (got {_shown(value)})", field=name)
    elif field.type == FieldDescriptor.TYPE_BOOL and not isinstance(value, bool):
        raise InvalidArgument(f"must be true or false (got {_shown(value)})", field=name)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        if isinstance(value, bytes | bytearray | memoryview):
            return  # raw bytes from Python callers; `_check_one` base64-encodes them for the parser
        if not isinstance(value, str):
            raise InvalidArgument(f"must be a base64 string or bytes (got {_shown(value)})", field=name)
        try:
            base64.b64decode(value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True)
        except ValueError:  # binascii.Error, and non-ASCII text
            raise InvalidArgument("is not valid base64", field=name) from None
    elif field.type == FieldDescriptor.TYPE_ENUM:
        names = [v.name for v in field.enum_type.values]
        known = value in names if isinstance(value, str) else (
            isinstance(value, int) and not isinstance(value, bool)
            and value in field.enum_type.values_by_number)
        if not known:
            raise InvalidArgument(f"must be one of {', '.join(names)} (got {_shown(value)})", field=name)


def _check_fields(descriptor, data: Any, prefix: str) -> dict[str, Any]:
    """Check a JSON object against a message's fields, recursively; drop nulls (= absent).

    Every rule protobuf's JSON parser would apply is checked here first, so that an error names
    its field by path (`adapters[1].scale`) in one line; the parser's own messages quote Python
    exceptions ("object of type 'int' has no len()").
    """
    if not isinstance(data, dict):
        if not prefix:
            raise InvalidArgument("a request must be a JSON object")
        raise InvalidArgument(f"must be a JSON object (got {_shown(data)})", field=prefix)
    by_name = descriptor.fields_by_name
    clean: dict[str, Any] = {}
    for key, value in data.items():
        field = by_name.get(key) if isinstance(key, str) else None
        if field is None:
            inside = f" in {prefix}" if prefix else ""
            raise InvalidArgument(f"unknown field {str(key)[:64]!r}{inside}; fields are {', '.join(by_name)}")
        if value is None:
            continue
        path = f"{prefix}.{key}" if prefix else key
        if field.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgument(f"must be a list (got {_shown(value)})", field=path)
            items = []
            for index, item in enumerate(value):
                if item is None:
                    raise InvalidArgument("must not be null", field=f"{path}[{index}]")
                items.append(_check_one(field, item, f"{path}[{index}]"))
            clean[key] = items
        else:
            clean[key] = _check_one(field, value, path)
    return clean


def _check_one(field: FieldDescriptor, value: Any, path: str) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _check_fields(field.message_type, value, path)
    if field.type in _INT_TYPES and isinstance(value, str) and _DECIMAL.fullmatch(value):
        # The proto's JSON mapping writes 64-bit integers as strings (a response's "seed": "42"),
        # and its parsers take either form for every integer field: so a response echoed back parses.
        value = int(value)
    _check_scalar(field, value, path)
    if field.type == FieldDescriptor.TYPE_BYTES and not isinstance(value, str):
        return base64.b64encode(bytes(value)).decode("ascii")  # json_format reads bytes as base64
    return value


def map_bytes_fields(data: Any, convert_value: Any, descriptor: Any = None) -> Any:
    """A copy of a request dict with `convert_value` applied to the value of every bytes field
    (init_image, mask, controlnets[i].image, ...), found through the proto's descriptor, so a new
    image field needs no code here. Anything that is not a known field is left as it is (the
    checks of `pb_from_dict` refuse it later, naming its field)."""
    descriptor = descriptor or pb.GenerateRequest.DESCRIPTOR
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for key, value in data.items():
        field = descriptor.fields_by_name.get(key) if isinstance(key, str) else None
        if field is None or value is None:
            continue
        if field.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_BYTES):
            continue

        def convert(item: Any, field: FieldDescriptor = field) -> Any:
            if field.type == FieldDescriptor.TYPE_BYTES:
                return convert_value(item)
            return map_bytes_fields(item, convert_value, field.message_type)

        repeated = field.is_repeated and isinstance(value, list)
        out[key] = [convert(item) for item in value] if repeated else convert(value)
    return out


def pb_from_dict(data: dict[str, Any]) -> pb.GenerateRequest:
    """A JSON object with GenerateRequest's field names -> the proto message.

    Fields are checked one by one first, so that an error names its field and rule in one line
    (protobuf's own parser messages are long and name internal types).
    """
    clean = _check_fields(pb.GenerateRequest.DESCRIPTOR, data, "")
    try:
        return json_format.ParseDict(clean, pb.GenerateRequest())
    except json_format.ParseError as exc:  # a rule the checks above missed; keep its first line
        raise InvalidArgument(str(exc).splitlines()[0][:200]) from None


def _optional(message, name: str):
    """A proto3 `optional` field's value, or None when it is absent."""
    return getattr(message, name) if message.HasField(name) else None


def spec_from_pb(message: pb.GenerateRequest) -> RequestSpec:
    """Proto -> RequestSpec, keeping absent optional fields absent."""

    values: dict[str, Any] = {}
    for name in spec_field_names():
        field = message.DESCRIPTOR.fields_by_name[name]
        if name == "adapters":
            values[name] = tuple(adapter_spec_from_pb(ref) for ref in message.adapters)
            continue
        if name in ("init_image", "mask"):
            values[name] = getattr(message, name) or None  # proto3 bytes: empty = absent
            continue
        if name == "controlnets":
            values[name] = tuple(
                ControlSpec(
                    model=unit.model,
                    image=unit.image,
                    preprocess=unit.preprocess,
                    scale=_optional(unit, "scale"),
                    start=_optional(unit, "start"),
                    end=_optional(unit, "end"),
                )
                for unit in message.controlnets
            )
            continue
        if name == "ip_adapters":
            values[name] = tuple(
                IPAdapterSpec(model=u.model, image=u.image, scale=_optional(u, "scale"))
                for u in message.ip_adapters
            )
            continue
        if name == "embeddings":
            values[name] = tuple(EmbeddingSpec(name=e.name, path=e.path, token=e.token) for e in message.embeddings)
            continue
        if name == "hypernetworks":
            values[name] = tuple(
                HypernetworkSpec(name=h.name, path=h.path, strength=_optional(h, "strength"))
                for h in message.hypernetworks
            )
            continue
        if name == "outpaint":
            if message.HasField("outpaint"):
                o = message.outpaint
                values[name] = (o.left, o.top, o.right, o.bottom)
            continue
        if field.has_presence and not message.HasField(name):
            continue
        values[name] = getattr(message, name)
    return RequestSpec(**values)


def adapter_spec_from_pb(ref: pb.AdapterRef) -> AdapterSpec:

    return AdapterSpec(
        name=ref.name,
        path=ref.path,
        scale=_optional(ref, "scale"),
        start=_optional(ref, "start"),
        end=_optional(ref, "end"),
    )


def spec_from_dict(data: dict[str, Any]) -> RequestSpec:
    return spec_from_pb(pb_from_dict(data))


def spec_from_json_line(line: str) -> RequestSpec:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    return spec_from_dict(data)


# -- the services: responses, events and registration (server side) ----------------------------

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name for name in ("ImageGeneration", "Adapters", "Models")
)


@dataclass(frozen=True)
class Malformed:
    """What a handler receives in place of a request message that did not parse.

    gRPC's own deserializer failure answers UNKNOWN with a Python class name and logs a
    traceback, before the caller is even authenticated. Parsing leniently instead lets the
    handler authenticate first and then refuse with INVALID_ARGUMENT (see `status`).
    """

    message_type: str  # the expected message's full name, e.g. "sdserve.v1.GenerateRequest"


def _lenient(message_class: Any) -> Any:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, invalid UTF-8 in a string field, recursion limits
            return Malformed(message_class.DESCRIPTOR.full_name)

    return parse


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_services(server: Any, generation: Any, adapters: Any, models: Any) -> None:
    """Register the three sdserve.v1 servicers (duck-typed: any object with the methods), with
    lenient request parsing (`Malformed`); the methods are read from the proto's descriptor."""
    for service_name, servicer in (("ImageGeneration", generation), ("Adapters", adapters), ("Models", models)):
        service = pb.DESCRIPTOR.services_by_name[service_name]
        handlers = {}
        for method in service.methods:
            make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
            handlers[method.name] = make(
                getattr(servicer, method.name),
                request_deserializer=_lenient(getattr(pb, method.input_type.name)),
                response_serializer=getattr(pb, method.output_type.name).SerializeToString,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)


def check_parsed(request: Any) -> None:
    """Raise INVALID_ARGUMENT for a request that did not parse (call after authenticating)."""
    if isinstance(request, Malformed):
        raise InvalidArgument(f"the request is not a valid {request.message_type} message (malformed protobuf)")


@dataclass(frozen=True)
class AdapterUse:
    """One adapter a request used: the name it gave, the file's digest, and whether it is shared."""

    name: str
    sha256: str
    shared: bool
    kind: str = "lora"


def generate_response(
    request_id: str,
    model: str,
    seed: int,
    images: list[tuple[bytes, int, int]],
    timings: dict[str, float],
    adapters: list[AdapterUse],
    backend: str = "eager",
    variant: str = "",
) -> pb.GenerateResponse:
    """`images` are (png bytes, width, height); `timings` has queue, adapter_load, denoise, decode, total;
    `backend`/`variant`: what ran the steps (a compiled variant's name, or "" on the eager path)."""
    return pb.GenerateResponse(
        images=[pb.GeneratedImage(png=png, width=w, height=h, index=i) for i, (png, w, h) in enumerate(images)],
        seed=seed,
        timings=pb.GenerationTimings(**{k: float(timings.get(k, 0.0)) for k in pb.GenerationTimings.DESCRIPTOR.fields_by_name}),
        adapters=[pb.AdapterUsed(name=a.name, sha256=a.sha256, shared=a.shared, kind=a.kind) for a in adapters],
        model=model,
        request_id=request_id,
        backend=backend,
        variant=variant,
    )


def queued_event(request_id: str, position: int) -> pb.GenerateEvent:
    return pb.GenerateEvent(queued=pb.Queued(request_id=request_id, queue_position=position))


def progress_event(step: int, total_steps: int, preview_png: bytes = b"") -> pb.GenerateEvent:
    return pb.GenerateEvent(progress=pb.Progress(step=step, total_steps=total_steps, preview_png=preview_png))


def result_event(response: pb.GenerateResponse) -> pb.GenerateEvent:
    return pb.GenerateEvent(result=response)


@dataclass(frozen=True)
class UploadHeader:
    name: str
    kind: str
    family: str
    sha256: str
    shared: bool
    size: int
    model: str = ""  # the served model to validate against; "" = every served model of `family`


def upload_part(chunk: pb.UploadAdapterChunk) -> UploadHeader | bytes | None:
    """A chunk's content: the header, the data bytes, or None for an empty chunk."""
    check_parsed(chunk)
    which = chunk.WhichOneof("chunk")
    if which == "header":
        h = chunk.header
        return UploadHeader(h.name, h.kind, h.family, h.sha256.lower(), h.shared, h.size, h.model)
    if which == "data":
        return chunk.data
    return None


def adapter_info(record: Any) -> pb.AdapterInfo:
    """A registry record (name, kind, family, sha256, size, shared, created, form, rank, targets,
    the models it fits, a slider's scales and start) -> AdapterInfo."""
    return pb.AdapterInfo(
        name=record.name,
        kind=record.kind,
        family=record.family,
        sha256=record.sha256,
        size=record.size,
        shared=record.shared,
        created=record.created,
        form=record.form,
        rank=record.rank,
        targets=record.targets,
        models=list(record.fits),
        slider_scales=list(record.slider_scales),
        slider_start=record.slider_start,
    )


def list_adapters_response(records: list[Any]) -> pb.ListAdaptersResponse:
    return pb.ListAdaptersResponse(adapters=[adapter_info(r) for r in records])


def delete_adapter_response(sha256: str) -> pb.DeleteAdapterResponse:
    return pb.DeleteAdapterResponse(sha256=sha256)


def list_models_response(infos: list[Any], default: str) -> pb.ListModelsResponse:
    """`infos` are engine ModelInfo objects, in the order to list them."""
    models = []
    for info in infos:
        d, lim = info.defaults, info.limits
        models.append(
            pb.ModelDescription(
                name=info.name,
                family=info.family,
                description=info.description,
                is_default=info.name == default,
                # Field for field (the proto's names are the dataclasses'), so a new default
                # or limit that the proto lacks fails here instead of going unlisted.
                defaults=pb.ModelDefaultsInfo(**asdict(d)),
                limits=pb.ModelLimitsInfo(**asdict(lim)),
            )
        )
    return pb.ListModelsResponse(models=models)


# -- the client side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stubs:
    generation: Any
    adapters: Any
    models: Any


def stubs(channel: Any) -> Stubs:
    from sdserve.protos.sdserve.v1 import sdserve_pb2_grpc as rpc

    return Stubs(rpc.ImageGenerationStub(channel), rpc.AdaptersStub(channel), rpc.ModelsStub(channel))


def upload_chunks(header: UploadHeader, data: Any, chunk_bytes: int = 1 << 20) -> Any:
    """Yield an upload stream: the header, then `data` (bytes or an iterable of bytes) in chunks."""
    yield pb.UploadAdapterChunk(
        header=pb.AdapterHeader(
            name=header.name,
            kind=header.kind,
            family=header.family,
            sha256=header.sha256,
            shared=header.shared,
            size=header.size,
            model=header.model,
        )
    )
    pieces = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    for piece in pieces:
        piece = bytes(piece)
        for offset in range(0, len(piece), chunk_bytes):
            yield pb.UploadAdapterChunk(data=piece[offset : offset + chunk_bytes])


def request_message(kind: str, **fields_: Any) -> Any:
    """A request message of the simple RPCs by name: ListAdaptersRequest, GetAdapterRequest, ..."""
    return getattr(pb, kind)(**fields_)


def to_dict(message: Any) -> dict[str, Any]:
    """A response as a JSON-ready dict with the proto's field names (bytes as base64)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)
