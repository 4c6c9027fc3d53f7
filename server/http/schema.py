"""Request schemas: one declaration per route body, which both validates requests and writes
the route's part of the OpenAPI document (`server.http.openapi`), so the two cannot drift.

    CHAT = Object({"model": String(), "temperature": Number(0, 2), ...})

    @bp.post("/chat/completions")
    @route("Create a chat completion", body=CHAT, tag="OpenAI")
    def chat_completions(body): ...     # body: the validated dict, defaults filled in

A field that is absent or null means "not given" (OpenAI's clients send nulls); it gets its
default. Fields nobody declared are passed through untouched (OpenAI ignores unknown fields,
for forward compatibility). Every failure is a 400 naming the field by its path
(`messages[0].content`), in the error shape of the route (`server.http.errors`). Numbers must
be finite: Python's `json` writes `NaN` and `Infinity`, and a NaN passes every `lo <= x <= hi`
test, so each number is checked for it, free-form values (a JSON schema, metadata) included.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field

from flask import request

from server.http.errors import APIError, bad_request

MISSING = object()


def _invalid(path: str, message: str, code: str = "invalid_value") -> APIError:
    return bad_request(message, param=path or None, code=code)


def json_type(value) -> str:
    """A value's JSON type, as an error message names it."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                       (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


def type_error(path: str, expected: str, value) -> APIError:
    return _invalid(path, f"Invalid type for '{path}': expected {expected}, got "
                    f"{json_type(value)}.", "invalid_type")


MAX_DEPTH = 64  # nesting a free-form value may have (a schema, metadata)


def check_finite(value, path: str, depth: int = 0) -> None:
    """Refuse NaN and +-Infinity anywhere inside a free-form value, and nesting past
    MAX_DEPTH (what reads it later, the grammar compiler too, recurses)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(path, f"Invalid value for '{path}': {value}; JSON numbers must be "
                       "finite (NaN and Infinity are not JSON).")
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        raise _invalid(path, f"'{path}' is nested more than {MAX_DEPTH} levels deep.")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, f"{path}.{key}" if path else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]", depth + 1)


@dataclass(kw_only=True)
class Schema:
    """A JSON value's schema. Subclasses validate one JSON type each."""

    description: str = ""
    default: object = None
    required: bool = False      # as a property of an Object
    nullable: bool = True       # null means "not given"
    expected: str = ""          # how a type error names what was expected

    def validate(self, value, path: str):
        raise NotImplementedError

    def json_schema(self) -> dict:
        out = self._schema()
        if self.nullable and not self.required and "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) \
                else [*out["type"], "null"]
        if self.description:
            out["description"] = self.description
        if self.default is not None:
            out["default"] = self.default
        return out

    def _schema(self) -> dict:
        return {}


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"


