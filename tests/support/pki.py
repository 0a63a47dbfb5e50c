"""Certificates for the TLS tests, made with the openssl command, and the tools that make
them (the tests that need a tool fail under CI without it and skip elsewhere)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.tools import tool


def run(*command: str, cwd: Path) -> None:
    """Run a tool in `cwd`; it must succeed."""
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"


def make_pki(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost: (ca, cert, key)."""
    openssl = tool("openssl", "openssl")
    folder.mkdir(parents=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run(
        openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=edge-agent test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    run(openssl, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n",
        encoding="utf-8",
    )
    run(
        openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=folder,
    )  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


def tls_listener(pki: tuple[Path, Path, Path]) -> str:
    """Mosquitto's settings for TLS on the listener its helper writes."""
    ca, cert, key = pki
    return f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
