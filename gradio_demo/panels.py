"""The sections of the Gradio page, each built in place inside the open `gr.Blocks`; the handlers
are wired to them in `gradio_demo.app.wire_events`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from gradio_demo import views

INTRO = (
    "# Dynamic interest decomposition\n"
    "A user's interest, split into dimensions that the moment and your words weigh. "
    "Mark something as watched and see the weights move."
)


@dataclass
class WhoPanel:
    """1 · Who: find or start a user, see their recent events."""

    user_q: gr.Textbox
    user: gr.Dropdown
    new_btn: gr.Button
    who: gr.Markdown
    timeline: gr.ScatterPlot
    history: gr.Dataframe


@dataclass
class RequestPanel:
    """2 · What and when: the intent and the moment of a request, its recommendations, and marking one watched."""

    intent: gr.Textbox
    weekday: gr.Dropdown
    hour: gr.Slider
    k: gr.Slider
    moment: gr.Markdown
    recommend_btn: gr.Button
    recs: gr.Dataframe
    pick: gr.Dropdown
    rating: gr.Slider
    watched_btn: gr.Button

    @property
    def moment_in(self) -> list:
        """The inputs every redraw reads: intent, weekday, hour, k."""
        return [self.intent, self.weekday, self.hour, self.k]


@dataclass
class DecompositionPanel:
    """3 · The decomposition: this request's gate weights, their course over the history, each dimension's tops."""

    gates: gr.BarPlot
    interests: gr.LinePlot
    dims: gr.Dataframe


@dataclass
class ManualPanel:
    """Add an event by hand: search the catalogue by text, pick an item, post it."""

    item_q: gr.Textbox
    search_btn: gr.Button
    found: gr.Dataframe
    found_pick: gr.Dropdown
    found_rating: gr.Slider
    add_btn: gr.Button


def who_panel() -> WhoPanel:
    """The user column: search box, user list, new-user button, and the recent history."""
    gr.Markdown("### 1 · Who")
    user_q = gr.Textbox(label="Find a user", placeholder="user id prefix", elem_id="user-q")
    user = gr.Dropdown(label="User", choices=[], filterable=True, elem_id="user")
    new_btn = gr.Button("Start as a new user", elem_id="new-user")
    who = gr.Markdown(elem_id="who")
    timeline = gr.ScatterPlot(
        x="when",
        y="rating",
        title="Timeline of recent events",
        y_lim=[0, 5.5],
        tooltip=["when", "title", "rating"],
        height=220,
        elem_id="timeline",
    )
    history = gr.Dataframe(
        headers=views.HISTORY_COLUMNS,
        label="Recent history (newest first)",
        interactive=False,
        max_height=560,
        wrap=True,
        column_widths=["30%", "40%", "20%", "10%"],
        elem_id="history",
    )
    return WhoPanel(user_q, user, new_btn, who, timeline, history)


def request_panel(now: time.struct_time) -> RequestPanel:
    """The request column: intent, weekday and hour (starting at `now`), how many, and the recommendations."""
    gr.Markdown("### 2 · What and when")
    intent = gr.Textbox(
        label="What are you in the mood for?", placeholder="something light and funny for tonight", elem_id="intent"
    )
    with gr.Row():
        weekday = gr.Dropdown(
            label="Weekday",
            choices=[(d, i) for i, d in enumerate(views.WEEKDAYS)],
            value=now.tm_wday,
            elem_id="weekday",
        )
        hour = gr.Slider(0, 23, value=now.tm_hour, step=1, label="Hour (UTC)", elem_id="hour")
        k = gr.Slider(1, 30, value=10, step=1, label="How many", elem_id="k")
    moment = gr.Markdown(elem_id="moment")
    recommend_btn = gr.Button("Recommend", variant="primary", elem_id="recommend")
    recs = gr.Dataframe(
        headers=views.RECS_COLUMNS,
        label="Recommendations (click a row to pick it)",
        interactive=False,
        wrap=True,
        max_height=900,
        column_widths=["6%", "46%", "28%", "10%", "10%"],
        elem_id="recs",
    )
    with gr.Row():
        pick = gr.Dropdown(label="Recommended item", choices=[], scale=3, elem_id="pick")
        rating = gr.Slider(0.5, 5, value=4.5, step=0.5, label="Rating", scale=1, elem_id="rating")
        watched_btn = gr.Button("Watched / liked", variant="secondary", scale=1, elem_id="watched")
    return RequestPanel(intent, weekday, hour, k, moment, recommend_btn, recs, pick, rating, watched_btn)


def decomposition_panel() -> DecompositionPanel:
    """The gate plots of the request and of the history, and the per-dimension table."""
    gr.Markdown("### 3 · The decomposition")
    with gr.Row():
        gates = gr.BarPlot(
            x="dimension",
            y="weight",
            color="dimension",
            title="Gate weights for this request",
            y_lim=[0, 1],
            elem_id="gates-plot",
        )
        interests = gr.LinePlot(
            x="event",
            y="weight",
            color="dimension",
            title="Gate weights after each event",
            y_lim=[0, 1],
            tooltip=["event", "dimension", "weight", "title"],
            elem_id="interests-plot",
        )
    dims = gr.Dataframe(
        views.dimension_frame(None),
        label="What each dimension alone would recommend",
        interactive=False,
        wrap=True,
        column_widths=["15%", *["17%"] * 5],
        elem_id="dims",
    )
    return DecompositionPanel(gates, interests, dims)


def manual_panel() -> ManualPanel:
    """A closed accordion: search the catalogue by text and add the chosen item to the history."""
    with gr.Accordion("Add an event by hand (search the catalogue by text)", open=False):
        with gr.Row():
            item_q = gr.Textbox(label="Search items", placeholder="space adventure", scale=3, elem_id="item-q")
            search_btn = gr.Button("Search", scale=1, elem_id="search")
        found = gr.Dataframe(headers=views.SEARCH_COLUMNS, interactive=False, wrap=True, elem_id="found")
        with gr.Row():
            found_pick = gr.Dropdown(label="Item", choices=[], scale=3, elem_id="found-pick")
            found_rating = gr.Slider(0.5, 5, value=4.0, step=0.5, label="Rating", scale=1)
            add_btn = gr.Button("Add to history", scale=1, elem_id="add")
    return ManualPanel(item_q, search_btn, found, found_pick, found_rating, add_btn)


@dataclass
class CataloguePanel:
    """Add an item to the catalogue (admin accounts): placed by its text, recommended at once."""

    item_id: gr.Textbox
    title: gr.Textbox
    genres: gr.CheckboxGroup
    tags: gr.Textbox
    description: gr.Textbox
    add_btn: gr.Button


def catalogue_panel() -> CataloguePanel:
    """A closed accordion: a new item's id, title, genres (the catalogue's, filled on connecting),
    tags and description; adding it redraws the picked user's recommendations."""
    with gr.Accordion("Add an item to the catalogue (admin)", open=False):
        with gr.Row():
            item_id = gr.Textbox(label="Item id", placeholder="new-film-1", scale=1, elem_id="new-item-id")
            title = gr.Textbox(label="Title", placeholder="A New Film (2026)", scale=2, elem_id="new-item-title")
        with gr.Row():
            genres = gr.CheckboxGroup(label="Genres", choices=[], elem_id="new-item-genres")
            tags = gr.Textbox(label="Tags (comma-separated)", elem_id="new-item-tags")
        description = gr.Textbox(label="Description", lines=2, elem_id="new-item-description")
        add_btn = gr.Button("Add the item", elem_id="add-item")
    return CataloguePanel(item_id, title, genres, tags, description, add_btn)


