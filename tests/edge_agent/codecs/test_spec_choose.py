"""CodecSpec text form and choose_codec's negotiation rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.codecs import CODEC_IDS, CODEC_NAMES, DEFAULT_PREFERENCES, NETWORK_TYPES, CodecSpec, choose_codec
from edge_agent.errors import ConfigError, ContractViolation


def test_codec_names_and_ids() -> None:
    assert CODEC_NAMES == ("fp32", "fp16", "int8", "int8-channel", "int4", "int2", "sign", "topk", "topk-int8")
    assert sorted(CODEC_IDS.values()) == list(range(1, 10))


@pytest.mark.parametrize(
    ("text", "spec", "canonical"),
    [
        ("int8", CodecSpec("int8"), "int8"),
        ("int4+zstd", CodecSpec("int4", zstd=True), "int4+zstd"),
        ("topk-int8:0.01", CodecSpec("topk-int8", 0.01), "topk-int8:0.01"),
        ("topk:0.05+zstd", CodecSpec("topk", 0.05, True), "topk:0.05+zstd"),
        ("topk", CodecSpec("topk"), "topk:0.01"),
        (" topk:1 ", CodecSpec("topk", 1.0), "topk:1.0"),
        ("topk:1e-3", CodecSpec("topk", 0.001), "topk:0.001"),
    ],
)
def test_parse_and_canonical_text(text: str, spec: CodecSpec, canonical: str) -> None:
    assert CodecSpec.parse(text) == spec
    assert str(spec) == canonical
    assert CodecSpec.parse(str(spec)) == spec


@settings(max_examples=100, deadline=None, database=None)
@given(
    st.sampled_from(CODEC_NAMES),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_subnormal=False),
    st.booleans(),
)
def test_str_parse_round_trip(name: str, fraction: float, zstd: bool) -> None:
    spec = CodecSpec(name, fraction, zstd) if name.startswith("topk") else CodecSpec(name, zstd=zstd)
    assert CodecSpec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "valid codecs: fp32, fp16, int8, int8-channel, int4, int2, sign, topk, topk-int8"),
        ("int9", "unknown codec 'int9'; valid codecs: fp32"),
        ("INT8", "valid codecs"),
        ("int8+gzip", "valid codecs"),
        ("int8+zstd+zstd", "valid codecs"),
        ("int8:0.5", "only applies to topk"),
        ("topk:", "not a number"),
        ("topk:abc", "not a number"),
        ("topk: 0.1", "not a number"),
        ("topk:0", r"fraction must be in \(0, 1\]"),
        ("topk:1.5", r"fraction must be in \(0, 1\]"),
        ("topk:nan", r"fraction must be in \(0, 1\]"),
        ("topk:-0.1", r"fraction must be in \(0, 1\]"),
    ],
)
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CodecSpec.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError, match="valid codecs"):
        CodecSpec("gzip")
    with pytest.raises(ConfigError, match="only applies to top-k"):
        CodecSpec("int8", fraction=0.5)
    with pytest.raises(ConfigError, match="must be a bool"):
        CodecSpec("int8", zstd=1)  # type: ignore[arg-type]
    spec = CodecSpec("topk", 0.01)
    assert [spec.topk_count(n) for n in (0, 1, 99, 100, 101, 4608)] == [0, 1, 1, 1, 2, 47]


CELLULAR = {"cellular": ["topk-int8:0.02", "int4+zstd", "int8"], "wifi": ["int8", "fp16"]}


def test_choose_first_device_preference_the_server_accepts() -> None:
    spec = choose_codec(["fp16", "int4", "topk-int8:0.5+zstd"], CELLULAR, "cellular")
    assert spec == CodecSpec("topk-int8", 0.02)  # device's fraction and zstd, not the server's
    assert choose_codec(["fp16", "int4"], CELLULAR, "cellular") == CodecSpec("int4", zstd=True)
    assert choose_codec(["fp16", "int8"], CELLULAR, "wifi") == CodecSpec("int8")


def test_choose_falls_back_to_first_supported_accepted() -> None:
    assert choose_codec(["zfp:0.3", "sign", "fp32"], CELLULAR, "cellular") == CodecSpec("sign")
    assert choose_codec(["topk:0.1+zstd"], CELLULAR, "wifi") == CodecSpec("topk", 0.1, True)
    with pytest.raises(ContractViolation, match="zfp"):
        choose_codec(["zfp", "int16"], CELLULAR, "cellular")


def test_choose_defaults() -> None:
    assert choose_codec([], CELLULAR, "cellular") == CodecSpec("fp32")
    every = list(CODEC_NAMES)
    # network missing from the device config: DEFAULT_PREFERENCES for it
    assert choose_codec(every, CELLULAR, "ethernet") == CodecSpec.parse(DEFAULT_PREFERENCES["ethernet"][0])
    # unknown network type: the "unknown" entry
    assert choose_codec(every, {"unknown": ["int2"]}, "satellite") == CodecSpec("int2")
    assert choose_codec(every, {}, "satellite") == CodecSpec.parse(DEFAULT_PREFERENCES["unknown"][0])
    assert choose_codec(every, {}, "cellular").name == "topk-int8"


def test_default_preferences_are_valid() -> None:
    assert tuple(DEFAULT_PREFERENCES) == NETWORK_TYPES
    for texts in DEFAULT_PREFERENCES.values():
        assert all(CodecSpec.parse(text) for text in texts)


def test_invalid_device_preference_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'wifi'.*int9"):
        choose_codec(["int8"], {"wifi": ["int9"]}, "wifi")
    with pytest.raises(ConfigError, match="list"):
        choose_codec(["int8"], {"wifi": "int8"}, "wifi")
