"""An S3-compatible server on loopback for tests (moto's), and the credentials its clients
read from the environment only."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Test-only credentials (moto accepts any); they live in the environment, never in a config.
CREDS = {"AWS_ACCESS_KEY_ID": "moto-test-key", "AWS_SECRET_ACCESS_KEY": "moto-test-secret-value"}


@contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """moto's S3 server on 127.0.0.1 with ``bucket`` created: ``(endpoint, boto3 client)``;
    stopped on exit. Credentials come from the environment (:func:`s3_credentials`)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()


@contextmanager
def s3_credentials() -> Iterator[None]:
    """:data:`CREDS` and ``AWS_REGION`` in ``os.environ`` (for processes started inside, Ray's
    workers included); the previous values restored on exit."""
    saved = {k: os.environ.get(k) for k in (*CREDS, "AWS_REGION")}
    os.environ.update(CREDS, AWS_REGION="us-east-1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
