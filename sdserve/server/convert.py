"""pb <-> domain conversion: the only module that touches the generated protobuf types.

Also the one reader of the request schema for JSON request files and CLI flags, so that a
field has one name, one type and one comment everywhere (ARCHITECTURE rule 1).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from sdserve.engine.request import AdapterSpec, RequestSpec, spec_field_names
from sdserve.errors import InvalidArgument
from sdserve.protos.sdserve.v1 import sdserve_pb2 as pb

PROTO_FILE = Path(__file__).resolve().parents[1] / "protos" / "sdserve" / "v1" / "sdserve.proto"

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
def _proto_comments(message: str) -> dict[str, str]:
    """Field name -> the `//` comment above it in the .proto file."""
    text = PROTO_FILE.read_text()
    body = re.search(rf"message {message} \{{(.*?)\n\}}", text, re.S)
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in (body.group(1) if body else "").splitlines():
        line = line.strip()
        if line.startswith("//"):
            pending.append(line[2:].strip())
            continue
        match = re.match(r"(?:optional |repeated )?[\w.]+ (\w+) = \d+;", line)
        if match:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


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
    comments = _proto_comments("GenerateRequest")
    out = []
    for field in pb.GenerateRequest.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            continue  # nested fields get their own CLI shorthands
        optional = field.has_presence and field.containing_oneof is not None
        out.append(RequestField(field.name, _python_type(field), optional, comments.get(field.name, "")))
    return tuple(out)


def _check_scalar(field: FieldDescriptor, value: Any) -> None:
    name = field.name
    if field.type in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return
            raise InvalidArgument(f"must be an integer (got {json.dumps(value)[:40]})", field=name)
        low, high = _INT_TYPES[field.type]
        if not low <= value <= high:
            raise InvalidArgument(f"is out of range (got {value})", field=name)
    elif field.type in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidArgument(f"must be a number (got {json.dumps(value)[:40]})", field=name)
    elif field.type == FieldDescriptor.TYPE_STRING and not isinstance(value, str):
        raise InvalidArgument(f"must be a string (got {json.dumps(value)[:40]})", field=name)


def pb_from_dict(data: dict[str, Any]) -> pb.GenerateRequest:
    """A JSON object with GenerateRequest's field names -> the proto message.

    Fields are checked one by one first, so that an error names its field and rule in one line
    (protobuf's own parser messages are long and name internal types).
    """
    if not isinstance(data, dict):
        raise InvalidArgument("a request must be a JSON object")
    by_name = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    clean: dict[str, Any] = {}
    for key, value in data.items():
        field = by_name.get(key)
        if field is None:
            raise InvalidArgument(f"unknown field {key[:64]!r}; fields are {', '.join(by_name)}")
        if value is None:
            continue  # JSON null = absent
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            _check_scalar(field, value)
        clean[key] = value
    try:
        return json_format.ParseDict(clean, pb.GenerateRequest())
    except json_format.ParseError as exc:  # nested messages; keep the first line only
        raise InvalidArgument(str(exc).splitlines()[0][:200]) from None


def spec_from_pb(message: pb.GenerateRequest) -> RequestSpec:
    """Proto -> RequestSpec, keeping absent optional fields absent."""
    values: dict[str, Any] = {}
    for name in spec_field_names():
        field = message.DESCRIPTOR.fields_by_name[name]
        if name == "adapters":
            values[name] = tuple(adapter_spec_from_pb(ref) for ref in message.adapters)
            continue
        if field.has_presence and not message.HasField(name):
            continue
        values[name] = getattr(message, name)
    return RequestSpec(**values)


def adapter_spec_from_pb(ref: pb.AdapterRef) -> AdapterSpec:
    return AdapterSpec(
        name=ref.name,
        path=ref.path,
        scale=ref.scale if ref.HasField("scale") else None,
        start=ref.start if ref.HasField("start") else None,
        end=ref.end if ref.HasField("end") else None,
    )


def spec_from_dict(data: dict[str, Any]) -> RequestSpec:
    return spec_from_pb(pb_from_dict(data))


def spec_from_json_line(line: str) -> RequestSpec:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    return spec_from_dict(data)
