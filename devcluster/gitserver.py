"""A Git server on loopback for `up --gitops`: Git's own `git http-backend` (smart HTTP, clone,
fetch and push) run as a CGI program for each request, as Apache or nginx would.

    python -m devcluster.gitserver --root DIR --port PORT

serves every bare repository under DIR at http://127.0.0.1:PORT/<name>.git, without
authentication (loopback only, as everything of the devcluster). Pushes are allowed
(`http.receivepack` is on for anonymous users via GIT_HTTP_EXPORT_ALL and REMOTE_USER).
`GET /healthz` answers 200.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from devcluster.loopback import is_loopback

MAX_BODY_BYTES = 256 * 1024 * 1024   # a push larger than this is refused (413)
BACKEND_TIMEOUT = 120.0


def http_backend() -> str:
    """The path of `git http-backend` (in git's exec path, not on PATH)."""
    exec_path = subprocess.run(["git", "--exec-path"], capture_output=True, text=True, check=True).stdout.strip()
    backend = Path(exec_path) / "git-http-backend"
    if not backend.exists():
        raise RuntimeError(f"git-http-backend not found in {exec_path}: install git (Debian: git)")
    return str(backend)


def cgi_environ(root: Path, method: str, path: str, headers: dict[str, str], client_ip: str,
                content_length: int | None) -> dict[str, str]:
    """The CGI variables git http-backend reads for one request (pure)."""
    path_info, _, query = path.partition("?")
    env = {
        "GIT_PROJECT_ROOT": str(root),
        "GIT_HTTP_EXPORT_ALL": "1",
        # http-backend enables receive-pack (push) only for an authenticated user: this server's
        # users are whoever reaches loopback, all of them named `devcluster`.
        "REMOTE_USER": "devcluster",
        "REMOTE_ADDR": client_ip,
        "REQUEST_METHOD": method,
        "PATH_INFO": path_info,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/"),
    }
    lowered = {k.lower(): v for k, v in headers.items()}
    if "content-type" in lowered:
        env["CONTENT_TYPE"] = lowered["content-type"]
    if content_length is not None:
        env["CONTENT_LENGTH"] = str(content_length)
    for name in ("content-encoding", "git-protocol", "accept"):
        if name in lowered:
            env["HTTP_" + name.upper().replace("-", "_")] = lowered[name]
    return env


def parse_cgi_output(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """A CGI program's output -> (status, headers, body). `Status: 404 Not Found` sets the status."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    if not sep:
        return 502, [], b"git http-backend answered without headers\n"
    status, headers = 200, []
    for line in head.decode("latin-1").splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "status":
            status = int(value.strip().split()[0])
        elif name:
            headers.append((name.strip(), value.strip()))
    return status, headers, body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "devcluster-git"
    root: Path
    backend: str

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self) -> bytes | None:
        """The request body, chunked (git sends large pushes so) or sized; None when too large."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass   # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY_BYTES:
                    return None
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return None if length > MAX_BODY_BYTES else self.rfile.read(length)

    def _serve(self) -> None:
        if not is_loopback(self.client_address[0]):
            self._reply(403, b"loopback only\n")
            return
        if self.path == "/healthz":
            self._reply(200, b"ok\n")
            return
        body = self._read_body() if self.command == "POST" else b""
        if body is None:
            self.close_connection = True
            self._reply(413, b"request body too large\n")
            return
        env = cgi_environ(self.root, self.command, self.path, dict(self.headers.items()),
                          self.client_address[0], len(body) if self.command == "POST" else None)
        try:
            result = subprocess.run([self.backend], input=body, env=env, capture_output=True,
                                    timeout=BACKEND_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._reply(504, b"git http-backend timed out\n")
            return
        if result.stderr:
            sys.stderr.write(result.stderr.decode(errors="replace"))
        status, headers, payload = parse_cgi_output(result.stdout)
        self._reply(status, payload, headers)

    do_GET = _serve
    do_POST = _serve


def init_repository(path: Path, files: dict[str, str], message: str = "initial commit") -> None:
    """A bare repository at path whose branch `main` holds one commit with `files` (path -> text);
    nothing happens when the repository exists."""
    if (path / "HEAD").exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".init")
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="devcluster", GIT_AUTHOR_EMAIL="devcluster@localhost",
               GIT_COMMITTER_NAME="devcluster", GIT_COMMITTER_EMAIL="devcluster@localhost")
    work = tmp / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    for name, text in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", message], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(tmp / "bare")], check=True, env=env)
    # Pushes to main must update what a fetch of HEAD sees; and http.receivepack for pushes.
    subprocess.run(["git", "-C", str(tmp / "bare"), "config", "http.receivepack", "true"], check=True)
    (tmp / "bare").rename(path)
    shutil.rmtree(tmp, ignore_errors=True)


def serve(root: Path, host: str, port: int) -> None:
    if not is_loopback(host):
        raise SystemExit(f"--host {host}: the devcluster's Git server listens on loopback only")
    Handler.root, Handler.backend = root.resolve(), http_backend()
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True

    def on_signal(*_):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"serving {Handler.root} at http://{host}:{port}/", file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.gitserver", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="directory of bare repositories")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.root, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
