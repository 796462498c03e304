"""TLS and mutual TLS for every gRPC channel and port of the project.

A development certificate authority and the certificates it issues (``confide certs``), the
folder layout the daemons and clients read, and the one place where a channel or a listening
port becomes secure or stays plaintext.

Keys are ECDSA P-256 and certificates are signed with SHA-256: what every TLS stack accepts,
gRPC's BoringSSL included (Ed25519 certificates are not usable by gRPC's TLS). Every issued
certificate is valid for both ends (extended key usage serverAuth + clientAuth): a node serves
its peer service and dials the coordinator with the same identity. Host names and addresses a
certificate is valid for are its subject alternative names (DNS names and IP addresses); the
dialing side checks the address it dialed against them.

Folder layout (what ``confide certs`` writes and ``--tls DIR`` reads)::

    CA folder (confide certs init --out CA)        identity folder (certs issue --out DIR)
      ca.pem   the CA certificate (public)            ca.pem      copy of the CA certificate
      ca.key   the CA private key (0600): keep it     NAME.pem    NAME's certificate
               away from the daemons                  NAME.key    NAME's private key (0600)

``--tls DIR`` trusts exactly ``DIR/ca.pem`` and presents the one ``NAME.pem``/``NAME.key`` pair
in DIR (``ca.key`` is never taken as an identity); a folder with several pairs needs a name
(``TLSConfig.from_folder(DIR, name)``, ``--tls-name``). A folder with only ``ca.pem`` is a client
without a certificate: it checks the server, and a server requiring client certificates
(mutual TLS) refuses it during the handshake.

Channels and ports follow a configuration: ``channel``, ``aio_channel`` and ``add_port`` take
``tls=`` explicitly, and by default use the process-wide one set by ``configure`` (the node
daemon sets it at start, so every peer channel it opens, deep in a training thread, follows
``--tls``). With no configuration everything is plaintext, exactly as before.

This module imports no other package of the project (``protos`` is the wire contract).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
ORGANIZATION = "Confide (development CA)"
CA_DAYS = 3650
CERT_DAYS = 825
#: certificates start a few minutes in the past: clocks of a small cluster drift
CLOCK_SKEW = dt.timedelta(minutes=5)
DEFAULT_SANS = ("localhost", "127.0.0.1")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class TLSError(ValueError):
    """A certificate folder is missing, incomplete or inconsistent; the message says how."""


# --------------------------------------------------------------------------------------------
# Files


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # unencrypted PKCS#8: gRPC cannot read an encrypted key; the file mode protects it
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name == "ca":
        raise TLSError(f"certificate name {name!r}: use letters, digits, '.', '_' or '-' "
                       "(at most 64, not 'ca'); it becomes the file name NAME.pem")
    return name


def parse_san(value: str) -> x509.GeneralName:
    """``127.0.0.1`` / ``::1`` -> an IP address entry, anything else -> a DNS name."""
    value = value.strip()
    if not value:
        raise TLSError("empty subject alternative name")
    try:
        return x509.IPAddress(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", value):
        raise TLSError(f"subject alternative name {value!r} is neither an IP address nor a "
                       "DNS name")
    return x509.DNSName(value)


# --------------------------------------------------------------------------------------------
# The development CA and its certificates


@dataclass(frozen=True)
class IssuedFiles:
    cert: Path
    key: Path
    ca: Path


def create_ca(out_dir: Path | str, *, common_name: str = "Confide development CA",
              days: int = CA_DAYS, force: bool = False) -> IssuedFiles:
    """Create a CA (``ca.pem``, ``ca.key`` 0600) in ``out_dir``; refuses to replace one
    unless ``force`` (every certificate it issued would stop being trusted)."""
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise TLSError(f"{out} already holds a CA ({CA_CERT}/{CA_KEY}); pass force to replace "
                       "it (certificates it issued will no longer be trusted)")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, _cert_pem(cert))
    return IssuedFiles(cert=cert_path, key=key_path, ca=cert_path)


def load_ca(ca_dir: Path | str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    folder = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise TLSError(f"{folder} is not a CA folder (needs {CA_CERT} and {CA_KEY}; create "
                       f"one with `confide certs init --out {folder}`): {exc}") from None
    except ValueError as exc:
        raise TLSError(f"{folder}: unreadable CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"{folder / CA_KEY}: expected an EC key")
    return cert, key


def issue_certificate(ca_dir: Path | str, name: str, out_dir: Path | str,
                      sans: Sequence[str] = (), *, days: int = CERT_DAYS,
                      force: bool = False) -> IssuedFiles:
    """Issue ``NAME.pem``/``NAME.key`` (0600) into ``out_dir``, signed by the CA in ``ca_dir``,
    valid for the DNS names and IP addresses ``sans`` (default: NAME, localhost, 127.0.0.1),
    and copy the CA certificate next to them as ``ca.pem``: ``out_dir`` is then a complete
    ``--tls`` folder."""
    _check_name(name)
    ca_cert, ca_key = load_ca(ca_dir)
    out = Path(out_dir)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    if not force and key_path.exists():
        raise TLSError(f"{key_path} exists; pass force to replace it")
    entries = list(sans) or [name, *DEFAULT_SANS]
    general_names: list[x509.GeneralName] = []
    for entry in entries:
        parsed = parse_san(entry)
        if parsed not in general_names:
            general_names.append(parsed)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, _cert_pem(cert))
    ca_copy = out / CA_CERT
    if ca_copy.resolve() != (Path(ca_dir) / CA_CERT).resolve():
        _write_public(ca_copy, _cert_pem(ca_cert))
    return IssuedFiles(cert=cert_path, key=key_path, ca=ca_copy)


def describe(cert_pem: bytes) -> dict[str, Any]:
    """Subject, issuer, validity and SANs of a PEM certificate (for ``confide certs``)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    return {"subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(), "sans": names,
            "serial": format(cert.serial_number, "x")}


