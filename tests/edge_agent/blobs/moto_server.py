"""A real S3-compatible server for tests: ``moto_server`` (pip ``moto[server]``) as a subprocess.

moto checks header SigV4 signatures only with IAM authentication on (``auth=True``: an IAM user,
its access key and an allow-all policy are created first, then ``/moto-api/reset-auth`` turns
checking on). It never checks presigned (query) signatures, and with authentication on it fails
(500) on presigned requests, so presigned-URL tests use a server with ``auth=False``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from broker_server.mosquitto_process import free_port
from edge_agent.blobs import Credentials, S3BlobStore, S3Location
from edge_agent.blobs.sigv4 import sign_headers

__all__ = ["MotoS3"]


class MotoS3:
    def __init__(self, log_dir: Path, *, auth: bool) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.auth = auth
        self._log = log_dir / f"moto-{self.port}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.credentials = Credentials("AKIAFEDFLOCKTEST0000", "not-checked-without-auth")

    def start(self) -> None:
        binary = shutil.which("moto_server")
        if binary is None:
            raise RuntimeError("moto_server not found: pip install 'moto[server]' (the dev extra has it)")
        log = self._log.open("wb")
        self._process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {self._log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        if self.auth:
            self._make_user()
            request = urllib.request.Request(
                f"{self.endpoint}/moto-api/reset-auth", data=b"0", headers={"content-type": "text/plain"}, method="POST"
            )
            urllib.request.urlopen(request, timeout=5).close()

    def _iam(self, **params: str) -> bytes:
        body = urlencode({**params, "Version": "2010-05-08"}).encode()
        host = f"127.0.0.1:{self.port}"
        headers = sign_headers(
            "POST",
            host,
            "/",
            [],
            {"content-type": "application/x-www-form-urlencoded"},
            hashlib.sha256(body).hexdigest(),
            self.credentials,
            "us-east-1",
            datetime.now(timezone.utc),
            service="iam",
        )
        headers.pop("host")
        request = urllib.request.Request(f"{self.endpoint}/", data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())

    def _make_user(self) -> None:
        self._iam(Action="CreateUser", UserName="fedflock")
        reply = self._iam(Action="CreateAccessKey", UserName="fedflock")
        access = re.search(rb"<AccessKeyId>([^<]+)</AccessKeyId>", reply)
        secret = re.search(rb"<SecretAccessKey>([^<]+)</SecretAccessKey>", reply)
        assert access and secret, reply[:500]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        self._iam(Action="PutUserPolicy", UserName="fedflock", PolicyName="all", PolicyDocument=json.dumps(policy))
        self.credentials = Credentials(access.group(1).decode(), secret.group(1).decode())

    def store(self, bucket: str, *, credentials: Credentials | None = None, **kwargs: Any) -> S3BlobStore:
        """A store on ``bucket`` (created if missing)."""
        store = S3BlobStore(
            S3Location(endpoint=self.endpoint, bucket=bucket), credentials or self.credentials, **kwargs
        )
        if credentials is None:
            store.create_bucket()
        return store

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
