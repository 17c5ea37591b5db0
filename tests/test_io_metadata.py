"""tvtool.metadata: the tvtool.* header keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tvtool.errors import InvalidInputError
from tvtool.metadata import FORMAT_VERSION, FileMeta, Kind, Mode, provenance

text = st.text(min_size=1, max_size=20)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | text,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=8)


@settings(deadline=None)
@given(kind=st.sampled_from(Kind), mode=st.none() | st.sampled_from(Mode),
       linearized=st.booleans(), architecture=st.none() | text, dataset=st.none() | text,
       prov=st.none() | st.dictionaries(text, json_values, max_size=4),
       extra=st.dictionaries(text.filter(lambda k: k not in FileMeta.__dataclass_fields__),
                             st.text(max_size=10), max_size=3))
def test_header_round_trip(kind, mode, linearized, architecture, dataset, prov, extra):
    meta = FileMeta(kind=kind, architecture=architecture, base_ref="x", base_fingerprint="sha256:1",
                    mode=mode, linearized=linearized, dataset=dataset, provenance=prov,
                    extra={k: v for k, v in extra.items() if k != "format_version"})
    header = meta.to_header()
    assert all(k.startswith("tvtool.") and isinstance(v, str) for k, v in header.items())
    assert header["tvtool.format_version"] == FORMAT_VERSION
    assert FileMeta.from_header(header, "f") == meta


def test_foreign_keys_are_ignored():
    header = {**FileMeta(kind=Kind.HEAD).to_header(), "format": "pt", "other.key": "1"}
    assert FileMeta.from_header(header, "f").kind is Kind.HEAD


@pytest.mark.parametrize(("change", "message"), [
    ({"tvtool.kind": None}, "no tvtool metadata"),
    ({"tvtool.format_version": "99"}, "format version '99'"),
    ({"tvtool.format_version": None}, "format version ''"),
    ({"tvtool.kind": "model"}, "unknown tvtool.kind"),
    ({"tvtool.mode": "magic"}, "unknown tvtool.mode"),
    ({"tvtool.linearized": "yes"}, "tvtool.linearized"),
    ({"tvtool.provenance": "{not json"}, "tvtool.provenance is not valid JSON"),
])
def test_malformed_headers(change, message):
    header = FileMeta(kind=Kind.TASK_VECTOR, mode=Mode.FULL,
                      provenance={"command": "x"}).to_header()
    for key, value in change.items():
        if value is None:
            header.pop(key, None)
        else:
            header[key] = value
    with pytest.raises(InvalidInputError, match=message):
        FileMeta.from_header(header, "'f'")


def test_provenance_records_versions():
    record = provenance("extract", {"a": 1}, seed=3)
    assert record["command"] == "extract" and record["seed"] == 3
    assert {"tvtool", "torch", "python"} <= set(record["versions"])
