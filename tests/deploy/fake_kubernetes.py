"""A local HTTP server that answers as the Kubernetes API would and records
what the official client sends. No API server (nor kind, k3s or a container
runtime) can run on the development machines, so this stands in for one: the
client code under test is the real `kubernetes` package, talking HTTP."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    authorization: str | None
    body: Any


# A route answers (status, JSON document or text) for a request; several
# answers in a list are given in turn, the last one repeated.
Answer = tuple[int, Any]
Route = Callable[[Request], Answer] | list[Answer] | Answer


@dataclass
class FakeKubernetes:
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)
    _served: dict[tuple[str, str], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, method: str, path_pattern: str, answer: Route) -> None:
        self.routes[(method, path_pattern)] = answer

    def answer(self, request: Request) -> Answer:
        for (method, pattern), route in self.routes.items():
            if method == request.method and re.fullmatch(pattern, request.path):
                if callable(route):
                    return route(request)
                if isinstance(route, list):
                    with self._lock:
                        n = self._served.get((method, pattern), 0)
                        self._served[(method, pattern)] = n + 1
                    return route[min(n, len(route) - 1)]
                return route
        return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}

    def sent(self, method: str, path_pattern: str) -> list[Request]:
        return [
            r for r in self.requests if r.method == method and re.fullmatch(path_pattern, r.path)
        ]

    def kubeconfig(self, directory: Path, token: str = "test-token") -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "tester", "namespace": "converge"},
                }
            ],
            "current-context": "fake",
        }
        path = directory / "kubeconfig"
        path.write_text(json.dumps(config))
        return path


def _handler(fake: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            request = Request(
                self.command,
                parts.path,
                parse_qs(parts.query),
                self.headers.get("Content-Type"),
                self.headers.get("Authorization"),
                body,
            )
            fake.requests.append(request)
            status, document = fake.answer(request)
            payload = (
                document.encode() if isinstance(document, str) else json.dumps(document).encode()
            )
            self.send_response(status)
            kind = "text/plain" if isinstance(document, str) else "application/json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    return Handler


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as a cluster's CA bundle and
    API server certificate in one (what in-cluster credentials trust)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kubernetes")])
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=365 * 100))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ca.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@contextmanager
def fake_kubernetes(tls: tuple[Path, Path] | None = None) -> Iterator[FakeKubernetes]:
    """The stand-in API on a loopback port; HTTPS with `tls` (certificate, key)."""
    fake = FakeKubernetes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    scheme = "http"
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    fake.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
