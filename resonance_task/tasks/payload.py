"""A task type's payload: declared by its processor, checked before the task is accepted.

A processor declares its payload as a pydantic model (the usual way), a JSON Schema (a
dict: a plugin needs no pydantic model of its own) or a PayloadType (a payload that is not
a JSON object: offline_push also takes protobuf bytes). The same declaration is checked
at every door, POST /api/v1/tasks, its batch and the task intake, so a payload that can
never work is refused there, naming its field, instead of failing a run later. What is
stored and sent on is the payload as the declaration normalizes it (defaults filled in):
a retry next hour runs what was accepted, not a default worked out again. The OpenAPI
document shows each type's `json_schema()`, so the document and the check cannot differ.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import BaseModel, ValidationError

from resonance_task.tasks.errors import PermanentError

if TYPE_CHECKING:
    from resonance_task.proto.resonance.task.v1.task_pb2 import Task

M = TypeVar("M", bound=BaseModel)

# The problems named in one refusal past the first: a payload wrong everywhere would
# otherwise make an error string (and a status field) of any length.
MORE_PROBLEMS = 4


def field_name(path: Sequence[str | int]) -> str:
    """`payload.users[0]`: where in the payload, as the API's `field` names it."""
    name = "payload"
    for part in path:
        name += f"[{part}]" if isinstance(part, int) else f".{part}"
    return name


class PayloadInvalid(PermanentError):
    """The payload breaks its type's declaration: refused at submit (a 400), dead at the
    intake or at run time, never retried. `field` names where (`payload.period_end`)."""

    def __init__(self, path: Sequence[str | int], detail: str) -> None:
        self.field = field_name(path)
        self.detail = detail
        super().__init__(f"{self.field}: {detail}")


class PayloadType(ABC):
    """What a task type's payload is: how to check it, its normal form, its schema."""

    @abstractmethod
    def load(self, raw: bytes) -> Any:
        """The payload's value, checked; PayloadInvalid naming the field if it is wrong."""

    def dump(self, value: Any, raw: bytes) -> bytes:
        """The bytes to store and send on for `value` (loaded from `raw`)."""
        return raw

    @abstractmethod
    def json_schema(self) -> dict[str, Any]:
        """The payload's JSON Schema (2020-12, as OpenAPI 3.1 has it)."""


class ModelPayload(PayloadType):
    """A pydantic model: the processor gets the model instance as `ctx.payload`."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def load(self, raw: bytes) -> BaseModel:
        try:
            return self.model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            raise _refusal(exc) from None

    def dump(self, value: Any, raw: bytes) -> bytes:
        return value.model_dump_json().encode()  # type: ignore[no-any-return]

    def json_schema(self) -> dict[str, Any]:
        return self.model.model_json_schema()


class SchemaPayload(PayloadType):
    """A JSON Schema: the processor gets the parsed JSON, with the defaults of the
    top-level properties filled in (JSON Schema itself fills in nothing)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        from jsonschema import Draft202012Validator  # only for processors that use one

        Draft202012Validator.check_schema(schema)  # a broken schema fails its registration
        self._schema = dict(schema)
        self._validator = Draft202012Validator(self._schema)
        properties = self._schema.get("properties")
        self._defaults = {
            name: spec["default"]
            for name, spec in (properties.items() if isinstance(properties, Mapping) else ())
            if isinstance(spec, Mapping) and "default" in spec
        }

    def load(self, raw: bytes) -> Any:
        from jsonschema.exceptions import best_match

        try:
            value = json.loads(raw or b"{}")
        except (UnicodeError, ValueError) as exc:
            raise PayloadInvalid((), f"not JSON: {exc}") from None
        if isinstance(value, dict):
            value = {**self._defaults, **value}
        error = best_match(self._validator.iter_errors(value))
        if error is None:
            return value
        path = [p for p in error.absolute_path if isinstance(p, str | int)]
        # jsonschema puts a missing or an unexpected property at its parent: name the
        # property itself, as pydantic does.
        if error.validator == "required" and isinstance(error.instance, dict):
            missing = [n for n in error.validator_value if n not in error.instance]
            if missing:
                raise PayloadInvalid([*path, missing[0]], "required")
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
            extra = [n for n in error.instance if n not in known]
            if extra:
                raise PayloadInvalid([*path, extra[0]], "not allowed")
        raise PayloadInvalid(path, error.message)

    def dump(self, value: Any, raw: bytes) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def json_schema(self) -> dict[str, Any]:
        return self._schema


def payload_type(declared: Any) -> PayloadType:
    """A PayloadType from what a processor declares: a pydantic model class, a JSON
    Schema dict, or a PayloadType already."""
    if isinstance(declared, PayloadType):
        return declared
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return ModelPayload(declared)
    if isinstance(declared, Mapping):
        return SchemaPayload(declared)
    raise TypeError(
        f"a payload is declared by a pydantic model, a JSON Schema dict or a PayloadType, "
        f"not {declared!r}"
    )


def payload_of(task: Task, ctx: object, model: type[M]) -> M:
    """The task's payload as `model`: the runner's checked instance (`ctx.payload`), or,
    run outside a runner (a test, another caller), checked here."""
    value = getattr(ctx, "payload", None)
    if isinstance(value, model):
        return value
    loaded = ModelPayload(model).load(task.payload)
    assert isinstance(loaded, model)
    return loaded


def proto_json_field(message: str) -> str | None:
    """The field a `json_format.Parse` error is about, if it names one."""
    # It says 'Failed to parse <field> field: ...' or 'no field named "<x>"'.
    for marker in ('no field named "', "Failed to parse "):
        _, found, rest = message.partition(marker)
        if found:
            return rest.split('"')[0].split(" ")[0] or None
    return None


def _refusal(exc: ValidationError) -> PayloadInvalid:
    def said(error: Any) -> str:
        # A validator's own ValueError reads "Value error, <what it said>".
        return str(error["msg"]).removeprefix("Value error, ")

    first, *rest = exc.errors(include_url=False)
    detail = said(first) + "".join(
        f"; {field_name(e['loc'])}: {said(e)}" for e in rest[:MORE_PROBLEMS]
    )
    if len(rest) > MORE_PROBLEMS:
        detail += f"; {len(rest) - MORE_PROBLEMS} more"
    return PayloadInvalid(first["loc"], detail)


_INT64 = {"oneOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]}
_PROTO_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_ENUM: {"type": ["string", "integer"]},
    **{
        t: {"type": "integer"}
        for t in (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_SFIXED32,
        )
    },
    **{
        t: _INT64
        for t in (
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_FIXED64,
            FieldDescriptor.TYPE_SFIXED64,
        )
    },
}


def proto_json_schema(descriptor: Descriptor) -> dict[str, Any]:
    """A message's proto3 JSON form as a JSON Schema, from its descriptor: it follows the
    .proto file, so it cannot drift from what `json_format.Parse` accepts (which takes
    the lowerCamelCase names too: the schema leaves other properties open)."""
    properties: dict[str, Any] = {}
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value = _proto_field(entry.fields_by_name["value"])
            schema: dict[str, Any] = {"type": "object", "additionalProperties": value}
        else:
            schema = _proto_field(field)
            if field.is_repeated:
                schema = {"type": "array", "items": schema}
        properties[field.name] = schema
    return {"type": "object", "description": descriptor.full_name, "properties": properties}


def _proto_field(field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None:
        return proto_json_schema(field.message_type)
    return dict(_PROTO_SCALARS[field.type])
