"""The signed-artifact contract (docs/protocol.md §8.5): the exact release statement bytes, MODEL
fields on the wire, ``manifest.sig``, the ``[ota]`` config table, the key files of
``fedflock pki signing-key``, and the server signing every MODEL it publishes (channel and directed)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from broker_server.models import ModelPublisher
from broker_server.pki.release_signer import ReleaseSigner
from edge_agent.crypto.ed25519 import verify
from edge_agent.crypto.signing import SigningKey, write_key_pair
from edge_agent.crypto.trust import TrustedKeys
from edge_agent.errors import ConfigError, MalformedMessage
from edge_agent.ota.ota_config import parse_ota_table
from edge_agent.protocol.messages import decode_message, encode_message
from edge_agent.protocol.model_messages import (
    ModelMessage,
    bundle_signature_line,
    parse_bundle_signature,
    release_statement,
)
from edge_agent.protocol.topics import Topics
from edge_agent.runtime.bundle import Bundle
from edge_agent.transport.memory import InMemoryBroker, InMemoryTransport

MODEL = ModelMessage(
    channel="dev-7",
    version=12,
    bundle_digest="ab" * 32,
    archive_sha256="cd" * 32,
    archive_size=4096,
    issued_at=1767225600123,
    rollout_id="current-v12-1a2b3c4d",
)


def test_the_release_statement_is_the_documented_ascii_lines() -> None:
    expected = (
        "fedflock release statement v1\n"
        "channel=dev-7\n"
        "version=12\n"
        f"bundle_digest={'ab' * 32}\n"
        f"archive_sha256={'cd' * 32}\n"
        "archive_size=4096\n"
        "rollout_id=current-v12-1a2b3c4d\n"
        "issued_at=1767225600123\n"
    ).encode("ascii")
    assert release_statement(MODEL) == expected
    # the signature fields are not part of it
    assert release_statement(dataclasses.replace(MODEL, signature="00" * 64, signing_key="11" * 32)) == expected


def test_signed_model_fields_round_trip_and_bad_ones_are_malformed() -> None:
    key = SigningKey.generate()
    signer = ReleaseSigner(key, clock=lambda: 1767225600.5)
    model = signer.sign(MODEL)
    assert model.issued_at == 1767225600500 and model.signing_key == key.public_key.hex()
    assert verify(key.public_key, release_statement(model), bytes.fromhex(model.signature))
    assert decode_message(encode_message(model)) == model
    for bad in ({"signing_key": "zz" * 32}, {"rollout_id": "has space"}, {"rollout_id": "x" * 129}):
        with pytest.raises(MalformedMessage):
            decode_message(encode_message(dataclasses.replace(model, **bad)))
    # the same clock reading twice: stamps still strictly increase (devices order statements by them)
    assert signer.sign(MODEL).issued_at == 1767225600501


def test_bundle_signature_line_round_trips_and_garbage_is_malformed() -> None:
    line = bundle_signature_line(b"\x01" * 32, b"\x02" * 64)
    assert line == f"ed25519 {'01' * 32} {'02' * 64}\n".encode()
    assert parse_bundle_signature(line) == (b"\x01" * 32, b"\x02" * 64)
    for garbage in (b"", b"ed25519 00 00\n", line.replace(b"ed25519", b"rsa"), b"\xff" * 10, line + line):
        with pytest.raises(MalformedMessage):
            parse_bundle_signature(garbage)


def test_ota_table_merges_listed_keys_and_a_key_file(tmp_path: Path) -> None:
    a, b = SigningKey.generate().public_key.hex(), SigningKey.generate().public_key.hex()
    (tmp_path / "keys").write_text(f"# rotation\n{b}\n\n{a}  # old\n")
    keys = parse_ota_table({"trusted_keys": [a], "trusted_keys_file": "keys"}, tmp_path)
    assert keys.keys == (bytes.fromhex(a), bytes.fromhex(b))
    assert not parse_ota_table({}, tmp_path)
    problems = {
        "ota.trusted_keys[0]": {"trusted_keys": ["abc"]},
        "ota.trusted_keys[1]": {"trusted_keys": [a, (1).to_bytes(32, "little").hex()]},  # the identity: weak
        "ota.trusted_keys:": {"trusted_keys": a},
        "ota.trusted_keys_file: cannot read": {"trusted_keys_file": "missing"},
        "unknown key ota.keys": {"keys": [a]},
    }
    for words, table in problems.items():
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            parse_ota_table(table, tmp_path)
    (tmp_path / "empty").write_text("# none yet\n")
    with pytest.raises(ConfigError, match="lists no key"):
        parse_ota_table({"trusted_keys_file": "empty"}, tmp_path)


def test_key_files_are_private_and_load_back(tmp_path: Path) -> None:
    key = SigningKey.generate()
    write_key_pair(key, tmp_path / "r.key", tmp_path / "r.pub")
    assert os.stat(tmp_path / "r.key").st_mode & 0o777 == 0o600
    assert SigningKey.load(tmp_path / "r.key").public_key == key.public_key
    assert TrustedKeys.parse(TrustedKeys.read_file(tmp_path / "r.pub", source="pub")).keys == (key.public_key,)
    with pytest.raises(ConfigError, match="exists"):
        write_key_pair(SigningKey.generate(), tmp_path / "r.key", tmp_path / "r.pub")
    os.chmod(tmp_path / "r.key", 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        SigningKey.load(tmp_path / "r.key")
    (tmp_path / "bad.key").write_bytes(b"not pem")
    os.chmod(tmp_path / "bad.key", 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        SigningKey.load(tmp_path / "bad.key")


def test_the_publisher_signs_channel_announcements_and_directed_models(digits_bundle: Bundle) -> None:
    key = SigningKey.generate()
    topics = Topics("signed/v1")
    publisher = ModelPublisher(topics)
    publisher.sign_with(ReleaseSigner(key, clock=lambda: 1000.0).sign)
    broker = InMemoryBroker()
    server, device = InMemoryTransport(broker, "server"), InMemoryTransport(broker, "device")
    server.start()
    device.subscribe(topics.model_channel("current"))
    device.start()
    announced = publisher.announce(server, "current", 1, digits_bundle.directory)
    inbound = device.receive(timeout=1)
    assert inbound is not None and decode_message(inbound.payload) == announced
    trusted = TrustedKeys((key.public_key,))
    assert trusted.check_statement(announced, now_ms=1_000_000) == key.key_id and announced.issued_at == 1_000_000
    directed = publisher.announcement_of(1, "dev-7", "r-1")
    assert directed is not None and directed.rollout_id == "r-1" and directed.issued_at == 1_000_001
    assert trusted.check_statement(directed, now_ms=1_000_000) == key.key_id
    unsigned = ModelPublisher(topics).announcement_of(1, "dev-7")
    assert unsigned is None  # not held by that publisher
