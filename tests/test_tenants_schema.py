"""The tenants file's schema: each bad entry is one InputError naming the file, the field's path,
what was expected, what was found, and a fix."""

from __future__ import annotations

from typing import Any

import pytest

from phlora_nim.core.errors import InputError
from phlora_nim.router.tenants import key_digest, parse_tenants

DIGEST = "sha256:" + key_digest("k2")
GLOBS = "a list of glob patterns (strings)"
KEYS = "a non-empty list of keys (strings)"
TOP = "a top-level mapping with a non-empty list `tenants:`"
DROP = object()  # a field left out


def one(**fields: Any) -> dict[str, Any]:
    """A document with a single tenant ``a`` holding key ``k``, ``fields`` replacing or adding."""
    entry = {"name": "a", "keys": ["k"], **fields}
    return {"tenants": [{k: v for k, v in entry.items() if v is not DROP}]}


# (document, field path, expected, found)
BAD: list[tuple[Any, str, str, str]] = [
    (None, "tenants", TOP, "NoneType"),
    (["a"], "tenants", TOP, "list"),
    ({"tenant": []}, "tenants", TOP, "keys ['tenant']"),
    ({"tenants": []}, "tenants", TOP, "keys ['tenants']"),
    ({"tenants": {"name": "a"}}, "tenants", TOP, "keys ['tenants']"),
    ({"tenants": ["a"]}, "tenants[0]", "a mapping with name, keys, adapters", "str"),
    (one(name=DROP), "tenants[0].name", "a non-empty string", "nothing"),
    (one(name=""), "tenants[0].name", "a non-empty string", "''"),
    (one(name=7), "tenants[0].name", "a non-empty string", "7"),
    (one(keys=DROP), "tenant 'a'.keys", KEYS, "nothing"),
    (one(keys=[]), "tenant 'a'.keys", KEYS, "[]"),
    (one(keys="k"), "tenant 'a'.keys", KEYS, "'k'"),
    (one(keys=["k", 3]), "tenant 'a'.keys[1]", KEYS, "3"),
    (one(keys=["k", ""]), "tenant 'a'.keys[1]", KEYS, "''"),
    (one(keys=["sha256:abc"]), "tenant 'a'.keys[0]", "sha256: followed by 64 hex digits", "'sha256:abc'"),
    (one(keys=[DIGEST + "0"]), "tenant 'a'.keys[0]", "sha256: followed by 64 hex digits", repr(DIGEST + "0")),
    (one(adapters="support-*"), "tenant 'a'.adapters", GLOBS, "'support-*'"),
    (one(adapters=["x", None]), "tenant 'a'.adapters[1]", GLOBS, "None"),
    (one(base_models={"a": 1}), "tenant 'a'.base_models", GLOBS, "{'a': 1}"),
    (one(max_in_flight=0), "tenant 'a'.max_in_flight", "a positive integer", "0"),
    (one(max_in_flight=True), "tenant 'a'.max_in_flight", "a positive integer", "True"),
    (one(max_in_flight="8"), "tenant 'a'.max_in_flight", "a positive integer", "'8'"),
    (one(max_in_flight=2.5), "tenant 'a'.max_in_flight", "a positive integer", "2.5"),
    (one(adapter=["x"]), "tenant 'a'", "only the fields", "unknown ['adapter']"),
    (
        {"tenants": [{"name": "a", "keys": ["k"]}, {"name": "a", "keys": ["j"]}]},
        "tenant 'a'.name",
        "a name used once",
        "it twice",
    ),
    (
        {"tenants": [{"name": "a", "keys": ["k2"]}, {"name": "b", "keys": ["sha256:" + key_digest("k2").upper()]}]},
        "tenant 'b'.keys",
        "each key given to one tenant",
        "a key also held by tenant 'a'",
    ),
]


@pytest.mark.parametrize(("document", "path", "expected", "found"), BAD)
def test_each_bad_field_is_named(document: Any, path: str, expected: str, found: str) -> None:
    with pytest.raises(InputError) as info:
        parse_tenants(document, where="t.yaml")
    error = info.value
    assert error.where == f"t.yaml: {path}"
    assert error.expected is not None and error.expected.startswith(expected)
    assert error.found == found
    assert error.fix


def test_every_problem_is_listed_once() -> None:
    document = {
        "tenants": [
            {"name": "a", "keys": [], "colour": "red"},
            {"name": "b", "keys": ["k"], "max_in_flight": "x", "adapters": [1]},
            {"name": "c", "keys": ["k"]},
            {"name": "d", "keys": ["k"]},
        ]
    }
    with pytest.raises(InputError, match=r"\(5 problems\)") as info:
        parse_tenants(document, where="t.yaml")
    text = str(info.value)
    for where in ("tenant 'a'.keys:", "tenant 'a':", "tenant 'b'.max_in_flight:", "tenant 'b'.adapters[0]:"):
        assert f"t.yaml: {where}" in text
    assert "t.yaml: tenant 'd'.keys: invalid tenants file; expected each key given to one tenant" in text


def test_good_entries_keep_their_defaults() -> None:
    table = parse_tenants({"tenants": [{"name": "a", "keys": [DIGEST]}], "other": 1}, where="t.yaml")
    tenant = table.authenticate("Bearer k2")
    assert tenant is not None and tenant.adapters == () and tenant.base_models == ("*",)
    assert tenant.max_in_flight is None
