"""Update masks (AIP-134): which fields of an Update request replace the stored resource."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from spindle_server.api.validation import Validator


def fields_to_update(
    validator: Validator, request: Message, mask: FieldMask, allowed: Iterable[str]
) -> list[str]:
    """Named paths; with an empty mask, every allowed field the request sets."""
    allowed_set = list(allowed)
    if mask.paths:
        unknown = [path for path in mask.paths if path not in allowed_set]
        for path in unknown:
            validator.add("update_mask", f"{path!r} cannot be updated; allowed: {', '.join(allowed_set)}")
        return [path for path in mask.paths if path in allowed_set]
    present = {descriptor.name for descriptor, _ in request.ListFields()}
    return [name for name in allowed_set if name in present]


def copy_fields(target: Message, source: Message, fields: Iterable[str]) -> None:
    for name in fields:
        value = getattr(source, name)
        descriptor = target.DESCRIPTOR.fields_by_name[name]
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            getattr(target, name).clear()
            getattr(target, name).update(value)
        elif descriptor.is_repeated:
            del getattr(target, name)[:]
            getattr(target, name).extend(value)
        elif descriptor.message_type is not None:
            if source.HasField(name):
                getattr(target, name).CopyFrom(value)
            else:
                target.ClearField(name)
        else:
            setattr(target, name, value)
