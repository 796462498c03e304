"""protos.tls: the development CA, issued certificates (names, validity, key files), the
--tls folder checks, and mutual-TLS handshakes on an in-process gRPC server."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import stat

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from confide.cli.main import main as confide_main
from confide.node.anonymous import AnonymityError, submit_anonymously
from confide.privacy.ringsig import RingKeyPair
from confide.protos import tls
from confide.v1 import coordinator_pb2 as pb


@pytest.fixture
def pki(tmp_path):
    tls.create_ca(tmp_path / "ca")
    tls.issue_certificate(tmp_path / "ca", "server", tmp_path / "server",
                          ["127.0.0.1", "localhost", "coordinator"])
    tls.issue_certificate(tmp_path / "ca", "client", tmp_path / "client")
    tls.create_ca(tmp_path / "other-ca")
    tls.issue_certificate(tmp_path / "other-ca", "client", tmp_path / "stranger")
    return tmp_path


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_p256_ca_with_a_private_key_file(pki):
    ca = _cert(pki / "ca" / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    ca.verify_directly_issued_by(ca)  # self-signed
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    assert _mode(pki / "ca" / "ca.key") == 0o600
    with pytest.raises(tls.TLSError, match="already holds a CA"):
        tls.create_ca(pki / "ca")
    before = (pki / "ca" / "ca.pem").read_bytes()
    tls.create_ca(pki / "ca", force=True)
    assert (pki / "ca" / "ca.pem").read_bytes() != before


def test_issued_certificate_names_validity_usage_and_files(pki):
    cert = _cert(pki / "server" / "server.pem")
    cert.verify_directly_issued_by(_cert(pki / "ca" / "ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coordinator"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    assert cert.not_valid_after_utc - now < dt.timedelta(days=826)
    assert _mode(pki / "server" / "server.key") == 0o600
    assert (pki / "server" / "ca.pem").read_bytes() == (pki / "ca" / "ca.pem").read_bytes()
    # default names: the certificate's own name, localhost, 127.0.0.1
    default = _cert(pki / "client" / "client.pem")
    san = default.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in san] == ["client", "localhost", "127.0.0.1"]
    # short validity, and never beyond the CA's
    tls.issue_certificate(pki / "ca", "brief", pki / "brief", days=2)
    brief = _cert(pki / "brief" / "brief.pem")
    assert brief.not_valid_after_utc - now < dt.timedelta(days=2, minutes=1)
    with pytest.raises(tls.TLSError, match="exists"):
        tls.issue_certificate(pki / "ca", "brief", pki / "brief")


@pytest.mark.parametrize("value, kind", [("127.0.0.1", x509.IPAddress), ("::1", x509.IPAddress),
                                         ("node-0.cluster", x509.DNSName),
                                         ("coordinator", x509.DNSName)])
def test_san_entries_are_ip_addresses_or_dns_names(value, kind):
    assert isinstance(tls.parse_san(value), kind)


@pytest.mark.parametrize("bad", ["", "not a host", "a/b"])
def test_bad_san_entries_are_refused(bad):
    with pytest.raises(tls.TLSError):
        tls.parse_san(bad)


@pytest.mark.parametrize("name", ["ca", "../x", "", "a b"])
def test_bad_certificate_names_are_refused(pki, name):
    with pytest.raises(tls.TLSError):
        tls.issue_certificate(pki / "ca", name, pki / "out")


def test_tls_folder_is_checked_when_read(pki):
    config = tls.TLSConfig.from_folder(pki / "server")
    assert config.name == "server" and config.has_identity
    assert tls.load("") is None
    # a folder with only the CA certificate: a client that checks the server, no identity
    (pki / "ca-only").mkdir()
    (pki / "ca-only" / "ca.pem").write_bytes((pki / "ca" / "ca.pem").read_bytes())
    assert not tls.TLSConfig.from_folder(pki / "ca-only").has_identity
    with pytest.raises(tls.TLSError, match="needs a certificate"):
        tls.TLSConfig.from_folder(pki / "ca-only").server_credentials()
    # the CA folder itself: ca.key is never taken for an identity
    assert not tls.TLSConfig.from_folder(pki / "ca").has_identity
    # several identities need a name
    tls.issue_certificate(pki / "ca", "second", pki / "server")
    with pytest.raises(tls.TLSError, match="several"):
        tls.TLSConfig.from_folder(pki / "server")
    assert tls.TLSConfig.from_folder(pki / "server", "second").name == "second"
    # a key that is not the certificate's
    (pki / "server" / "second.key").write_bytes((pki / "server" / "server.key").read_bytes())
    with pytest.raises(tls.TLSError, match="is not the key"):
        tls.TLSConfig.from_folder(pki / "server", "second")
    # a certificate of another CA next to this ca.pem
    (pki / "stranger" / "ca.pem").write_bytes((pki / "ca" / "ca.pem").read_bytes())
    with pytest.raises(tls.TLSError, match="not issued by"):
        tls.TLSConfig.from_folder(pki / "stranger")
    with pytest.raises(tls.TLSError, match=r"no ca\.pem"):
        tls.TLSConfig.from_folder(pki / "other-ca" / "..")
    with pytest.raises(tls.TLSError, match="no such folder"):
        tls.TLSConfig.from_folder(pki / "missing")


async def _check(address: str, config: tls.TLSConfig | None, **kwargs) -> grpc.StatusCode:
    async with tls.aio_channel(address, tls=config, **kwargs) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_mutual_tls_handshake_accepts_the_ca_and_refuses_everyone_else(pki):
    server_tls = tls.TLSConfig.from_folder(pki / "server")
    client = tls.TLSConfig.from_folder(pki / "client")
    stranger = tls.TLSConfig.from_folder(pki / "stranger")
    foreign_identity = tls.TLSConfig(root=client.root, cert=stranger.cert, key=stranger.key)

    async def main() -> dict[str, grpc.StatusCode]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = tls.add_port(server, "127.0.0.1:0", tls=server_tls)
        open_port = tls.add_port(server, "127.0.0.1:0", tls=server_tls,
                                 require_client_auth=False)
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            return {
                "client": await _check(address, client),
                "localhost": await _check(f"localhost:{port}", client),
                "no certificate": await _check(address, client.without_identity()),
                "client_cert=False": await _check(address, client, client_cert=False),
                "foreign certificate": await _check(address, foreign_identity),
                "foreign CA": await _check(address, stranger),
                "plaintext": await _check(address, None),
                "server-only port": await _check(f"127.0.0.1:{open_port}",
                                                 client.without_identity()),
            }
        finally:
            await server.stop(0)

    results = asyncio.run(main())
    assert results.pop("client") == results.pop("localhost") == grpc.StatusCode.OK
    assert results.pop("server-only port") == grpc.StatusCode.OK
    assert results == dict.fromkeys(results, grpc.StatusCode.UNAVAILABLE), results


def test_channels_follow_the_process_configuration(pki):
    assert tls.active() is None
    plain = tls.channel("127.0.0.1:1")
    assert type(plain).__name__ == "Channel"
    plain.close()
    try:
        tls.configure(tls.TLSConfig.from_folder(pki / "client"))
        assert tls.active().name == "client"

        async def main() -> grpc.StatusCode:
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
            port = tls.add_port(server, "127.0.0.1:0",
                                tls=tls.TLSConfig.from_folder(pki / "server"))
            await server.start()
            try:  # no tls= given: the process's configuration, with its certificate
                return await _check(f"127.0.0.1:{port}", ...)
            finally:
                await server.stop(0)

        assert asyncio.run(main()) == grpc.StatusCode.OK
    finally:
        tls.configure(None)


def test_allow_only_interceptor_hides_other_methods(pki):
    async def main() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        server = grpc.aio.server(interceptors=[tls.AllowOnly(["/grpc.health.v1.Health/Check"])])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            allowed = await _check(f"127.0.0.1:{port}", None)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                try:
                    await call.read()
                    denied = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    denied = exc.code()
            return allowed, denied
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)


def test_anonymous_upload_never_goes_out_with_the_node_certificate(pki):
    """Under TLS, without the coordinator's anonymous port, the node refuses to upload rather
    than present its certificate on the mutual-TLS port."""
    config = tls.TLSConfig.from_folder(pki / "client")
    task = pb.Task(job_id="j", round=1, anonymous=True)
    with pytest.raises(AnonymityError, match="anonymous port"):
        asyncio.run(submit_anonymously("127.0.0.1:1", RingKeyPair.generate(), task, b"x", 1,
                                       tls=config))


def test_certs_cli_creates_a_ca_and_issues_a_usable_folder(tmp_path, capsys):
    assert confide_main(["certs", "init", "--out", str(tmp_path / "ca")]) == 0
    assert confide_main(["certs", "init", "--out", str(tmp_path / "ca")]) == 1
    assert confide_main(["certs", "issue", "--ca", str(tmp_path / "ca"), "--name", "node0",
                         "--san", "127.0.0.1", "--san", "node0.example", "--out",
                         str(tmp_path / "node0")]) == 0
    out = capsys.readouterr().out
    assert "127.0.0.1, node0.example" in out and "--tls" in out
    config = tls.TLSConfig.from_folder(tmp_path / "node0")
    assert config.name == "node0"
    assert _mode(tmp_path / "node0" / "node0.key") == 0o600
    assert confide_main(["certs", "show", str(tmp_path / "node0" / "node0.pem")]) == 0
    assert "node0.example" in capsys.readouterr().out
