"""``akl download`` against a hostile server (a loopback HTTP server that serves crafted
archives): every path-traversal trick is refused before anything is written, nothing lands
outside the output folder, and the command exits 1 with a message."""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from akl_cli.main import app


def _archive(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, payload in members:
            info.size = len(payload) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(payload) if info.isfile() else None)
    return buffer.getvalue()


def _file(name: str, payload: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), payload


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _hostile(victim: Path) -> dict[str, bytes]:
    ok = _file("model/config.json", b"{}")
    return {
        "dotdot": _archive([ok, _file("../" * 6 + str(victim).lstrip("/"))]),
        "absolute": _archive([ok, _file(str(victim))]),
        "symlink then write through it": _archive(
            [ok, _link("model/out", str(victim.parent)), _file(f"model/out/{victim.name}")]
        ),  # fmt: skip
        "hardlink to a host file": _archive([ok, _link("model/passwd", "/etc/passwd", tarfile.LNKTYPE)]),
        "device": _archive([ok, _chr("model/null")]),
        "backslash dotdot": _archive([ok, _file("model\\..\\..\\" + victim.name)]),
    }


def _chr(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, b""


class _Server:
    def __init__(self) -> None:
        self.body = b""
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


CASES = ["dotdot", "absolute", "symlink then write through it", "hardlink to a host file", "device"]


@pytest.mark.parametrize("case", CASES)
def test_akl_download_refuses_hostile_archives(case: str, server: _Server, tmp_path: Path) -> None:
    victim = tmp_path / "victim" / "authorized_keys"
    victim.parent.mkdir()
    server.body = _hostile(victim)[case]
    out = tmp_path / "out"
    env = {"AKL_URL": server.url, "AKL_API_KEY": "akl-000000000000-x"}
    result = CliRunner().invoke(app, ["download", "job-x", "--output", str(out)], env=env)
    assert result.exit_code == 1, result.output
    assert "refusing" in result.output
    assert not victim.exists() and list(victim.parent.iterdir()) == []
    assert not out.exists()  # checked before anything is written


def test_a_backslash_name_is_a_plain_file_name_inside_the_output(server: _Server, tmp_path: Path) -> None:
    """On POSIX a backslash is an ordinary character: the member stays inside the output folder."""
    victim = tmp_path / "authorized_keys"
    server.body = _hostile(victim)["backslash dotdot"]
    out = tmp_path / "out"
    env = {"AKL_URL": server.url, "AKL_API_KEY": "akl-000000000000-x"}
    result = CliRunner().invoke(app, ["download", "job-x", "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert not victim.exists()
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
