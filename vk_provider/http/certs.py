"""The kubelet endpoint's serving certificate: the user's own, or a self-signed one made with openssl.

The self-signed pair is kept in ``cert_dir`` and re-used while it still names the Node's address
and has more than a day left; otherwise it is made again.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from pathlib import Path


class CertificateError(Exception):
    pass


def serving_certificate(cert_file: str, key_file: str, cert_dir: str, node_name: str, address: str) -> tuple[str, str]:
    """Return (cert, key) paths: the given pair if set, else a self-signed pair for this node."""
    if cert_file:
        for path in (cert_file, key_file):
            if not Path(path).is_file():
                raise CertificateError(f"kubelet TLS file {path} does not exist")
        return cert_file, key_file
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError("openssl is needed to make the kubelet serving certificate (apt-get install openssl)")
    directory = Path(cert_dir)
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / f"{node_name}.crt"
    key = directory / f"{node_name}.key"
    san = f"DNS:{node_name},DNS:localhost,IP:127.0.0.1"
    if _is_ip(address) and address != "127.0.0.1":
        san += f",IP:{address}"
    stamp = directory / f"{node_name}.san"
    if (
        cert.is_file()
        and key.is_file()
        and stamp.is_file()
        and stamp.read_text() == san
        and _valid_for_a_day(openssl, cert)
    ):
        return str(cert), str(key)
    proc = subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "365",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={node_name}",
            "-addext", f"subjectAltName={san}",
            "-addext", "extendedKeyUsage=serverAuth",
        ],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise CertificateError(f"openssl could not make a serving certificate: {proc.stderr.strip()[:300]}")
    key.chmod(0o600)
    stamp.write_text(san)
    return str(cert), str(key)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _valid_for_a_day(openssl: str, cert: Path) -> bool:
    proc = subprocess.run(
        [openssl, "x509", "-checkend", "86400", "-noout", "-in", str(cert)], capture_output=True, check=False
    )
    return proc.returncode == 0