@dataclass(kw_only=True)
class NumberSchema(Schema):
    minimum: float | None = None
    maximum: float | None = None
    integer: bool = False

    def validate(self, value, path):
        name = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise type_error(path, self.expected or name, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid(path, f"Invalid value for '{path}': {value}; it must be a finite "
                           "number (NaN and Infinity are not JSON).")
        if self.integer:
            if value != int(value):
                raise type_error(path, self.expected or name, value)
            value = int(value)
        if (self.minimum is not None and value < self.minimum) or \
                (self.maximum is not None and value > self.maximum):
            raise _invalid(path, f"Invalid value for '{path}': {value}; it must be "
                           f"{_range_text(self.minimum, self.maximum)}.")
        return value

    def _schema(self):
        out = {"type": "integer" if self.integer else "number"}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


def Number(minimum=None, maximum=None, **kw) -> NumberSchema:  # noqa: N802 - reads as a type
    return NumberSchema(minimum=minimum, maximum=maximum, **kw)


def Integer(minimum=None, maximum=None, **kw) -> NumberSchema:  # noqa: N802 - reads as a type
    return NumberSchema(minimum=minimum, maximum=maximum, integer=True, **kw)


# 64-bit signed: what seeds and other free integers may be (numpy overflows past it)
INT64 = (-(2**63), 2**63 - 1)


@dataclass(kw_only=True)
class Boolean(Schema):
    def validate(self, value, path):
        if not isinstance(value, bool):
            raise type_error(path, self.expected or "a boolean", value)
        return value

    def _schema(self):
        return {"type": "boolean"}


@dataclass(kw_only=True)
class String(Schema):
    enum: tuple | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    pattern_text: str = ""  # how an error explains the pattern

    def validate(self, value, path):
        if not isinstance(value, str):
            raise type_error(path, self.expected or "a string", value)
        if self.enum is not None and value not in self.enum:
            options = ", ".join(repr(e) for e in self.enum)
            raise _invalid(path, f"Invalid value for '{path}': {value!r}; expected one of "
                           f"{options}.")
        if self.min_length is not None and len(value) < self.min_length:
            raise _invalid(path, f"'{path}' must not be empty." if self.min_length == 1 else
                           f"'{path}' must hold at least {self.min_length} characters.")
        if self.max_length is not None and len(value) > self.max_length:
            raise _invalid(path, f"'{path}' holds {len(value)} characters; at most "
                           f"{self.max_length} are allowed.")
        if self.pattern is not None and not re.search(self.pattern, value):
            raise _invalid(path, f"Invalid value for '{path}': {value!r}; it must be "
                           f"{self.pattern_text or 'match ' + self.pattern}.")
        return value

    def _schema(self):
        out: dict = {"type": "string"}
        if self.enum is not None:
            out["enum"] = list(self.enum)
        if self.min_length is not None:
            out["minLength"] = self.min_length
        if self.max_length is not None:
            out["maxLength"] = self.max_length
        if self.pattern is not None:
            out["pattern"] = self.pattern
        return out


@dataclass(kw_only=True)
class Array(Schema):
    items: Schema | None = None
    min_items: int | None = None
    max_items: int | None = None

    def validate(self, value, path):
        if not isinstance(value, list):
            raise type_error(path, self.expected or "an array", value)
        if self.min_items is not None and len(value) < self.min_items:
            raise _invalid(path, f"'{path}' must be a non-empty array." if self.min_items == 1
                           else f"'{path}' must hold at least {self.min_items} items.")
        if self.max_items is not None and len(value) > self.max_items:
            raise _invalid(path, f"'{path}' holds {len(value)} items; at most "
                           f"{self.max_items} are allowed.")
        if self.items is None:
            check_finite(value, path)
            return value
        return [_item(self.items, v, f"{path}[{i}]") for i, v in enumerate(value)]

    def _schema(self):
        out: dict = {"type": "array"}
        if self.items is not None:
            out["items"] = self.items.json_schema()
        if self.min_items is not None:
            out["minItems"] = self.min_items
        if self.max_items is not None:
            out["maxItems"] = self.max_items
        return out


def _item(schema: Schema, value, path: str):
    if value is None:
        if schema.nullable:
            return None
        raise type_error(path, schema.expected or _expected(schema), value)
    return schema.validate(value, path)


def _expected(schema: Schema) -> str:
    t = schema._schema().get("type")
    return {"string": "a string", "integer": "an integer", "number": "a number",
            "boolean": "a boolean", "array": "an array", "object": "an object"}.get(t, "a value")


@dataclass(kw_only=True)
class ObjectSchema(Schema):
    properties: dict[str, Schema] = field(default_factory=dict)
    values: Schema | None = None   # the schema of every other property (a map, whose keys
    #                                are data, so its errors name the map itself), if any
    title: str = ""                # a name for the document's components

    def validate(self, value, path):
        if not isinstance(value, dict):
            raise type_error(path, self.expected or "an object", value)
        out = dict(value)
        for name, schema in self.properties.items():
            where = f"{path}.{name}" if path else name
            given = value.get(name)
            if given is None:
                if schema.required:
                    raise _invalid(where, f"Missing required parameter: '{where}'.",
                                   "missing_required_parameter")
                out[name] = schema.default
                continue
            out[name] = schema.validate(given, where)
        for name, given in value.items():
            if name in self.properties:
                continue
            if self.values is not None:
                out[name] = _item(self.values, given, path)
        return out

    def _schema(self):
        out: dict = {"type": "object"}
        if self.properties:
            out["properties"] = {k: v.json_schema() for k, v in self.properties.items()}
            required = [k for k, v in self.properties.items() if v.required]
            if required:
                out["required"] = required
        if self.values is not None:
            out["additionalProperties"] = self.values.json_schema()
        return out


def Object(properties: dict | None = None, **kw) -> ObjectSchema:  # noqa: N802 - a type
    return ObjectSchema(properties=properties or {}, **kw)


@dataclass(kw_only=True)
class Free(Schema):
    """Any JSON value of the given types (a JSON schema, metadata): only finiteness checked."""

    types: tuple = ("object",)

    def validate(self, value, path):
        py = {"object": dict, "array": list, "string": str, "boolean": bool}
        if not any(isinstance(value, py[t]) for t in self.types):
            raise type_error(path, self.expected or " or ".join(
                "an object" if t == "object" else f"a {t}" for t in self.types), value)
        check_finite(value, path)
        return value

    def _schema(self):
        return {"type": self.types[0] if len(self.types) == 1 else list(self.types)}


@dataclass(kw_only=True)
class OneOf(Schema):
    """The first alternative whose JSON type matches; its own checks then apply."""

    options: tuple = ()

    def validate(self, value, path):
        for option in self.options:
            if _type_matches(option, value):
                return option.validate(value, path)
        raise type_error(path, self.expected or " or ".join(_expected(o) for o in self.options),
                         value)

    def json_schema(self) -> dict:
        out: dict = {"anyOf": [o.json_schema() for o in self.options]}
        if self.nullable and not self.required:
            out["anyOf"].append({"type": "null"})
        if self.description:
            out["description"] = self.description
        if self.default is not None:
            out["default"] = self.default
        return out


def _type_matches(schema: Schema, value) -> bool:
    if isinstance(schema, Free):
        py = {"object": dict, "array": list, "string": str, "boolean": bool}
        return any(isinstance(value, py[t]) for t in schema.types)
    if isinstance(schema, OneOf):
        return any(_type_matches(o, value) for o in schema.options)
    t = schema._schema().get("type")
    if t == "boolean":
        return isinstance(value, bool)
    if t in ("integer", "number"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "array": list, "object": dict}[t])


# --- JSON bodies --------------------------------------------------------------------------

def parse_json(raw: bytes) -> dict:
    """A request body → a dict, or the 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", code="invalid_json") \
            from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    return body


# --- routes -------------------------------------------------------------------------------

@dataclass
class RouteDoc:
    """What the OpenAPI document says about one route, beside its body schema."""

    summary: str
    body: ObjectSchema | None = None
    tag: str = "numbalm"
    errors: str = "openai"             # the error shape (server.http.errors.SHAPES)
    streams: bool = False              # may answer with a stream (`stream_media`)
    stream_media: str = "text/event-stream"  # Ollama's routes stream NDJSON
    response: str = "application/json"  # the media type of a success
    query: dict[str, Schema] = field(default_factory=dict)  # documented query parameters
    description: str = ""


def route(summary: str, body: ObjectSchema | None = None, **doc):
    """Document a view (and validate its JSON body, passed to it as `body=`)."""
    api = RouteDoc(summary, body, **doc)

    def wrap(view):
        if body is None:
            view.api = api
            return view

        @functools.wraps(view)
        def validated(**kwargs):
            given = parse_json(request.get_data(cache=False))
            return view(body=body.validate(given, ""), **kwargs)

        validated.api = api
        return validated

    return wrap