# --------------------------------------------------------------------------------------------
# A TLS configuration: what a daemon or a client trusts and presents


@dataclass(frozen=True)
class TLSConfig:
    """The CA certificate(s) to trust and, optionally, this party's certificate and key."""

    root: bytes
    cert: bytes = b""
    key: bytes = b""
    name: str = ""
    folder: str = ""

    @property
    def has_identity(self) -> bool:
        return bool(self.cert and self.key)

    @classmethod
    def from_folder(cls, folder: Path | str, name: str = "") -> TLSConfig:
        """Read a ``--tls`` folder (layout in the module docstring) and check it: the
        certificate must match its key and be issued by ``ca.pem``, and be valid now."""
        path = Path(folder)
        if not path.is_dir():
            raise TLSError(f"--tls {path}: no such folder")
        try:
            root = (path / CA_CERT).read_bytes()
            ca = x509.load_pem_x509_certificate(root)
        except FileNotFoundError:
            raise TLSError(f"--tls {path}: no {CA_CERT} (the CA certificate to trust)") from None
        except ValueError as exc:
            raise TLSError(f"--tls {path}: {CA_CERT} is not a PEM certificate: {exc}") from None
        if not name:
            names = sorted(p.stem for p in path.glob("*.key")
                           if p.name != CA_KEY and (path / f"{p.stem}.pem").exists())
            if len(names) > 1:
                raise TLSError(f"--tls {path} holds several identities ({', '.join(names)}): "
                               "name one (--tls-name)")
            if not names:
                return cls(root=root, folder=str(path))
            name = names[0]
        _check_name(name)
        try:
            cert_pem = (path / f"{name}.pem").read_bytes()
            key_pem = (path / f"{name}.key").read_bytes()
        except FileNotFoundError as exc:
            raise TLSError(f"--tls {path}: missing {Path(exc.filename).name}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TLSError(f"--tls {path}: cannot read {name}.pem/{name}.key: {exc}") from None
        if (cert.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                != key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)):
            raise TLSError(f"--tls {path}: {name}.key is not the key of {name}.pem")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise TLSError(f"--tls {path}: {name}.pem was not issued by the CA in "
                           f"{CA_CERT}") from None
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise TLSError(f"--tls {path}: {name}.pem is valid from "
                           f"{cert.not_valid_before_utc} to {cert.not_valid_after_utc}, not now")
        return cls(root=root, cert=cert_pem, key=key_pem, name=name, folder=str(path))

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Server side: present this identity; with ``require_client_auth`` (mutual TLS) the
        handshake fails for a client without a certificate issued by the CA."""
        if not self.has_identity:
            raise TLSError(f"--tls {self.folder or '(inline)'}: a server needs a certificate "
                           "and key (confide certs issue)")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.root,
            require_client_auth=require_client_auth)

    def channel_credentials(self, *, client_cert: bool = True) -> grpc.ChannelCredentials:
        """Client side: trust the CA; present this identity when ``client_cert`` and there is
        one (anonymous calls pass ``client_cert=False``: a certificate names its holder)."""
        if client_cert and self.has_identity:
            return grpc.ssl_channel_credentials(root_certificates=self.root,
                                                private_key=self.key,
                                                certificate_chain=self.cert)
        return grpc.ssl_channel_credentials(root_certificates=self.root)

    def without_identity(self) -> TLSConfig:
        return TLSConfig(root=self.root, folder=self.folder)


def load(folder: Path | str | None, name: str = "") -> TLSConfig | None:
    """``TLSConfig.from_folder`` for a ``--tls`` value; ``None``/"" means plaintext."""
    if not folder:
        return None
    return TLSConfig.from_folder(folder, name)


# --------------------------------------------------------------------------------------------
# The process-wide configuration and the helpers every channel and port goes through

_active: TLSConfig | None = None

#: the default of ``tls=``: "whatever ``configure`` set for this process"
PROCESS = ...
TLSChoice = TLSConfig | EllipsisType | None


def configure(config: TLSConfig | None) -> None:
    """Set the process-wide configuration (``None``: plaintext)."""
    global _active
    _active = config


def active() -> TLSConfig | None:
    return _active


def _resolve(tls: TLSChoice) -> TLSConfig | None:
    return _active if tls is ... else tls


def channel(address: str, options: Iterable[tuple[str, Any]] | None = None, *,
            tls: TLSChoice = PROCESS, client_cert: bool = True) -> grpc.Channel:
    """A blocking channel to ``address``: TLS when configured, plaintext otherwise."""
    config = _resolve(tls)
    opts = list(options or [])
    if config is None:
        return grpc.insecure_channel(address, options=opts)
    return grpc.secure_channel(address, config.channel_credentials(client_cert=client_cert),
                               options=opts)


def aio_channel(address: str, options: Iterable[tuple[str, Any]] | None = None, *,
                tls: TLSChoice = PROCESS, client_cert: bool = True) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS when configured, plaintext otherwise."""
    config = _resolve(tls)
    opts = list(options or [])
    if config is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, config.channel_credentials(client_cert=client_cert),
                                   options=opts)


def add_port(server: grpc.Server | grpc.aio.Server, address: str, *, tls: TLSChoice = PROCESS,
             require_client_auth: bool = True) -> int:
    """Listen on ``address``: TLS (mutual unless told otherwise) when configured, plaintext
    otherwise. Returns the bound port (0 on failure, as gRPC does)."""
    config = _resolve(tls)
    if config is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(
        address, config.server_credentials(require_client_auth=require_client_auth))


def peer_name(context: Any) -> str:
    """The common name of a mutual-TLS client's certificate ("" when it presented none)."""
    try:
        auth = context.auth_context()
    except Exception:
        return ""
    values = auth.get("x509_common_name") or []
    return values[0].decode(errors="replace") if values else ""


class AllowOnly(grpc.aio.ServerInterceptor):
    """Serve only the listed full method names (``/package.Service/Method``); every other
    method answers UNIMPLEMENTED, as if it did not exist on this port."""

    def __init__(self, methods: Iterable[str]) -> None:
        self.methods = frozenset(methods)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method not in self.methods:
            return None
        return await continuation(handler_call_details)
