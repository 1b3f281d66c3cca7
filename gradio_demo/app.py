"""The Gradio Blocks page: pick a user, set the moment and intent, see the recommendations and
the decomposition, mark an item as watched and watch the interests move.

A person logs in (Gradio's auth, `gradio_demo.accounts`); an account acts for its own user id
only, through a short-lived user token the API mints from the demo's service token (`Access`),
and an admin account may act for any user, each time logged. Every handler talks to the HTTP API
through `ApiClient` and turns an `ApiError` into a message in the status line; nothing else of a
failure reaches the page.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr
from cachetools import TTLCache

from gradio_demo import views
from gradio_demo.accounts import Account, Accounts
from gradio_demo.client import ApiClient, ApiError, NotFound
from gradio_demo.panels import Page, build_page
from ray_app.serve.schemas import EventIn, Health

log = logging.getLogger(__name__)

NEW_PREFIX = "new-"
HISTORY_SHOWN = 20
INTERESTS_SHOWN = 50
CSS = "#status {min-height: 2.5em}"
# What `Handlers.refresh` returns: status, who, history, timeline, start, moment, recs, pick, gates, interests, dims.
N_VIEW = 11


def new_user_id() -> str:
    return NEW_PREFIX + uuid.uuid4().hex[:8]


def ok(text: str) -> str:
    return f"✓ {text}"


def problem(text: str) -> str:
    return f"⚠ {text}"


class Missing(Exception):
    """An action the page cannot do yet (no user picked, no item chosen); the text says what to do."""


def guarded(fn: Callable, n_outputs: int) -> Callable:
    """Run a handler; an API failure (or a bug) becomes a status message, other outputs stay as they are.

    The status line is always the handler's first output.
    """

    @functools.wraps(fn)
    def run(*args):
        try:
            return fn(*args)
        except (ApiError, Missing) as e:
            message = problem(str(e))
        except Exception:  # a bug must not put a traceback on the page; the log keeps it
            log.exception("demo handler %s failed", fn.__name__)
            message = problem("Something went wrong in the demo itself; the details are in its log.")
        return (message, *[gr.skip()] * (n_outputs - 1))

    return run


def describe_health(api: ApiClient, health: Health) -> str:
    return ok(
        f"Connected to {api.base_url}: model `{health.model_version}`, {health.n_items} items, "
        f"{health.n_users} users, dimensions {', '.join(health.dimensions)}."
    )


USER_TOKEN_TTL_S = 900  # the life of a user token the demo has minted (15 minutes)


@dataclass
class Access:
    """Who is on the page, and the API client that acts for them: a user token for the one user
    the account may act for, minted by the API from the demo's service token (which never leaves
    this process) and kept until a minute before it expires."""

    api: ApiClient  # with the demo's service token
    accounts: Accounts
    token_ttl_s: int = USER_TOKEN_TTL_S
    _tokens: TTLCache = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self._tokens = TTLCache(maxsize=10_000, ttl=max(self.token_ttl_s - 60, 1))  # user id -> token

    def account(self, request: gr.Request | None) -> Account:
        account = self.accounts.get(getattr(request, "username", None))
        if account is None:  # Gradio's login stands before every handler; this is a second lock
            raise Missing("Log in first.")
        return account

    def client_for(self, account: Account, user_id: str) -> ApiClient:
        """A client acting for `user_id`: the account's own user, or any user for an admin (logged)."""
        if not account.admin and user_id != account.user_id:
            log.warning("account %r asked to act for user %r: refused", account.name, user_id)
            raise Missing(f"Your account acts for user {account.user_id} only.")
        if account.admin:
            log.info("admin %r acts for user %r", account.name, user_id)
        with self._lock:
            token = self._tokens.get(user_id)
        if token is None:
            token = self.api.mint_user_token(user_id, self.token_ttl_s).token
            with self._lock:
                self._tokens[user_id] = token
        return self.api.with_token(token)

    def admin(self, account: Account, what: str) -> ApiClient:
        """The service client, for an admin account only (logged)."""
        if not account.admin:
            raise Missing(f"Your account acts for user {account.user_id} only; {what} is for admin accounts.")
        log.info("admin %r: %s", account.name, what)
        return self.api

    def searcher(self, account: Account) -> ApiClient:
        """A client that may search the catalogue: the account's own user token, or the service's for an admin."""
        return self.api if account.admin else self.client_for(account, account.user_id)


