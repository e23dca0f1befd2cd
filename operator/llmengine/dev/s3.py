"""A real S3-compatible server (versitygw, posix backend) on a free loopback port."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmengine.dev import proc, tools


@dataclass(frozen=True)
class S3Endpoint:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }


def start_s3(state_dir: Path, name: str = "s3", port: int | None = None) -> tuple[S3Endpoint, proc.Proc]:
    """Start versitygw serving <state>/s3-data; returns its endpoint and process. Credentials are random."""
    data = state_dir / "s3-data"
    data.mkdir(parents=True, exist_ok=True)
    port = port or proc.free_port()
    creds_file = state_dir / "s3-credentials"
    if creds_file.exists():
        access, secret = creds_file.read_text().split()
    else:
        access, secret = "llmengine" + secrets.token_hex(4), secrets.token_urlsafe(24)
        creds_file.write_text(f"{access} {secret}\n")
        creds_file.chmod(0o600)
    p = proc.start(
        name,
        [
            str(tools.binary("versitygw")),
            "--port",
            f"127.0.0.1:{port}",
            "posix",
            str(data),
        ],
        state_dir,
        # Credentials go through the environment, never the command line (visible in ps).
        env={"ROOT_ACCESS_KEY": access, "ROOT_SECRET_KEY": secret},
    )
    ep = S3Endpoint(f"http://127.0.0.1:{port}", access, secret)
    proc.wait_until("S3 server (versitygw)", lambda: proc.tcp_open(port), 30, p)
    return ep, p
