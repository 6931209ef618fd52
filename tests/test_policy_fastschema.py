"""The fast argument check agrees with jsonschema on every schema it accepts (differential test)."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema.validators import Draft202012Validator

from gateway.policy.fastschema import compile_check

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([0.0, 1.0, 2.5, -1.5]),
                    st.sampled_from(["", "a", "ab", "/srv/shared/x", "/etc/passwd", "ä", "12"]))
instances = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["path", "n", "mode", "tags", "x"]), inner, max_size=4)), max_leaves=8)
TYPES = ["object", "array", "string", "integer", "number", "boolean", "null"]


def schemas(depth: int = 2) -> st.SearchStrategy[Any]:
    leaf_keywords = {
        "type": st.one_of(st.sampled_from(TYPES), st.lists(st.sampled_from(TYPES), min_size=1, max_size=3, unique=True)),
        "enum": st.lists(scalars, min_size=1, max_size=3),
        "const": scalars,
        "minLength": st.integers(0, 3), "maxLength": st.integers(0, 3),
        "pattern": st.sampled_from(["^/srv/shared/", "a", "^[0-9]+$", "^$"]),
        "minimum": st.sampled_from([0, 1, 1.5, -2]), "maximum": st.sampled_from([0, 2, 2.5]),
        "exclusiveMinimum": st.sampled_from([0, 1]), "exclusiveMaximum": st.sampled_from([2, 3.5]),
        "minItems": st.integers(0, 2), "maxItems": st.integers(0, 2),
        "required": st.lists(st.sampled_from(["path", "n", "mode"]), max_size=2, unique=True),
        "description": st.just("annotations are ignored"),
    }
    keywords = dict(leaf_keywords)
    if depth > 0:
        sub = schemas(depth - 1)
        keywords["properties"] = st.dictionaries(st.sampled_from(["path", "n", "mode", "tags"]), sub, max_size=3)
        keywords["additionalProperties"] = st.one_of(st.booleans(), sub)
        keywords["items"] = sub
    body = st.fixed_dictionaries({}, optional=keywords)
    return st.one_of(st.booleans(), body) if depth < 2 else body


@settings(max_examples=600, deadline=None)
@given(schema=schemas(), instance=instances)
def test_fast_check_agrees_with_jsonschema(schema: Any, instance: Any) -> None:
    check = compile_check(schema)
    assert check is not None, schema
    assert check(instance) == Draft202012Validator(schema).is_valid(instance), (schema, instance)


@pytest.mark.parametrize("schema", [
    {"allOf": [{"type": "string"}]}, {"$ref": "#/$defs/x", "$defs": {"x": {}}}, {"format": "uri"},
    {"patternProperties": {"^a": {}}}, {"multipleOf": 2}, {"uniqueItems": True}, {"not": {}},
    {"properties": {"a": {"anyOf": [{}]}}}, {"$schema": "http://json-schema.org/draft-07/schema#"},
])
def test_keywords_outside_the_subset_fall_back_to_jsonschema(schema: Any) -> None:
    assert compile_check(schema) is None
