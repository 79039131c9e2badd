"""The model card page: the card and instructions for use of the model this server runs, for everyone signed in.

- ``/model-card``: the card of the model the settings choose (``create_app(model_card=...)``, found by
  ``workers.serve``): intended use, input specification, performance per vendor and subgroup, known limits,
  human oversight; with the FHIR ``DocumentReference`` it is published as (``adapters.fhir_model_card``). When the
  configured model has no card (a user's own model, weights the committed card does not describe) the page says
  so and why; it never shows another model's card.

The card is Markdown rendered by markdown-it-py with raw HTML off (CommonMark + tables): what the text holds is
escaped, so the page cannot carry markup the card did not mean. The page is read by clinicians too: it is how
everyone learns what the model is for and where it fails.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from markdown_it import MarkdownIt

from adapters.fhir_model_card import MissingModelCard, ModelCard, PublishedCard
from service.web_context import Web
from service.web_session import require_session

__all__ = ["render_card", "router"]

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def render_card(markdown: str) -> str:
    """The card as HTML: CommonMark with tables; raw HTML in the text is escaped, unsafe link schemes dropped."""
    html: str = _MARKDOWN.render(markdown)
    return html


@router.get("/model-card")
def model_card_page(request: Request, web: Web) -> Response:
    session = require_session(web, request)
    card: ModelCard | MissingModelCard | None = request.app.state.model_card
    published: PublishedCard | None = request.app.state.model_card_published
    context: dict[str, Any] = {"card": None, "missing": None, "document": None, "html": ""}
    if isinstance(card, ModelCard):
        context.update(card=card, html=render_card(card.markdown))
        if published is not None:
            context["document"] = published.document
    elif isinstance(card, MissingModelCard):
        context["missing"] = card
    return web.page("model_card.html", session, **context)
