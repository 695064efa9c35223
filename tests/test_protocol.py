from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.agent import protocol

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), json_values, max_size=6), st.binary(max_size=1000))
def test_roundtrip_and_agreement_with_json(header, body):
    data = protocol.encode(header, body)
    frames = protocol.FrameDecoder().feed(data)
    assert frames == [(header, body)]
    assert json.loads(protocol.dumps(header)) == header


def test_incremental_decoding_byte_by_byte():
    data = protocol.encode({"id": 1, "ev": "stdout"}, b"x" * 100) + protocol.encode({"id": 2, "ev": "ok"})
    decoder = protocol.FrameDecoder()
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i:i + 1])
    assert [h["id"] for h, _ in out] == [1, 2]


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_frame_error(garbage):
    try:
        protocol.FrameDecoder().feed(garbage)
    except protocol.FrameError:
        pass


def test_bounds_are_enforced_when_encoding():
    with pytest.raises(protocol.FrameError):
        protocol.encode({"x": "a" * protocol.MAX_HEADER})
    with pytest.raises(protocol.FrameError):
        protocol.encode({}, b"x" * protocol.MAX_FRAME)
    with pytest.raises(protocol.FrameError):
        protocol.dumps({"x": float("nan")})
    with pytest.raises(protocol.FrameError):
        protocol.dumps({1: "non-string key"})
