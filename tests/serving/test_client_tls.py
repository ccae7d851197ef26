"""The gRPC client over TLS and mutual TLS: a CA, a server certificate and client certificates made here
(``cryptography``), a gRPC server serving the stand-in's servicer on a TLS port and on a client-verifying
(mutual TLS) port of 127.0.0.1. Scores are exact (tiny model: 2a + 1) or a v1 Session run (ESM² export)."""
import datetime
import os
import subprocess
import sys
from concurrent import futures

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.client import ServingError, TFServingClient
from tests.serving.fake_tf_serving import FakeTFServing
from tests.serving.test_client import f32, reference_scores, save_tiny_model
from transforms.features import BUILTIN

SERVER_NAME = "tf-serving.test"  # the only name in the server certificate (not 127.0.0.1)


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn):
    """(key, certificate) of a self-signed CA valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca, cn, server):
    """(key PEM, certificate PEM) signed by ``ca`` for a server (DNS name ``cn``) or a client."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
    return _pem_key(key), builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """PEM bytes and file paths: the CA, the server's key and certificate, a client's, and a stranger CA's
    client (a certificate the server must not accept)."""
    ca, other_ca = make_ca("rankline test CA"), make_ca("some other CA")
    out = {"ca": ca[1].public_bytes(serialization.Encoding.PEM),
           "other_ca": other_ca[1].public_bytes(serialization.Encoding.PEM)}
    out["server_key"], out["server_cert"] = issue(ca, SERVER_NAME, server=True)
    out["client_key"], out["client_cert"] = issue(ca, "scoring-client", server=False)
    out["stranger_key"], out["stranger_cert"] = issue(other_ca, "stranger", server=False)
    base = tmp_path_factory.mktemp("pki")
    for name in list(out):
        (base / f"{name}.pem").write_bytes(out[name])
        out[f"{name}_path"] = str(base / f"{name}.pem")
    return out


class TLSServer:
    """The stand-in's servicer on two TLS ports of 127.0.0.1: ``tls`` (server certificate only) and ``mtls``
    (the client must present a certificate signed by the CA)."""

    def __init__(self, models, pki):
        self.fake = FakeTFServing(models)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(self.fake, self.server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(self.fake, self.server)
        pair = [(pki["server_key"], pki["server_cert"])]
        self.tls = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(pair))
        self.mtls = self.server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            pair, root_certificates=pki["ca"], require_client_auth=True))
        assert self.tls and self.mtls

    def __enter__(self):
        self.fake.start()  # loads the versions (and opens its own plain port, unused here)
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0).wait(5)
        self.fake.stop(0)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, pki):
    path = save_tiny_model(tmp_path_factory.mktemp("tls_tiny") / "1", "a", 2.0, 1.0)
    with TLSServer({"tiny": {1: path}}, pki) as srv:
        yield srv


def _refused(target, **kwargs):
    """The ServingError of one predict that must not reach the server (no retries, 5 s deadline)."""
    with TFServingClient(target, "tiny", timeout_s=5, retry_budget_s=0, **kwargs) as client:
        with pytest.raises(ServingError) as err:
            client.predict({"a": f32(1.0)})
    return err.value


def test_tls_scores_and_checks_the_server_certificate(tiny_server, pki):
    target = f"127.0.0.1:{tiny_server.tls}"
    for ca in (pki["ca"], pki["ca_path"]):  # PEM bytes or a file
        with TFServingClient(target, "tiny", root_certificates=ca, ssl_target_name_override=SERVER_NAME,
                             timeout_s=10) as client:
            np.testing.assert_array_equal(client.predict({"a": f32(1.0, 2.0)})["score"], [3.0, 5.0])
    before = tiny_server.fake.requests
    # the certificate names tf-serving.test, not 127.0.0.1; a server signed by another CA; no TLS at all
    assert _refused(target, root_certificates=pki["ca"]).code == grpc.StatusCode.UNAVAILABLE
    assert _refused(target, root_certificates=pki["other_ca"],
                    ssl_target_name_override=SERVER_NAME).code == grpc.StatusCode.UNAVAILABLE
    assert _refused(target).code == grpc.StatusCode.UNAVAILABLE
    assert tiny_server.fake.requests == before


def test_mutual_tls_scores_and_refuses_a_client_without_a_valid_certificate(tiny_server, pki):
    target = f"127.0.0.1:{tiny_server.mtls}"
    tls = {"root_certificates": pki["ca"], "ssl_target_name_override": SERVER_NAME}
    with TFServingClient(target, "tiny", private_key=pki["client_key_path"],
                         certificate_chain=pki["client_cert_path"], timeout_s=10, **tls) as client:
        np.testing.assert_array_equal(client.predict({"a": f32(4.0)})["score"], [9.0])
    before = tiny_server.fake.requests
    assert _refused(target, **tls).code == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert _refused(target, private_key=pki["stranger_key"], certificate_chain=pki["stranger_cert"],
                    **tls).code == grpc.StatusCode.UNAVAILABLE  # signed by a CA the server does not trust
    assert tiny_server.fake.requests == before


def test_tls_options_are_checked(pki, tmp_path):
    with pytest.raises(ValueError, match="both private_key and certificate_chain"):
        TFServingClient("127.0.0.1:1", "m", root_certificates=pki["ca"], private_key=pki["client_key"])
    with pytest.raises(ValueError, match="ssl_target_name_override needs TLS"):
        TFServingClient("127.0.0.1:1", "m", ssl_target_name_override=SERVER_NAME)
    with pytest.raises(OSError, match="root_certificates: cannot read"):
        TFServingClient("127.0.0.1:1", "m", root_certificates=str(tmp_path / "missing.pem"))


def test_score_cli_over_mutual_tls(served_export, raw_rows, pki, tmp_path):
    """python -m serving.score --ca-cert/--client-cert/--client-key/--tls-server-name scores the ESM² export
    over mutual TLS (equal to a Session run); without the client certificate it exits 1 naming UNAVAILABLE."""
    import json

    from serving.examples import serialize_rows

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw_rows[:5]))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    with TLSServer({"esm2": {1: served_export["version_dir"]}}, pki) as srv:
        base = [sys.executable, "-m", "serving.score", "--target", f"127.0.0.1:{srv.mtls}", "--input", str(path),
                "--ca-cert", pki["ca_path"], "--tls-server-name", SERVER_NAME, "--timeout", "30"]
        proc = subprocess.run(base + ["--client-cert", pki["client_cert_path"], "--client-key",
                                      pki["client_key_path"]], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        bad = subprocess.run(base + ["--retry-budget", "0"], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=120)
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert lines[0] == ["row", "ctavr", "ctcvr", "ctr", "cvr"] and len(lines) == 6
    want = reference_scores(served_export["version_dir"], serialize_rows(raw_rows[:5], BUILTIN))
    got = np.array([[float(x) for x in line[1:]] for line in lines[1:]], dtype=np.float32)
    np.testing.assert_allclose(got, np.stack([want[n] for n in lines[0][1:]], axis=1), atol=2e-6)
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr, bad.stderr[-2000:]
