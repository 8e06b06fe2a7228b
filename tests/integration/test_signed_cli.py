"""`fedflock pki signing-key` and `fedflock pki sign-bundle` on real files: a 0600 private key, a hex
public key a device config takes, and a manifest.sig that the device's pure-Python check accepts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from edge_agent.crypto.trust import TrustedKeys
from edge_agent.runtime.bundle import Bundle
from fedflock.cli import main


def test_signing_key_then_sign_bundle(tmp_path: Path, digits_bundle: Bundle, capsys: pytest.CaptureFixture[str]):
    pki = tmp_path / "pki"
    assert main(["pki", "signing-key", "--dir", str(pki), "--name", "release-2026"]) == 0
    private, public = pki / "signing" / "release-2026.key", pki / "signing" / "release-2026.pub"
    assert os.stat(private).st_mode & 0o777 == 0o600
    trusted = TrustedKeys.parse(TrustedKeys.read_file(public, source="pub"))
    assert public.read_text().strip() in capsys.readouterr().out
    bundle = tmp_path / "bundle"
    shutil.copytree(digits_bundle.directory, bundle)
    assert main(["pki", "sign-bundle", str(bundle), "--dir", str(pki), "--key", str(private)]) == 0
    assert trusted.check_bundle(bundle)  # the key id
    # no silent overwrite of a key pair: an error naming the file, the key unchanged
    before = private.read_bytes()
    assert main(["pki", "signing-key", "--dir", str(pki), "--name", "release-2026"]) != 0
    assert "refusing to overwrite a key" in capsys.readouterr().err and private.read_bytes() == before
