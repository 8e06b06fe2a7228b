"""``fedflock agent enroll``: a device exchanges a one-time token for its MQTT credentials.

::

    fedflock agent enroll --url https://enroll.example.org:8443/v1/enroll --token-file token \\
        --ca-file ca.crt --out /var/lib/fedflock/credentials

The work is in :mod:`edge_agent.enroll`; this module only parses the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.errors import ConfigError

__all__ = ["add_enroll_arguments", "agent_enroll"]


def add_enroll_arguments(agent: argparse.ArgumentParser) -> None:
    group = agent.add_argument_group("enroll", "fedflock agent enroll: a one-time token -> this device's credentials")
    group.add_argument("--url", default=None, help="the enrollment endpoint, https://HOST:PORT/v1/enroll")
    group.add_argument("--token", default=None, help="the one-time token (visible in `ps`: prefer --token-file)")
    group.add_argument("--token-file", type=Path, default=None, help="a file holding the one-time token")
    group.add_argument("--ca-file", type=Path, default=None, help="the fedflock CA certificate (from the operator)")
    group.add_argument("--out", type=Path, default=None, help="where to write device.key, device.crt, ca.crt, ...")
    group.add_argument(
        "--credential", choices=("certificate", "password"), default="certificate", help="what to enroll for"
    )


def agent_enroll(args: argparse.Namespace) -> int:
    from edge_agent.enroll import EnrollRequest, enroll

    missing = [
        flag for flag, value in (("--url", args.url), ("--ca-file", args.ca_file), ("--out", args.out)) if not value
    ]
    if missing:
        raise ConfigError(f"fedflock agent enroll needs {', '.join(missing)}")
    result = enroll(
        EnrollRequest(
            url=args.url,
            token=_token(args),
            ca_file=args.ca_file,
            out_dir=args.out,
            credential=args.credential,
            expected_device_id=args.device_id,
        )
    )
    print(f"enrolled as {result.device_id}; files: {', '.join(str(f) for f in result.files)}")
    print(f"add these lines to agent.toml ({result.mqtt_snippet}):\n{result.mqtt_snippet.read_text()}")
    return 0


def _token(args: argparse.Namespace) -> str:
    if (args.token is None) == (args.token_file is None):
        raise ConfigError("fedflock agent enroll needs exactly one of --token or --token-file")
    if args.token is not None:
        return str(args.token)
    try:
        return str(args.token_file.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {args.token_file}: cannot read it: {exc}") from exc