@dataclass
class Handlers:
    """The page's actions; each returns a tuple in the order of the outputs it is wired to. Each
    takes Gradio's request last, to know who is logged in."""

    access: Access

    @property
    def api(self) -> ApiClient:
        return self.access.api

    # -- connection and users --

    def connect(self, q: str, request: gr.Request):
        account = self.access.account(request)
        health = self.api.health()
        genres = gr.update(choices=health.genres)  # what an added item may name
        if not account.admin:
            mine = [(f"{account.user_id} (your account's user)", account.user_id)]
            return describe_health(self.api, health), gr.update(choices=mine, value=account.user_id), genres
        users = self.access.admin(account, "listing users").users(q or "")
        return describe_health(self.api, health), gr.update(choices=self._user_choices(users)), genres

    def find_users(self, q: str, request: gr.Request):
        users = self.access.admin(self.access.account(request), "listing users").users(q or "")
        note = ok(f"{len(users)} users match “{q}”.") if q else ok(f"Showing the first {len(users)} users.")
        return note, gr.update(choices=self._user_choices(users))

    def start_new_user(self, q: str, request: gr.Request):
        admin = self.access.admin(self.access.account(request), "starting a new user")
        user_id = new_user_id()
        try:
            users = admin.users(q or "")
        except ApiError:
            users = []  # the new user works without the list; refresh reports the endpoint's state
        choices = [(f"{user_id} (new)", user_id), *self._user_choices(users)]
        return (
            ok(f"New user `{user_id}`: no history yet — pick something you watched."),
            gr.update(choices=choices, value=user_id),
        )

    @staticmethod
    def _user_choices(users) -> list[tuple[str, str]]:
        return [(f"{u.user_id} ({views.events(u.n_events)})", u.user_id) for u in users]

    # -- the main view --

    def refresh(self, user_id: str | None, intent: str, weekday: int, hour: int, k: int, request: gr.Request):
        """History, moment, recommendations, gates, the gates over the history, per-dimension tops."""
        if not user_id:
            raise Missing("Pick a user (or start a new one) first.")
        api = self.access.client_for(self.access.account(request), user_id)
        try:
            history = api.user_events(user_id, limit=HISTORY_SHOWN)
        except NotFound:
            if not user_id.startswith(NEW_PREFIX):
                raise
            history = []  # a new user exists in the store only after the first event
        start = views.anchor(history)
        moment = views.next_moment(start, int(weekday), int(hour))
        rec = api.recommend(user_id if history else None, timestamp=moment, intent=intent, k=int(k), explain=True)
        interests = api.interests(user_id, last=INTERESTS_SHOWN) if history else None
        who = (
            f"**{user_id}** — {views.events(rec.n_events)}, last on {views.fmt_time(history[-1].timestamp)}"
            if history
            else f"**{user_id}** — no events yet"
        )
        intent_note = f" for “{intent.strip()}”" if intent and intent.strip() else ""
        status = ok(f"Top {len(rec.items)}{intent_note} on {views.fmt_time(moment)} UTC; {views.gates_summary(rec)}.")
        choices = views.item_choices(rec.items)
        return (
            status,
            who,
            views.history_frame(history),
            views.timeline_frame(history),
            start,
            f"Moment of the request: **{views.fmt_time(moment)} UTC**",
            views.recs_frame(rec.items),
            gr.update(choices=choices, value=choices[0][1] if choices else None),
            views.gates_frame(rec),
            views.interests_frame(interests),
            views.dimension_frame(rec),
        )

    def post_event(
        self,
        user_id: str | None,
        item_id: str | None,
        rating: float,
        start: float | None,
        intent: str,
        weekday: int,
        hour: int,
        k: int,
        request: gr.Request,
    ):
        """Post `item_id` as watched at the chosen moment, then redraw everything from the API."""
        if not user_id:
            raise Missing("Pick a user (or start a new one) first.")
        if not item_id:
            raise Missing("Choose an item first (click a row or use the list).")
        api = self.access.client_for(self.access.account(request), user_id)
        moment = views.next_moment(start if start is not None else time.time(), int(weekday), int(hour))
        accepted = api.post_events(user_id, [EventIn(item_id=str(item_id), rating=float(rating), timestamp=moment)])
        out = self.refresh(user_id, intent, weekday, hour, k, request)
        note = ok(
            f"Posted item {item_id} (rating {rating:g}) at {views.fmt_time(moment)} UTC — "
            f"{views.events(accepted.n_events)} now. "
        )
        return (note + out[0].removeprefix("✓ "), *out[1:])

    # -- items --

    def add_item(
        self,
        user_id: str | None,
        item_id: str,
        title: str,
        genres: list[str] | None,
        tags: str,
        description: str,
        intent: str,
        weekday: int,
        hour: int,
        k: int,
        request: gr.Request,
    ):
        """Add an item (admin accounts), then redraw the picked user's view and say where it ranks."""
        if not user_id:
            raise Missing("Pick a user (or start a new one) first, to see where the new item ranks for them.")
        if not (item_id or "").strip() or not (title or "").strip():
            raise Missing("Give the new item an id and a title.")
        admin = self.access.admin(self.access.account(request), "adding an item")
        tag_list = [t.strip() for t in (tags or "").split(",") if t.strip()]
        added = admin.add_item(item_id.strip(), title.strip(), genres or [], tag_list, (description or "").strip())
        out = self.refresh(user_id, intent, weekday, hour, k, request)
        ranked = out[6]["item_id"].tolist()  # the redrawn recommendations
        where = (
            f"it is #{ranked.index(added.item_id) + 1} of this user's top {len(ranked)}"
            if added.item_id in ranked
            else f"it is not in this user's top {len(ranked)}"
        )
        return (ok(f"Added item {added.item_id} “{added.title}”; {where}. ") + out[0].removeprefix("✓ "), *out[1:])

    def search_items(self, q: str, request: gr.Request):
        if not q or not q.strip():
            raise Missing("Type a few words to search the catalogue.")
        items = self.access.searcher(self.access.account(request)).search_items(q.strip(), k=10)
        choices = views.item_choices(items)
        return (
            ok(f"{len(items)} items close to “{q.strip()}”."),
            views.search_frame(items),
            gr.update(choices=choices, value=choices[0][1] if choices else None),
        )

    @staticmethod
    def pick_row(frame, evt: gr.SelectData):
        """A click anywhere in a row of a table that has an `item_id` column picks that item."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if frame is None or not 0 <= row < len(frame):
            return gr.skip()
        return str(frame["item_id"].iloc[row])


def wire_events(demo: gr.Blocks, h: Handlers, page: Page) -> None:
    """Connect each control of `page` to its handler, every handler guarded (see `guarded`)."""
    status, start = page.status, page.start
    who, req, man = page.who, page.request, page.manual
    refresh_out = page.view_outputs
    moment_in = req.moment_in
    n = len(refresh_out)
    assert n == N_VIEW, "refresh_out must follow Handlers.refresh's return order"

    cat = page.catalogue
    demo.load(guarded(h.connect, 3), [who.user_q], [status, who.user, cat.genres])
    who.user_q.submit(guarded(h.find_users, 2), [who.user_q], [status, who.user])
    who.new_btn.click(guarded(h.start_new_user, 2), [who.user_q], [status, who.user])
    who.user.change(guarded(h.refresh, n), [who.user, *moment_in], refresh_out)
    req.recommend_btn.click(guarded(h.refresh, n), [who.user, *moment_in], refresh_out)
    req.intent.submit(guarded(h.refresh, n), [who.user, *moment_in], refresh_out)
    req.recs.select(h.pick_row, [req.recs], [req.pick])
    req.watched_btn.click(guarded(h.post_event, n), [who.user, req.pick, req.rating, start, *moment_in], refresh_out)
    man.search_btn.click(guarded(h.search_items, 3), [man.item_q], [status, man.found, man.found_pick])
    man.item_q.submit(guarded(h.search_items, 3), [man.item_q], [status, man.found, man.found_pick])
    man.found.select(h.pick_row, [man.found], [man.found_pick])
    man.add_btn.click(
        guarded(h.post_event, n), [who.user, man.found_pick, man.found_rating, start, *moment_in], refresh_out
    )
    new_item = [cat.item_id, cat.title, cat.genres, cat.tags, cat.description]
    cat.add_btn.click(guarded(h.add_item, n), [who.user, *new_item, *moment_in], refresh_out)


def build_demo(access: Access) -> gr.Blocks:
    """The page (see `gradio_demo.panels`) with its handlers wired to the API through `access`."""
    h = Handlers(access)
    with gr.Blocks(title="Dynamic interests", analytics_enabled=False) as demo:  # no calls home
        page = build_page()
        wire_events(demo, h, page)
    return demo
