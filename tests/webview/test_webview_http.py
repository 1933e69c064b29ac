"""The web view over plain HTTP (no browser): headers, redirects, tokens, and what pages must never show.

A real ``shardstore serve --http-port`` on 127.0.0.1 over a store with two small models under two
prefixes; requests go through http.client so every status and header is seen as sent.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from rpc.access_helpers import ServeProcess, env_with, serve_process
from safetensors.numpy import save_file

import shardstore
from shardstore.store import LocalStore

TEAM_READ = "team-read-token-0123456789abcdef"
ADMIN = "admin-write-token-0123456789abcdef"
TOKENS = f"{TEAM_READ}:read:team/,{ADMIN}:write"
PAGES = ("/", "/models/team/tiny:v1", "/models/other/tiny:v1", "/compare/team/tiny:v1...team/tiny:v2",
         "/models/team/tiny:v1?sort=ratio&order=desc", "/?q=team")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("webview-http")
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.weight": rng.standard_normal((64, 32), dtype=np.float32) for i in range(3)}
    save_file(tensors, str(root / "v1.safetensors"))
    tensors["layers.1.weight"] = tensors["layers.1.weight"] + np.float32(1)
    save_file(tensors, str(root / "v2.safetensors"))
    del tensors["layers.2.weight"]
    save_file(tensors, str(root / "broken.safetensors"))
    path = root / "store"
    for ref, src in (("team/tiny:v1", "v1"), ("other/tiny:v1", "v1"), ("broken/tiny:v1", "broken")):
        shardstore.push(root / f"{src}.safetensors", ref, store=LocalStore(path))
    shardstore.push(root / "v2.safetensors", "team/tiny:v2", store=LocalStore(path), base="team/tiny:v1")
    # A disk that garbled one manifest: its pages fail, the others still work.
    manifest = path / "manifests" / f"{(path / 'refs' / 'broken' / 'tiny' / '@v1').read_text().strip()}.json"
    manifest.write_bytes(manifest.read_bytes()[:-10] + b"garbage!!}")
    return path


def _row(body: str, ref: str) -> str:
    match = re.search(rf'<tr class="version" data-ref="{re.escape(ref)}">(.*?)</tr>', body, re.S)
    assert match, ref
    return re.sub(r"<[^>]+>", " ", match.group(1))


@pytest.fixture(scope="module")
def open_server(store: Path) -> Iterator[ServeProcess]:
    with serve_process(store, "--http-port", "0", env=env_with()) as served:
        yield served


@pytest.fixture(scope="module")
def guarded(store: Path) -> Iterator[ServeProcess]:
    with serve_process(store, "--http-port", "0", env=env_with(SHARDSTORE_TOKENS=TOKENS)) as served:
        yield served


def request(server: ServeProcess, path: str, method: str = "GET", body: dict[str, str] | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    host, port = str(server.ready["http_address"]).rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        data = urlencode(body).encode() if body is not None else None
        sent = dict(headers or {})
        if data is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def test_open_server_pages_are_locked_down_and_never_show_the_store(open_server: ServeProcess, store: Path) -> None:
    for path in PAGES:
        status, headers, body = request(open_server, path)
        assert status == 200, (path, body)
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script runs
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
        assert str(store) not in body and "file://" not in body and "<script" not in body
        # Every asset is this server's own: nothing is fetched from elsewhere (works offline).
        assert not re.search(r'(src|href)="(https?:)?//', body), path
    body = request(open_server, "/")[2]
    created = json.loads((store / "manifests" / f"{(store / 'refs/team/tiny/@v1').read_text().strip()}.json")
                         .read_bytes())["created"]
    assert f"{created[:10]} {created[11:16]} UTC" in _row(body, "team/tiny:v1")
    assert "team/tiny:v1" in _row(body, "team/tiny:v2")  # the delta names its base
    assert "broken/tiny" not in body  # a damaged manifest is left out, not an error page
    status, _, body = request(open_server, "/models/broken/tiny:v1")
    assert status == 500 and "could not be read" in body and str(store) not in body and "manifest" not in body
    status, headers, css = request(open_server, "/assets/style.css")
    assert status == 200 and headers["content-type"].startswith("text/css") and "bar-stored" in css
    assert request(open_server, "/models/Bad:Name:x")[0] == 400
    assert request(open_server, "/models/team/none:v1")[0] == 404
    assert request(open_server, "/compare/team/tiny:v1")[0] == 400
    status, headers, _ = request(open_server, "/compare?a=team/tiny:v1&b=team/tiny:v2")
    assert status == 303 and headers["location"] == "/compare/team/tiny:v1...team/tiny:v2"


def test_without_a_token_every_page_sends_to_sign_in_and_names_nothing(guarded: ServeProcess) -> None:
    for path in PAGES:
        status, headers, body = request(guarded, path)
        assert status == 303 and headers["location"].startswith("/signin?next="), path
        assert "tiny" not in body
    status, _, body = request(guarded, "/signin?next=/")
    assert status == 200 and "tiny" not in body and 'name="token"' in body
    status, _, body = request(guarded, "/", headers={"Authorization": "Bearer unknown-token-0123456789abcdef"})
    assert "tiny" not in body


def test_a_prefix_token_sees_only_its_prefix_and_other_names_look_absent(guarded: ServeProcess, store: Path) -> None:
    bearer = {"Authorization": f"Bearer {TEAM_READ}"}
    status, _, body = request(guarded, "/", headers=bearer)
    assert status == 200
    assert re.findall(r'data-ref="([^"]+)"', body) == ["team/tiny:v1", "team/tiny:v2"]
    assert request(guarded, "/models/team/tiny:v1", headers=bearer)[0] == 200
    hidden = request(guarded, "/models/other/tiny:v1", headers=bearer)
    missing = request(guarded, "/models/other/none:v1", headers=bearer)
    assert hidden[0] == missing[0] == 404
    assert hidden[2].replace("other/tiny:v1", "X") == missing[2].replace("other/none:v1", "X")
    assert request(guarded, "/compare/team/tiny:v1...other/tiny:v1", headers=bearer)[0] == 404
    # A readable name that does not exist looks the same again.
    absent = request(guarded, "/models/team/none:v1", headers=bearer)
    assert absent[0] == 404 and absent[2].replace("team/none:v1", "X") == missing[2].replace("other/none:v1", "X")
    for path in PAGES:
        body = request(guarded, path, headers=bearer)[2]
        assert TEAM_READ not in body and ADMIN not in body and str(store) not in body


def test_sign_in_sets_an_http_only_cookie_and_refuses_strangers(guarded: ServeProcess) -> None:
    origin = {"Origin": f"http://{guarded.ready['http_address']}"}
    status, headers, _ = request(guarded, "/signin", "POST", {"token": TEAM_READ, "next": "/models/team/tiny:v1"},
                                 origin)
    assert status == 303 and headers["location"] == "/models/team/tiny:v1"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"shardstore_token={TEAM_READ};") and "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    status, _, body = request(guarded, "/", headers={"Cookie": f"shardstore_token={TEAM_READ}"})
    assert status == 200 and 'data-ref="team/tiny:v1"' in body and "other/tiny" not in body

    # Never a redirect off this site, whatever "next" says.
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        status, headers, _ = request(guarded, "/signin", "POST", {"token": TEAM_READ, "next": target}, origin)
        assert status == 303 and headers["location"] == "/"
    status, headers, body = request(guarded, "/signin", "POST", {"token": "not-a-known-token-0123456789", "next": "/"},
                                    origin)
    assert status == 401 and "set-cookie" not in headers and "not known" in body
    status, headers, _ = request(guarded, "/signin", "POST", {"token": TEAM_READ, "next": "/"},
                                 {"Origin": "http://evil.example"})
    assert status == 403 and "set-cookie" not in headers
    status, headers, _ = request(guarded, "/signout", "POST", {}, origin)
    assert status == 303 and headers["set-cookie"].startswith("shardstore_token=\"\";")
