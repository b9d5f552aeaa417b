"""Protos <-> domain models, by field name: the servicers' one converter (no grpc, no hand copies).

A domain model (pydantic, frozen) mirrors a message field by field, under the same names:
- a message field the sender did not set is None in the model (when the model allows None) and
  a nested model otherwise; proto3 `optional` scalars are None when absent;
- enums are their short lowercase names ("OPTIMIZER_ADAMW_8BIT" -> "adamw_8bit", unset -> "");
  an unknown number is the caller's error, named by its field;
- repeated Label / Metric are dicts; Timestamp is a datetime, Duration a timedelta; other
  repeated fields are tuples.
So `from_proto(M, to_proto(m, P()))` == m, and a model never holds a proto.
"""

from __future__ import annotations

import typing
from datetime import UTC

from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message
from pydantic import BaseModel, ValidationError

from tunedock.errors import InvalidArgument

_MAPS = {"tunedock.v1.Label": ("key", "value"), "tunedock.v1.Metric": ("name", "value")}
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"


def enum_name(enum: EnumDescriptor, number: int, field: str) -> str:
    """The short name of an enum value ("" for 0); InvalidArgument for a number the enum lacks."""
    if number == 0:
        return ""
    value = enum.values_by_number.get(number)
    if value is None:
        raise InvalidArgument(f"{field}: unknown value {number}")
    return value.name.removeprefix(_prefix(enum)).lower()


def enum_number(enum: EnumDescriptor, name: str) -> int:
    return enum.values_by_name[_prefix(enum) + name.upper()].number if name else 0


def _prefix(enum: EnumDescriptor) -> str:
    return enum.values_by_number[0].name.removesuffix("UNSPECIFIED")


def _model_of(annotation) -> type[BaseModel]:
    """The model class in an annotation like `FullConfig | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    raise TypeError(f"no model in {annotation!r}")


def from_proto(model: type[BaseModel], message: Message, path: str = ""):
    values: dict = {}
    descriptor: Descriptor = message.DESCRIPTOR
    for f in descriptor.fields:
        if f.name not in model.model_fields:
            continue
        field_path = f"{path}{f.name}"
        annotation = model.model_fields[f.name].annotation
        value = getattr(message, f.name)
        repeated = f.is_repeated
        if f.message_type is not None and repeated and f.message_type.full_name in _MAPS:
            key, val = _MAPS[f.message_type.full_name]
            values[f.name] = {getattr(item, key): getattr(item, val) for item in value}
        elif f.message_type is not None and not repeated:
            if not message.HasField(f.name):
                continue  # the model's default: None where it allows None
            kind = f.message_type.full_name
            if kind in (_TIMESTAMP, _DURATION):
                try:
                    values[f.name] = value.ToDatetime(tzinfo=UTC) if kind == _TIMESTAMP else value.ToTimedelta()
                except (ValueError, OverflowError) as exc:
                    raise InvalidArgument(f"{field_path}: not a valid {f.message_type.name.lower()} ({exc})") from None
            else:
                values[f.name] = from_proto(_model_of(annotation), value, f"{field_path}.")
        elif repeated:
            values[f.name] = tuple(value)
        elif f.has_presence and not message.HasField(f.name):
            continue
        elif f.enum_type is not None:
            values[f.name] = enum_name(f.enum_type, value, field_path)
        else:
            values[f.name] = value
    try:
        return model(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{path}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(problems) from None


def to_proto(instance: BaseModel, message: Message) -> Message:
    """Fill `message` (a new proto of the mirrored type) from `instance`; returns it."""
    for f in message.DESCRIPTOR.fields:
        if f.name not in type(instance).model_fields:
            continue
        value = getattr(instance, f.name)
        if value is None:
            continue
        repeated = f.is_repeated
        target = getattr(message, f.name)
        if f.message_type is not None and repeated and f.message_type.full_name in _MAPS:
            key, val = _MAPS[f.message_type.full_name]
            for k, v in value.items():
                target.add(**{key: k, val: v})
        elif f.message_type is not None and not repeated:
            kind = f.message_type.full_name
            if kind == _TIMESTAMP:
                target.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
            elif kind == _DURATION:
                target.FromTimedelta(value)
            elif value != type(value)() or type(instance).model_fields[f.name].default is None:
                target.SetInParent()  # presence: an explicitly empty message (extract {}) stays set
                to_proto(value, target)
        elif repeated:
            target.extend(value)
        elif f.enum_type is not None:
            setattr(message, f.name, enum_number(f.enum_type, value))
        else:
            setattr(message, f.name, value)
    return message
