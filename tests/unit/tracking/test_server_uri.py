"""Which tracking URIs are servers, which are databases, and the check that a server answers before a run."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lmpipe.tracking.runs import check_server, is_database_uri
from lmpipe.tracking.uris import is_server_uri


@pytest.mark.parametrize(("uri", "server", "database"), [
    ("http://127.0.0.1:5000", True, False),
    ("https://mlflow.example.org/", True, False),
    ("sqlite:////tmp/x/mlflow.db", False, True),
    ("postgresql://mlflow:pw@db:5432/mlflow", False, True),
    ("postgresql+psycopg://mlflow@db/mlflow", False, True),
    ("mysql+pymysql://u@db/mlflow", False, True),
    ("databricks", False, False),
    ("file:///tmp/mlruns", False, False),
])
def test_server_and_database_uris(uri, server, database):
    assert (is_server_uri(uri), is_database_uri(uri)) == (server, database)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_does_not_answer_is_named_at_once():
    url = f"http://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as err:
        check_server(url, "tracking.uri")
    assert str(err.value) == (f"tracking.uri={url!r}: no MLflow tracking server answers at {url}/health ([Errno 111] "
                              "Connection refused); start it (`mlflow server ...`, README: Team set-up) or leave "
                              "tracking.uri unset to use the work directory's own store")
    assert time.perf_counter() - start < 5  # refused at once: no retries


@contextmanager
def _answering(status: int) -> Iterator[str]:
    """An HTTP server on loopback that answers every GET with ``status``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 401, 404])
def test_any_http_answer_counts_as_a_server(status):
    """An authenticating proxy in front of the server may refuse /health: MLflow's client then says why."""
    with _answering(status) as url:
        check_server(url, "tracking.uri")
        check_server(url + "/", "--tracking-uri")


@pytest.mark.parametrize("uri", [None, "", "sqlite:////nonexistent/mlflow.db", "postgresql://u@127.0.0.1:1/x"])
def test_only_server_uris_are_checked(uri):
    check_server(uri, "tracking.uri")  # no connection tried: a database is opened by MLflow itself
