"""Typed dependencies of the routes: the database session and the caller (annotator or admin).

The caller is found by `Authorization: Bearer TOKEN` (scripts) or the `preflab_token` cookie that the
personal link sets (the page). Cross-site request forgery only works through the cookie, which a browser
sends by itself, so a cookie-authenticated request that changes anything must also carry `X-CSRF-Token`
(an HMAC of the person's token hash under the project secret, embedded in the page; a cross-site form can
set no header) and, when the browser sends an Origin, one equal to this server's. Bearer requests carry no
ambient authority and need neither.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from preflab.collect import store
from preflab.collect.db import Annotator

COOKIE = "preflab_token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def get_db(request: Request) -> Iterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


DB = Annotated[Session, Depends(get_db)]


def csrf_token(secret: str, token_hash: str) -> str:
    return hmac.new(secret.encode(), f"csrf:{token_hash}".encode(), hashlib.sha256).hexdigest()


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:  # same-origin fetches from older browsers and non-browser clients send none
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


def current_annotator(request: Request, db: DB) -> Annotator:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "Authorization must be 'Bearer TOKEN'")
        person = store.annotator_by_token(db, token=token.strip())
        db.commit()  # end the lookup's transaction here: the handler runs in another worker-thread call
        if person is None:
            raise HTTPException(401, "unknown token")
        return person
    token = request.cookies.get(COOKIE, "")
    person = store.annotator_by_token(db, token=token) if token else None
    db.commit()
    if person is None:
        raise HTTPException(401, "not signed in: open your personal link, or send Authorization: Bearer TOKEN")
    if request.method not in SAFE_METHODS:
        expected = csrf_token(request.app.state.project.secret, person.token_hash)
        if not _same_origin(request):
            raise HTTPException(403, "cross-site request refused (Origin does not match this server)")
        if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), expected):
            raise HTTPException(403, "missing or wrong X-CSRF-Token (cookie-authenticated requests need it)")
    return person


Caller = Annotated[Annotator, Depends(current_annotator)]


def current_admin(person: Caller) -> Annotator:
    if not person.is_admin:
        raise HTTPException(403, "this needs an admin token (`preflab collect annotator DIR NAME --admin`)")
    return person


Admin = Annotated[Annotator, Depends(current_admin)]
