"""`fedflock export` flags become the exporter's specs (parsing only; exports are tested elsewhere)."""

from __future__ import annotations

import pytest

from fedflock.cli import build_parser
from fedflock.export_options import export_kwargs

BASE = ["export", "model_export.models:digits_cnn", "--input-shape", "1,8,8", "--num-classes", "10", "--out", "b"]


def parse(*flags: str):
    return build_parser().parse_args([*BASE, *flags])


def test_focal_adamw_fedprox_personal_micro_batch() -> None:
    args = parse(
        "--loss",
        "focal",
        "--focal-alpha",
        "0.25",
        "--focal-gamma",
        "2",
        "--binary",
        "--optimizer",
        "adamw",
        "--lr",
        "0.001",
        "--weight-decay",
        "0.01",
        "--betas",
        "0.8,0.99",
        "--fedprox-mu",
        "0.01",
        "--personal",
        "head.*",
        "--personal",
        "fc.bias",
        "--trainable-masks",
        "--micro-batch",
        "8",
        "--input-dtype",
        "int64",
        "--precision",
        "fp32",
    )
    kwargs = export_kwargs(args)
    loss, optimizer, federated = kwargs["loss"], kwargs["optimizer"], kwargs["federated"]
    assert (loss.kind, loss.focal_gamma, loss.binary) == ("focal", 2.0, True)
    assert (optimizer.kind, optimizer.lr, optimizer.weight_decay, optimizer.betas) == (
        "adamw",
        0.001,
        0.01,
        (0.8, 0.99),
    )
    assert federated.fedprox_mu == 0.01 and federated.personal == ("head.*", "fc.bias") and federated.trainable_masks
    assert kwargs["micro_batch"] == 8
    assert args.input_dtype == "int64" and args.input_shape == (1, 8, 8)


def test_bad_numbers_are_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("--class-weights", "1,x")
    assert "comma-separated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--input-dtype", "float64")


def test_sign_key_gives_a_signer_whose_signature_the_device_trusts(tmp_path) -> None:
    from edge_agent.crypto.signing import SigningKey, write_key_pair
    from edge_agent.crypto.trust import TrustedKeys
    from edge_agent.errors import FedflockError

    key = SigningKey.generate()
    write_key_pair(key, tmp_path / "release.key", tmp_path / "release.pub")
    signer = export_kwargs(parse("--sign-key", str(tmp_path / "release.key")))["signer"]
    manifest = b'{"format": 1}'
    (tmp_path / "manifest.json").write_bytes(manifest)
    (tmp_path / "manifest.sig").write_bytes(signer(manifest))
    trusted = TrustedKeys.parse([key.public_key.hex()])
    assert trusted.check_bundle(tmp_path) == key.key_id
    (tmp_path / "manifest.json").write_bytes(manifest + b" ")
    with pytest.raises(FedflockError):
        trusted.check_bundle(tmp_path)
    assert "signer" not in export_kwargs(parse())


def test_sign_key_that_does_not_exist_is_a_config_error(tmp_path) -> None:
    from edge_agent.errors import ConfigError

    with pytest.raises(ConfigError, match="signing key"):
        export_kwargs(parse("--sign-key", str(tmp_path / "missing.key")))
