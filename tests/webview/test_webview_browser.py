"""The web view in a real headless Chromium against a real ``shardstore serve --http-port`` on 127.0.0.1.

One store holds MiniLM three ways (minilm:v1 as shipped, minilm:int8 pushed with
``--lossy '*.weight=int8'``, minilm:v2 with known edits from ``tests/edited_model.py``) and once
more under team/. One browser serves the whole module. Every page visit checks the console for
errors; screenshots of the three pages at desktop and phone widths go to $SHARDSTORE_SCREENSHOTS
or a temporary folder printed at the start.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edited_model import ADDED, EDITED, REMOVED, make_edited_minilm
from rpc.access_helpers import ServeProcess, env_with, serve_process
from safetensors import safe_open
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

import shardstore
from shardstore.store import LocalStore
from webview.browser import DESKTOP, PHONE, chromium, console_errors, screenshot, set_viewport

TEAM_READ = "team-read-token-0123456789abcdef"  # may read only names under team/
TOKENS = f"{TEAM_READ}:read:team/,admin-token-0123456789abcdef:write"


@pytest.fixture(scope="module")
def store(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("webview")
    path = root / "store"
    shardstore.push(minilm_dir, "minilm:v1", store=LocalStore(path))
    lossy = subprocess.run([sys.executable, "-m", "shardstore", "push", str(minilm_dir), "minilm:int8", "--lossy",
                            "*.weight=int8", "--store", str(path), "--quiet"], capture_output=True, text=True,
                           timeout=300)
    assert lossy.returncode == 0, lossy.stderr
    shardstore.push(make_edited_minilm(minilm_dir, root / "edited"), "minilm:v2", store=LocalStore(path))
    shardstore.push(minilm_dir, "team/minilm:v1", store=LocalStore(path))
    return path


@pytest.fixture(scope="module")
def server(store: Path) -> Iterator[ServeProcess]:
    with serve_process(store, "--http-port", "0", env=env_with()) as served:
        yield served


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    import os

    folder = Path(os.environ.get("SHARDSTORE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    # Named in the test run's own output (not swallowed by output capture), so the images can be found.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\nweb view screenshots: {folder}", flush=True)
    return folder


def visit(driver: webdriver.Chrome, server: ServeProcess, path: str) -> None:
    """Open a page and check that it loaded without a console error."""
    driver.get(f"http://{server.ready['http_address']}{path}")
    assert driver.find_element(By.TAG_NAME, "main")
    assert console_errors(driver) == []


def wait_for_url(driver: webdriver.Chrome, ending: str) -> None:
    """A click that navigates returns before the next page has loaded: wait for its address."""
    WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith(ending)
                                    and d.execute_script("return document.readyState") == "complete")


def _rows(driver: webdriver.Chrome, selector: str, attribute: str = "data-name") -> list[str]:
    return [row.get_attribute(attribute) or "" for row in driver.find_elements(By.CSS_SELECTOR, selector)]


def _manifest(store: Path, ref: str) -> dict[str, Any]:
    name, tag = ref.split(":")
    manifest_id = (store / "refs" / name / f"@{tag}").read_text().strip()
    return json.loads((store / "manifests" / f"{manifest_id}.json").read_bytes())


def _tensor_names(minilm_dir: Path) -> list[str]:
    with safe_open(str(minilm_dir / "model.safetensors"), "np") as f:
        return list(f.keys())


def test_registry_lists_every_pushed_version_and_filters_by_name(browser: webdriver.Chrome,
                                                                 server: ServeProcess) -> None:
    visit(browser, server, "/")
    assert set(_rows(browser, "tr.version", "data-ref")) == {"minilm:v1", "minilm:int8", "minilm:v2",
                                                             "team/minilm:v1"}
    box = browser.find_element(By.ID, "q")
    box.send_keys("team/")
    box.submit()
    wait_for_url(browser, "/?q=team%2F")
    assert _rows(browser, "tr.version", "data-ref") == ["team/minilm:v1"]
    assert console_errors(browser) == []


def test_model_page_shows_every_tensor_layer_config_and_a_pull_line_that_works(
    browser: webdriver.Chrome, server: ServeProcess, minilm_dir: Path, tmp_path: Path
) -> None:
    visit(browser, server, "/")
    browser.find_element(By.CSS_SELECTOR, 'tr[data-ref="minilm:v1"] a').click()
    wait_for_url(browser, "/models/minilm:v1")
    names = _tensor_names(minilm_dir)
    assert len(names) == 104
    assert sorted(_rows(browser, "tr.tensor")) == sorted(names)
    assert browser.find_element(By.ID, "tensor-count").text == "104"

    # One bar per layer: encoder.layer.N, else the module path (the tensor name less its last part).
    layers = {m.group(0) if (m := re.match(r"encoder\.layer\.\d+", n)) else n.rsplit(".", 1)[0] for n in names}
    bars = browser.execute_script("""return [...document.querySelectorAll('.bar-row')].map(b => [b.dataset.layer,
        parseFloat(b.querySelector('rect.bar-raw').getAttribute('width')),
        parseFloat(b.querySelector('rect.bar-stored').getAttribute('width'))])""")
    assert {layer for layer, _, _ in bars} == layers and len(bars) == len(layers)
    assert all(0 <= stored <= raw <= 1000 for _, raw, stored in bars)
    assert max(raw for _, raw, _ in bars) == 1000.0  # the widest layer spans the chart

    config = json.loads((minilm_dir / "config.json").read_text())
    facts = browser.find_element(By.ID, "config").text
    assert "BertModel" in facts and f"hidden size\n{config['hidden_size']}" in facts
    assert f"layers\n{config['num_hidden_layers']}" in facts
    files = _rows(browser, "#file-table tr.file td.mono", "textContent")
    assert {"model.safetensors", "config.json", "vocab.txt", "tokenizer.json"} <= set(files)

    # Sorting is a link: the largest stored tensor first.
    browser.find_element(By.CSS_SELECTOR, 'a.sort[data-column="stored"]').click()
    wait_for_url(browser, "?sort=stored&order=asc#tensors")
    browser.find_element(By.CSS_SELECTOR, 'a.sort[data-column="stored"]').click()
    wait_for_url(browser, "?sort=stored&order=desc#tensors")
    stored = {n: t["stored_bytes"] for n, t in _manifest(server_store(server), "minilm:v1")["tensors"].items()}
    shown = _rows(browser, "tr.tensor")
    assert [stored[n] for n in shown] == sorted(stored.values(), reverse=True)
    assert console_errors(browser) == []

    # The page's own pull command, run as shown, gives back the original bytes.
    line = browser.find_element(By.ID, "pull-cli").text
    assert line == f"shardstore pull grpc://{server.address}/minilm:v1 ./minilm-v1"
    result = subprocess.run([sys.executable, "-m", *line.split()[:-1], str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()


def server_store(server: ServeProcess) -> Path:
    return Path(str(server.ready["store"]).removeprefix("file://"))


def test_lossy_version_shows_each_quantized_tensors_snr_and_max_error(browser: webdriver.Chrome,
                                                                      server: ServeProcess) -> None:
    visit(browser, server, "/models/minilm:int8")
    tensors = _manifest(server_store(server), "minilm:int8")["tensors"]
    lossy = {n: t["quality"] for n, t in tensors.items() if "quality" in t}
    assert len(lossy) >= 30
    # One script call reads every row (a WebDriver call per cell costs a round trip each).
    rows = browser.execute_script("""return [...document.querySelectorAll('tr.tensor')].map(r => [
        r.dataset.name, r.classList.contains('lossy'), r.querySelector('td.snr').textContent.trim(),
        r.querySelector('td.max-error').textContent.trim()])""")
    assert len(rows) == len(tensors) and {name for name, is_lossy, _, _ in rows if is_lossy} == set(lossy)
    for name, is_lossy, snr, max_error in rows:
        if not is_lossy:
            assert snr == max_error == ""
            continue
        assert float(snr) == pytest.approx(lossy[name]["snr_db"], abs=0.01) and float(snr) > 30
        assert float(max_error) == pytest.approx(lossy[name]["max_abs_error"], rel=1e-2)


def test_compare_page_shows_the_changes_and_bytes_to_fetch_of_shardstore_diff(
    browser: webdriver.Chrome, server: ServeProcess, tmp_path: Path
) -> None:
    visit(browser, server, "/models/minilm:v1")
    browser.find_element(By.CSS_SELECTOR, '#compare-b option[value="minilm:v2"]').click()
    browser.find_element(By.CSS_SELECTOR, "#compare button").click()
    wait_for_url(browser, "/compare/minilm:v1...minilm:v2")
    assert console_errors(browser) == []
    assert set(_rows(browser, "tr.changed")) == set(EDITED)
    assert _rows(browser, "li.added") == [ADDED] and _rows(browser, "li.removed") == [REMOVED]

    result = subprocess.run([sys.executable, "-m", "shardstore", "diff", "minilm:v1", "minilm:v2", "--json",
                             "--store", str(server_store(server))], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cli = json.loads(result.stdout)
    page = {key: browser.find_element(By.ID, f"count-{key}").text for key in cli["tensors"]}
    assert page == {key: str(value) for key, value in cli["tensors"].items()}
    assert int(browser.find_element(By.ID, "fetch-bytes").get_attribute("data-bytes") or -1) == cli["fetch_bytes"]
    assert int(browser.find_element(By.ID, "fetch-shards").get_attribute("data-count") or -1) == cli["fetch_shards"]
    assert int(browser.find_element(By.ID, "shards-shared").get_attribute("data-count") or -1) == cli["shards_shared"]

    # A real client holding v1 (its shard cache) fetches exactly that many shards and bytes to pull v2.
    cache = tmp_path / "cache"
    for tag in ("v1", "v2"):
        before = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
        pulled = subprocess.run([sys.executable, "-m", "shardstore", "pull", f"grpc://{server.address}/minilm:{tag}",
                                 str(tmp_path / tag), "--cache", str(cache), "--json"],
                                capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr
    grown = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) - before
    assert json.loads(pulled.stdout)["shards_fetched"] == cli["fetch_shards"]
    assert grown == cli["fetch_shard_bytes"] == cli["fetch_bytes"]


@pytest.mark.parametrize("page", ["registry", "model", "compare"])
def test_pages_fit_a_phone_and_are_captured_at_both_widths(browser: webdriver.Chrome, server: ServeProcess,
                                                          shots: Path, page: str) -> None:
    path = {"registry": "/", "model": "/models/minilm:int8", "compare": "/compare/minilm:v1...minilm:v2"}[page]
    visit(browser, server, path)
    set_viewport(browser, *PHONE, mobile=True)
    try:
        # The page never scrolls sideways on a phone: wide tables scroll inside their own box.
        widths = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1] == PHONE[0]
        size = browser.execute_script("return parseFloat(getComputedStyle(document.body).fontSize)")
        assert size >= 14
    finally:
        set_viewport(browser, *DESKTOP, mobile=False)
    for label, width, mobile in (("desktop", DESKTOP[0], False), ("phone", PHONE[0], True)):
        target = shots / f"{page}-{label}.png"
        screenshot(browser, target, width, mobile=mobile)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and target.stat().st_size > 10_000
    assert console_errors(browser) == []


@pytest.fixture(scope="module")
def guarded(store: Path) -> Iterator[ServeProcess]:
    with serve_process(store, "--http-port", "0", "--require-token", env=env_with(SHARDSTORE_TOKENS=TOKENS)) as s:
        yield s


def test_with_tokens_no_token_sees_nothing_and_a_prefix_token_sees_only_its_prefix(
    browser: webdriver.Chrome, guarded: ServeProcess
) -> None:
    browser.delete_all_cookies()
    for path in ("/", "/models/minilm:v1", "/compare/minilm:v1...minilm:v2"):
        visit(browser, guarded, path)
        assert "/signin" in browser.current_url and "minilm" not in browser.find_element(By.TAG_NAME, "main").text
        assert browser.find_elements(By.CSS_SELECTOR, "tr.version") == []

    visit(browser, guarded, "/")
    browser.find_element(By.ID, "token").send_keys(TEAM_READ)
    browser.find_element(By.ID, "signin").click()
    wait_for_url(browser, f"http://{guarded.ready['http_address']}/")
    assert _rows(browser, "tr.version", "data-ref") == ["team/minilm:v1"]
    cookie = browser.get_cookie("shardstore_token")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TEAM_READ not in browser.page_source and TEAM_READ not in browser.current_url
    assert console_errors(browser) == []

    visit(browser, guarded, "/models/team/minilm:v1")
    assert len(_rows(browser, "tr.tensor")) == 104
    # A name outside the prefix answers as a model that does not exist (the 404 logs a console error).
    browser.get(f"http://{guarded.ready['http_address']}/models/minilm:v1")
    assert browser.find_element(By.ID, "problem").text == "no model minilm:v1 here"
    browser.get(f"http://{guarded.ready['http_address']}/compare/team/minilm:v1...minilm:v2")
    assert browser.find_element(By.ID, "problem").text == "no model minilm:v2 here"
    console_errors(browser)  # the two expected 404s

    visit(browser, guarded, "/")
    browser.find_element(By.ID, "signout").click()
    wait_for_url(browser, "/signin")
    assert browser.get_cookie("shardstore_token") is None
    assert console_errors(browser) == []