@dataclass
class Page:
    """The whole page: the status line, the request clock's start (a `gr.State`), and the sections."""

    status: gr.Markdown
    start: gr.State
    who: WhoPanel
    request: RequestPanel
    decomposition: DecompositionPanel
    manual: ManualPanel
    catalogue: CataloguePanel

    @property
    def view_outputs(self) -> list:
        """The outputs of a redraw, in the order `Handlers.refresh` returns them."""
        w, r, d = self.who, self.request, self.decomposition
        return [
            self.status,
            w.who,
            w.history,
            w.timeline,
            self.start,
            r.moment,
            r.recs,
            r.pick,
            d.gates,
            d.interests,
            d.dims,
        ]


def build_page() -> Page:
    """Every component of the page, in its place, inside the open `gr.Blocks`."""
    now = time.gmtime()
    gr.Markdown(INTRO)
    status = gr.Markdown("Connecting…", elem_id="status")
    start = gr.State(None)  # where the request clock starts: the last event (or now)
    with gr.Row():
        with gr.Column(scale=2):
            who = who_panel()
        with gr.Column(scale=3):
            request = request_panel(now)
    decomposition = decomposition_panel()
    manual = manual_panel()
    catalogue = catalogue_panel()
    return Page(status, start, who, request, decomposition, manual, catalogue)
