"""The Gradio demo in headless Chromium (the system's /usr/bin/chromium, never a downloaded one)
against a real Ray Serve endpoint serving a decomposer trained here in seconds.

The demo process starts first, before the API exists, as it may in real life, with a service
token and an accounts file but never the API's signing key; a person logs in through Gradio's
login page. The first test reads what the page says before the API is up, and that nothing of
the demo answers without a login. The second walks the journey as the admin account: select a
user, type an intent, recommend, see the table and both plots, click "watched", see the list
change. Another checks that a user's account acts for its own user only. The items are named as
IMDb names films ("0000101"), so a picked row's id must keep its zeros through the page. The
screenshot path is printed (pytest -s); the file is kept in pytest's temporary folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import local_serve, service_auth
from models.nn import checkpoint
from models.data.batching import make_split
from models.training.loop import TrainConfig, fit, new_model
from gradio_demo.accounts import add_account
from ray_app.serve.auth import SECRET_ENV, TOKEN_ENV

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 60_000
SERVICE = service_auth()  # the test's own calls; the demo gets a service token of its own

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="the system chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range (32768-60999) and above Ray's worker
    ports (10002-19999): the API's port is chosen before Ray starts, and a port from the ephemeral
    range could be handed to one of Ray's own processes meanwhile (the proxy then cannot bind)."""
    for port in random.sample(range(20_000, 32_000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: the process exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="module")
def api_url() -> str:
    """Where the API will listen; nothing does until the `serve_app` fixture starts it."""
    return f"http://127.0.0.1:{free_port()}"


ADMIN = ("ops", "admin-password-1")  # an account that may act for any user
READER = ("reader", "reader-password-1")  # an account bound to one user


@pytest.fixture(scope="module")
def reader_user(imdb_data) -> str:
    return str(imdb_data.user_source_ids[2])


@pytest.fixture(scope="module")
def demo_url(api_url, tmp_path_factory, reader_user):
    """`python -m gradio_demo` as a user starts it, pointed at an API that is not up yet, with its
    accounts and a service token, without the signing key this test process holds."""
    port = free_port()
    root = tmp_path_factory.mktemp("demo")
    log, accounts = root / "demo.log", root / "accounts.yaml"
    add_account(accounts, ADMIN[0], ADMIN[1], None, admin=True)
    add_account(accounts, READER[0], READER[1], reader_user, admin=False)
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradio_demo", "--api", api_url, "--port", str(port), "--accounts", str(accounts)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **env,
                "GRADIO_ANALYTICS_ENABLED": "False",
                TOKEN_ENV: SERVICE["Authorization"].removeprefix("Bearer "),
            },
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/", 120, proc)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert not any(e.startswith(SECRET_ENV.encode() + b"=") for e in environ)  # never the signing key
        yield f"http://127.0.0.1:{port}"
        assert "admin 'ops' acts for user" in log.read_text()  # what an admin did is in the log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(f"\ndemo log: {log}\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def tiny_checkpoint(imdb_data, tmp_path_factory) -> Path:
    """A small decomposer, two epochs on the tiny synthetic data: seconds, and enough to rank."""
    split = make_split(imdb_data.user_offsets, 1)
    torch.manual_seed(0)
    model = new_model("decomposer", imdb_data, split, lstm_units=32, dim_size=16)
    fit(model, imdb_data, split, TrainConfig(epochs=2, patience=2), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return checkpoint.save(path, model, {"item_source_ids": imdb_data.item_source_ids.tolist()})


@pytest.fixture(scope="module")
def serve_app(api_url, tiny_checkpoint, imdb_data, tmp_path_factory):
    from ray import serve

    from ray_app.serve.app import AppArgs, DeploymentSettings, build_app

    one = DeploymentSettings(num_cpus=0.1, min_replicas=1, max_replicas=1)
    store = tmp_path_factory.mktemp("state") / "state.db"
    with local_serve(int(api_url.rsplit(":", 1)[1])):
        app = build_app(
            AppArgs(
                checkpoint=str(tiny_checkpoint),
                data_dir=str(imdb_data.path),
                store_url=f"sqlite:///{store}",
                load_users=True,  # once, while the app is built
                encoder=one,
                decomposer=one,
                combiner=one,
                ingress=one,
            )
        )
        serve.run(app, name="demo-test", route_prefix="/", blocking=False)
        wait_http(f"{api_url}/healthz", 180)
        yield api_url


@pytest.fixture(scope="module")
def browser(demo_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def logged_in(browser, demo_url: str, account: tuple[str, str]):
    """A new browser context (its own cookies) logged in through Gradio's login page."""
    page = browser.new_context(viewport={"width": 1400, "height": 1700}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(demo_url)
    page.get_by_label("username").fill(account[0])
    page.get_by_label("password").fill(account[1])
    page.get_by_role("button", name="Login").click()
    sync_api.expect(page.locator("#status")).to_be_visible()
    return page


@pytest.fixture(scope="module")
def page(browser, demo_url):
    """The admin's page: it may act for any user."""
    page = logged_in(browser, demo_url, ADMIN)
    yield page
    page.context.close()


def status_shows(page, text: str) -> None:
    sync_api.expect(page.locator("#status")).to_contain_text(text, timeout=TIMEOUT_MS)


def body_rows(page, elem_id: str):
    """The rendered data rows of a gr.Dataframe (ARIA rows with cells; the header has none)."""
    return page.locator(f"#{elem_id}").get_by_role("row").filter(has=page.get_by_role("gridcell"))


def table_column(page, elem_id: str, column: int) -> list[str]:
    return [row.get_by_role("gridcell").nth(column).inner_text().strip() for row in body_rows(page, elem_id).all()]


def test_demo_starts_before_the_api_and_says_so(page, demo_url, api_url):
    page.goto(demo_url)
    status_shows(page, "not reachable")
    assert api_url in page.locator("#status").inner_text()
    assert "Traceback" not in page.content()


def test_nothing_of_the_demo_answers_without_a_login(browser, demo_url):
    """The page is a login form until a person logs in; the demo's API (what the page calls) is a
    401 without the session's cookie; a wrong password is refused."""
    assert httpx.get(f"{demo_url}/config", timeout=10).status_code == 401
    assert httpx.get(f"{demo_url}/gradio_api/info", timeout=10).status_code == 401
    stranger = browser.new_context().new_page()
    stranger.set_default_timeout(TIMEOUT_MS)
    stranger.goto(demo_url)
    sync_api.expect(stranger.get_by_role("button", name="Login")).to_be_visible()
    assert stranger.locator("#status").count() == 0
    stranger.get_by_label("username").fill(ADMIN[0])
    stranger.get_by_label("password").fill("not-the-password")
    stranger.get_by_role("button", name="Login").click()
    sync_api.expect(stranger.get_by_text("Incorrect Credentials")).to_be_visible()
    assert stranger.locator("#status").count() == 0
    stranger.context.close()


def test_an_account_acts_for_its_own_user_only(browser, demo_url, serve_app, reader_user):
    page = logged_in(browser, demo_url, READER)
    try:
        status_shows(page, "Connected to")
        sync_api.expect(page.locator("#who")).to_contain_text(reader_user)  # its user, picked for it
        page.locator("#user input").click()
        (choice,) = page.locator("#user [role=option]").all_inner_texts()  # one user to choose from
        assert choice.endswith(f"{reader_user} (your account's user)")
        page.locator("#user input").press("Escape")
        page.locator("#user-q textarea").fill("1")
        page.locator("#user-q textarea").press("Enter")
        status_shows(page, f"acts for user {reader_user} only")
        page.locator("#new-user").click()
        status_shows(page, f"acts for user {reader_user} only")
        # its own recommendations, through its user token (waited for: the status above may be an earlier one)
        sync_api.expect(body_rows(page, "recs")).to_have_count(10, timeout=TIMEOUT_MS)
    finally:
        page.context.close()


def test_recommend_watch_and_see_the_interests_move(page, demo_url, serve_app, imdb_data, tmp_path):
    page.goto(demo_url)  # a reload is how a person retries once the API is up
    status_shows(page, "Connected to")

    # 1. find a user by id prefix, pick them: their history appears as a timeline
    users = httpx.get(f"{serve_app}/users", params={"limit": 1}, headers=SERVICE).json()["users"]
    user = users[0]["user_id"]
    page.locator("#user-q textarea").fill(user)
    page.locator("#user-q textarea").press("Enter")
    status_shows(page, "users match")
    page.locator("#user input").click()
    page.locator("#user [role=option]", has_text=re.compile(rf"(^|\s){re.escape(user)} \(")).click()
    sync_api.expect(page.locator("#who")).to_contain_text(user)
    sync_api.expect(body_rows(page, "history").first).to_be_visible()
    shown = httpx.get(f"{serve_app}/users/{user}/events", headers=SERVICE).json()["events"]
    assert table_column(page, "history", 1)[0] == shown[-1]["title"]  # newest first

    # 2. an intent and a moment -> the top-k with titles, genres and scores
    page.locator("#intent textarea").fill("something light and funny for tonight")
    page.locator("#recommend").click()
    status_shows(page, "for “something light and funny for tonight”")
    titles = table_column(page, "recs", 1)
    assert len(titles) == 10 and set(titles) <= set(imdb_data.titles)
    scores = [float(s) for s in table_column(page, "recs", 3)]
    assert scores == sorted(scores, reverse=True)

    # 3. the plots render (vega draws them), the per-dimension table names every dimension
    for plot in ("gates-plot", "interests-plot", "timeline"):
        sync_api.expect(page.locator(f"#{plot} canvas, #{plot} svg").first).to_be_visible()
    dims = httpx.get(f"{serve_app}/healthz").json()["dimensions"]
    assert [row.split(" (")[0] for row in table_column(page, "dims", 0)] == dims

    # 4. watched -> posted at the chosen moment; the list and history change. The second row is
    #    picked by clicking it, as a person would; the dropdown follows the click.
    n_before = httpx.get(f"{serve_app}/users", params={"q": user}, headers=SERVICE).json()["users"][0]["n_events"]
    ids = table_column(page, "recs", 4)
    body_rows(page, "recs").nth(1).get_by_role("gridcell").nth(1).click()
    sync_api.expect(page.locator("#pick input")).to_have_value(re.compile(re.escape(titles[1])))
    page.locator("#watched").click()
    status_shows(page, f"Posted item {ids[1]}")
    sync_api.expect(body_rows(page, "recs").nth(1).get_by_role("gridcell").nth(4)).not_to_have_text(ids[1])
    assert ids[1] not in table_column(page, "recs", 4)  # seen items are excluded
    assert table_column(page, "history", 1)[0] == titles[1]  # newest first in the timeline
    events = httpx.get(f"{serve_app}/users/{user}/events", params={"limit": 1}, headers=SERVICE).json()["events"]
    assert events[-1]["item_id"] == ids[1] and ids[1].startswith("0")  # the id as written, its zeros kept
    assert (
        httpx.get(f"{serve_app}/users", params={"q": user}, headers=SERVICE).json()["users"][0]["n_events"]
        == n_before + 1
    )
    assert "Traceback" not in page.content()

    shot = tmp_path / "demo_browser.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")


def test_new_user_adds_an_event_found_by_text(page, demo_url, serve_app, imdb_data):
    page.goto(demo_url)
    status_shows(page, "Connected to")
    page.locator("#new-user").click()
    sync_api.expect(page.locator("#who")).to_contain_text("no events yet")
    user = page.locator("#who strong").inner_text().strip()
    assert user.startswith("new-")
    sync_api.expect(body_rows(page, "recs")).to_have_count(10, timeout=TIMEOUT_MS)  # a cold-start list, no state

    # 5. search the catalogue by text (through the encoder) and add the first hit by hand
    page.get_by_text("Add an event by hand").click()
    page.locator("#item-q textarea").fill("river")
    page.locator("#search").click()
    status_shows(page, "items close to “river”")
    found = table_column(page, "found", 0)
    assert found and set(found) <= set(imdb_data.titles)
    page.locator("#add").click()
    status_shows(page, "1 event now")
    sync_api.expect(page.locator("#who")).to_contain_text("1 event,")
    assert table_column(page, "history", 1) == [found[0]]
    assert httpx.get(f"{serve_app}/users/{user}/events", headers=SERVICE).json()["events"][0]["title"] == found[0]

    # a bad request is a message, not a traceback: an empty search never reaches the API
    page.locator("#item-q textarea").fill("   ")
    page.locator("#search").click()
    status_shows(page, "Type a few words")
    assert "Traceback" not in page.content()


def test_an_admin_adds_an_item_and_sees_it_recommended(page, demo_url, serve_app, imdb_data):
    """An item added from the page with the text of the user's best recommendation (the prepared
    title, genres and tags) under a new id: the page redraws the user's list, and the item is in it."""
    import pyarrow.parquet as pq

    page.goto(demo_url)
    status_shows(page, "Connected to")
    user = str(imdb_data.user_source_ids[3])
    page.locator("#user-q textarea").fill(user)
    page.locator("#user-q textarea").press("Enter")
    status_shows(page, "users match")
    page.locator("#user input").click()
    page.locator("#user [role=option]", has_text=re.compile(rf"(^|\s){re.escape(user)} \(")).click()
    sync_api.expect(page.locator("#who")).to_contain_text(user)
    page.locator("#k input[type=number]").fill("30")
    page.locator("#k input[type=number]").press("Enter")
    page.locator("#recommend").click()
    status_shows(page, "Top 30")
    best = table_column(page, "recs", 4)[0]
    rows = pq.read_table(imdb_data.path / "items.parquet", columns=["source_id", "title", "genres", "tags"]).to_pylist()
    row = next(r for r in rows if r["source_id"] == best)

    page.get_by_text("Add an item to the catalogue").click()
    page.locator("#new-item-id textarea").fill("demo-new-1")
    page.locator("#new-item-title textarea").fill(row["title"])
    for genre in row["genres"]:
        page.locator("#new-item-genres").get_by_label(genre, exact=True).check()
    page.locator("#new-item-tags textarea").fill(", ".join(row["tags"]))
    page.locator("#add-item").click()
    status_shows(page, "Added item demo-new-1")
    assert "demo-new-1" in table_column(page, "recs", 4)  # recommended, in the redrawn list
    got = httpx.get(f"{serve_app}/items/demo-new-1", headers=SERVICE).json()
    assert got["added"] is True and got["genres"] == row["genres"] and got["tags"] == row["tags"]
    assert "Traceback" not in page.content()
