"""Certificates, the service-account key pair and kubeconfigs for the devcluster.

One self-signed CA signs the API server's serving certificate and a client certificate per
identity; the API server trusts client certificates from the same CA (`--client-ca-file`), so a
certificate's CN is the user name and its O the groups, as in a kubeadm cluster.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devcluster import kubeapi
from devcluster.files import write_atomic

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class ClientIdentity:
    """A user the devcluster's components authenticate as (CN = user, O = groups)."""

    name: str  # file stem and kubeconfig user name
    user: str
    groups: tuple[str, ...] = ()


# Who gets a client certificate. The admin kubeconfig is the contract's `.devcluster/kubeconfig`.
CLIENTS = (
    ClientIdentity("admin", "devcluster-admin", ("system:masters",)),
    ClientIdentity("controller-manager", "system:kube-controller-manager"),
    ClientIdentity("scheduler", "system:kube-scheduler"),
    ClientIdentity("kwok", "devcluster-kwok", ("system:masters",)),
    # For the API server's calls to a node's kubelet port (logs, exec), should a node serve one.
    ClientIdentity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key,
             validity: datetime.timedelta = VALIDITY) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + validity))


def _with_sans(builder: x509.CertificateBuilder, dns_names: tuple[str, ...],
               ip_addresses: tuple[str, ...]) -> x509.CertificateBuilder:
    sans = [x509.DNSName(d) for d in dns_names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
    return builder.add_extension(x509.SubjectAlternativeName(sans), critical=False) if sans else builder


def make_ca() -> tuple[bytes, bytes]:
    """A self-signed CA: (cert PEM, key PEM)."""
    key = _key()
    name = _name("devcluster-ca")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return _cert_pem(cert), _key_pem(key)


def sign(ca_cert_pem: bytes, ca_key_pem: bytes, common_name: str, *, organizations: tuple[str, ...] = (),
         dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
         server: bool = False, client: bool = False) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: (cert PEM, key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = _key()
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (_builder(_name(common_name, organizations), ca_cert.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    builder = _with_sans(builder, dns_names, ip_addresses)
    return _cert_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key)


def self_signed(common_name: str, *, dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
                validity: datetime.timedelta = VALIDITY) -> tuple[bytes, bytes]:
    """A self-signed serving certificate without extensions but its names: (cert PEM, key PEM)."""
    key = _key()
    name = _name(common_name)
    builder = _with_sans(_builder(name, name, key.public_key(), validity), dns_names, ip_addresses)
    return _cert_pem(builder.sign(key, hashes.SHA256())), _key_pem(key)


def make_service_account_keys() -> tuple[bytes, bytes]:
    """The key pair that signs service-account tokens: (public PEM, private PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return public, _key_pem(key)


def kubeconfig(server: str, ca_cert_pem: bytes, user: str, cert_pem: bytes, key_pem: bytes) -> dict:
    """A kubeconfig with everything embedded (it stays valid if the pki dir moves)."""
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    return kubeapi.kubeconfig(server, {"certificate-authority-data": b64(ca_cert_pem)}, user,
                              {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)})


@dataclass(frozen=True)
class Pki:
    """Where `write_pki` put things."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def apiserver_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def apiserver_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_public(self) -> Path:
        return self.dir / "sa.pub"

    @property
    def sa_private(self) -> Path:
        return self.dir / "sa.key"

    def client_cert(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.dir / f"{name}.key"


def _write(path: Path, data: bytes, private: bool = False) -> None:
    write_atomic(path, data, 0o600 if private else 0o644)


def write_pki(pki_dir: Path, service_cluster_ip: str) -> Pki:
    """Generate the CA, serving and client certificates and the SA key pair into pki_dir."""
    pki = Pki(pki_dir)
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca()
    _write(pki.ca_cert, ca_cert)
    _write(pki.ca_key, ca_key, private=True)
    serving = sign(ca_cert, ca_key, "kube-apiserver", server=True,
                   dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                              "kubernetes.default.svc.cluster.local"),
                   ip_addresses=("127.0.0.1", service_cluster_ip))
    _write(pki.apiserver_cert, serving[0])
    _write(pki.apiserver_key, serving[1], private=True)
    for identity in CLIENTS:
        cert, key = sign(ca_cert, ca_key, identity.user, organizations=identity.groups, client=True)
        _write(pki.client_cert(identity.name), cert)
        _write(pki.client_key(identity.name), key, private=True)
    public, private = make_service_account_keys()
    _write(pki.sa_public, public)
    _write(pki.sa_private, private, private=True)
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki, identity_name: str) -> Path:
    identity = next(c for c in CLIENTS if c.name == identity_name)
    config = kubeconfig(server, pki.ca_cert.read_bytes(), identity.user,
                        pki.client_cert(identity_name).read_bytes(), pki.client_key(identity_name).read_bytes())
    return write_atomic(path, yaml.safe_dump(config, sort_keys=False), 0o600)
