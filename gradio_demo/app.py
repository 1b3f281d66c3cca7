"""The Gradio Blocks page: pick a user, set the moment and intent, see the recommendations and
the decomposition, mark an item as watched and watch the interests move.

Every handler talks to the HTTP API through `ApiClient` and turns an `ApiError` into a message
in the status line; nothing else of a failure reaches the page.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from gradio_demo import views
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


@dataclass
class Handlers:
    """The page's actions; each returns a tuple in the order of the outputs it is wired to."""

    api: ApiClient

    # -- connection and users --

    def connect(self, q: str):
        health = self.api.health()
        users = self.api.users(q or "")
        return describe_health(self.api, health), gr.update(choices=self._user_choices(users))

    def find_users(self, q: str):
        users = self.api.users(q or "")
        note = ok(f"{len(users)} users match “{q}”.") if q else ok(f"Showing the first {len(users)} users.")
        return note, gr.update(choices=self._user_choices(users))

    def start_new_user(self, q: str):
        user_id = new_user_id()
        try:
            users = self.api.users(q or "")
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

    def refresh(self, user_id: str | None, intent: str, weekday: int, hour: int, k: int):
        """History, moment, recommendations, gates, the gates over the history, per-dimension tops."""
        if not user_id:
            raise Missing("Pick a user (or start a new one) first.")
        try:
            history = self.api.user_events(user_id, limit=HISTORY_SHOWN)
        except NotFound:
            if not user_id.startswith(NEW_PREFIX):
                raise
            history = []  # a new user exists in the store only after the first event
        start = views.anchor(history)
        moment = views.next_moment(start, int(weekday), int(hour))
        rec = self.api.recommend(user_id if history else None, timestamp=moment, intent=intent, k=int(k), explain=True)
        interests = self.api.interests(user_id, last=INTERESTS_SHOWN) if history else None
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
        item_id: int | None,
        rating: float,
        start: float | None,
        intent: str,
        weekday: int,
        hour: int,
        k: int,
    ):
        """Post `item_id` as watched at the chosen moment, then redraw everything from the API."""
        if not user_id:
            raise Missing("Pick a user (or start a new one) first.")
        if item_id is None:
            raise Missing("Choose an item first (click a row or use the list).")
        moment = views.next_moment(start if start is not None else time.time(), int(weekday), int(hour))
        accepted = self.api.post_events(
            user_id, [EventIn(item_id=int(item_id), rating=float(rating), timestamp=moment)]
        )
        out = self.refresh(user_id, intent, weekday, hour, k)
        note = ok(
            f"Posted item {item_id} (rating {rating:g}) at {views.fmt_time(moment)} UTC — "
            f"{views.events(accepted.n_events)} now. "
        )
        return (note + out[0].removeprefix("✓ "), *out[1:])

    # -- items --

    def search_items(self, q: str):
        if not q or not q.strip():
            raise Missing("Type a few words to search the catalogue.")
        items = self.api.search_items(q.strip(), k=10)
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
        return int(frame["item_id"].iloc[row])


def wire_events(demo: gr.Blocks, h: Handlers, page: Page) -> None:
    """Connect each control of `page` to its handler, every handler guarded (see `guarded`)."""
    status, start = page.status, page.start
    who, req, man = page.who, page.request, page.manual
    refresh_out = page.view_outputs
    moment_in = req.moment_in
    n = len(refresh_out)
    assert n == N_VIEW, "refresh_out must follow Handlers.refresh's return order"

    demo.load(guarded(h.connect, 2), [who.user_q], [status, who.user])
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


def build_demo(api: ApiClient) -> gr.Blocks:
    """The page (see `gradio_demo.panels`) with its handlers wired to `api`."""
    h = Handlers(api)
    with gr.Blocks(title="Dynamic interests", analytics_enabled=False) as demo:  # no calls home
        page = build_page()
        wire_events(demo, h, page)
    return demo
