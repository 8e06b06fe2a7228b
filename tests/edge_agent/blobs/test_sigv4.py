"""SigV4 against the examples published in the S3 documentation ("Signature Calculations for the
Authorization Header" and "Authenticating Requests: Using Query Parameters"), and against botocore,
an independent implementation (installed with moto[server] in the dev extra), on varied requests."""

from __future__ import annotations

import hashlib
import random
from datetime import datetime, timezone

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from edge_agent.blobs.sigv4 import EMPTY_SHA256, Credentials, presign_url, sign_headers

AWS = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
HOST = "examplebucket.s3.amazonaws.com"
AT = datetime(2013, 5, 24, tzinfo=timezone.utc)


def _signature(headers: dict[str, str]) -> str:
    return headers["authorization"].rsplit("Signature=", 1)[1]


def test_get_object_example() -> None:
    headers = sign_headers("GET", HOST, "/test.txt", [], {"Range": "bytes=0-9"}, EMPTY_SHA256, AWS, "us-east-1", AT)
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_put_object_example_encodes_the_key() -> None:
    body = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
    extra = {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"}
    headers = sign_headers("PUT", HOST, "/test$file.text", [], extra, body, AWS, "us-east-1", AT)
    assert _signature(headers) == "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"


def test_bucket_examples_with_query_parameters() -> None:
    lifecycle = sign_headers("GET", HOST, "/", [("lifecycle", "")], {}, EMPTY_SHA256, AWS, "us-east-1", AT)
    assert _signature(lifecycle) == "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
    listing = sign_headers(
        "GET", HOST, "/", [("prefix", "J"), ("max-keys", "2")], {}, EMPTY_SHA256, AWS, "us-east-1", AT
    )
    assert _signature(listing) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


def test_presigned_url_example() -> None:
    url = presign_url("GET", "https", HOST, "/test.txt", AWS, "us-east-1", AT, 86400)
    assert url == (
        "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
        "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    )


def test_a_changed_secret_or_time_changes_the_signature() -> None:
    base = _signature(sign_headers("GET", HOST, "/a", [], {}, EMPTY_SHA256, AWS, "us-east-1", AT))
    other = Credentials(AWS.access_key, AWS.secret_key + "x")
    assert _signature(sign_headers("GET", HOST, "/a", [], {}, EMPTY_SHA256, other, "us-east-1", AT)) != base
    later = AT.replace(second=1)
    assert _signature(sign_headers("GET", HOST, "/a", [], {}, EMPTY_SHA256, AWS, "us-east-1", later)) != base


def test_headers_and_presigned_urls_agree_with_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    boto = BotoCredentials("AKIDEXAMPLE", "secret/with+chars", token="session-token")
    ours = Credentials("AKIDEXAMPLE", "secret/with+chars", "session-token")
    for case in range(25):
        key = "/".join(
            rng.choice(["models", "a b", "x~y", "v1.2", "ü", "c$d", "e=f"]) for _ in range(rng.randint(1, 3))
        )
        path = f"/bucket-{case}/{key}"
        params = [("partNumber", str(rng.randint(1, 99))), ("uploadId", f"id/{case}+x")] if case % 2 else []
        region = rng.choice(["us-east-1", "eu-central-1"])
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
        now = datetime(2024, 1, 1 + case % 28, case % 24, tzinfo=timezone.utc)
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda now=now: now.replace(tzinfo=None))
        url = f"http://127.0.0.1:9000{_quote(path)}" + (
            "?" + "&".join(f"{k}={_quote(v, '')}" for k, v in params) if params else ""
        )

        request = AWSRequest(method="PUT", url=url, data=body)
        request.headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
        S3SigV4Auth(boto, "s3", region).add_auth(request)
        mine = sign_headers(
            "PUT", "127.0.0.1:9000", path, params, {}, hashlib.sha256(body).hexdigest(), ours, region, now
        )
        assert _signature(mine) == request.headers["Authorization"].rsplit("Signature=", 1)[1], (path, params)

        presign = AWSRequest(method="GET", url=url)
        S3SigV4QueryAuth(boto, "s3", region, expires=900).add_auth(presign)
        expected = presign.url.rsplit("X-Amz-Signature=", 1)[1]
        got = presign_url("GET", "http", "127.0.0.1:9000", path, ours, region, now, 900, params)
        assert got.rsplit("X-Amz-Signature=", 1)[1] == expected, (path, params)


def _quote(value: str, safe: str = "/") -> str:
    from urllib.parse import quote

    return quote(value, safe=safe + "~")
