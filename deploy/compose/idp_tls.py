"""A throw-away TLS certificate for the compose stack's demo authorization server.

The gateway fetches issuer metadata and JWKS over HTTPS unless the host is a loopback
address (gateway/auth/netpolicy.py), so the AS in its own container serves HTTPS with a
self-signed certificate for the names it is reached by (``idp`` inside the compose
network, ``localhost`` from the host); the gateways trust exactly that certificate
(SSL_CERT_FILE). Run once by the ``idp-tls`` service; an existing certificate is kept.

    python idp_tls.py DIR    ->  DIR/idp.crt, DIR/idp.key
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

NAMES = ("idp", "localhost")


def make(directory: Path) -> None:
    cert_path, key_path = directory / "idp.crt", directory / "idp.key"
    # The AS container runs as another uid and must reach the files (a fresh volume starts
    # as the image's 0700 /run/mcpgw).
    directory.chmod(0o755)
    if cert_path.exists() and key_path.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-gateway compose demo AS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(n) for n in NAMES] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        # Its own trust anchor (the gateways' SSL_CERT_FILE), so it must be a CA too.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Readable by the AS container's user (another uid): a demo key on a private volume.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


if __name__ == "__main__":
    make(Path(sys.argv[1]))
