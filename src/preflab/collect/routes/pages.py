"""The HTML pages: sign-in by personal link, voting, author mode, admin. Text is escaped by Jinja2's
autoescaping (and by `textContent` in app.js), so a response holding `<script>` shows as text."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from preflab.collect import store
from preflab.collect.agreement import summary
from preflab.collect.deps import COOKIE, DB, csrf_token
from preflab.collect.routes.pairs import next_pair

router = APIRouter(include_in_schema=False)


def _person(request: Request, db):
    person = store.annotator_by_token(db, token=request.cookies.get(COOKIE, ""))
    if person is None:
        raise HTTPException(401, "not signed in: open your personal link")
    return person


def render(request: Request, name: str, person, **context) -> HTMLResponse:
    app = request.app
    return app.state.templates.TemplateResponse(
        request,
        name,
        {
            "person": person,
            "csrf": csrf_token(app.state.project.secret, person.token_hash),
            "guidelines": app.state.guidelines_html,
            **context,
        },
    )


@router.get("/login/{token}")
def login(token: str, db: DB) -> RedirectResponse:
    """The personal link: sets the sign-in cookie and goes to the voting page."""
    if store.annotator_by_token(db, token=token) is None:
        raise HTTPException(401, "this link is not valid (ask for a new one)")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="lax", max_age=90 * 24 * 3600)
    return response


@router.get("/", response_class=HTMLResponse)
def vote_page(request: Request, db: DB) -> HTMLResponse:
    person = _person(request, db)
    pair = next_pair(request, db, person)
    prompt = pair.prompt
    messages = prompt if isinstance(prompt, list) else None
    return render(
        request,
        "vote.html",
        person,
        pair=pair,
        messages=messages,
        collected=store.count_votes(db),
        mine=store.count_votes(db, annotator_id=person.id),
    )


@router.get("/author", response_class=HTMLResponse)
def author_page(request: Request, db: DB) -> HTMLResponse:
    person = _person(request, db)
    return render(request, "author.html", person, authored=store.count_authored(db, annotator_id=person.id))


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, db: DB) -> HTMLResponse:
    person = _person(request, db)
    if not person.is_admin:
        raise HTTPException(403, "the admin page needs an admin token")
    from preflab.collect import live
    from preflab.collect.routes.admin import status

    return render(
        request,
        "admin.html",
        person,
        s=summary(db, overlap=request.app.state.project.overlap),
        job=status(live.latest_job(db)),
        live_enabled=bool(request.app.state.project.reward_model),
    )
