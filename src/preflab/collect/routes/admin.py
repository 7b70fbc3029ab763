"""Admin API (admin token): the summary, the export and the live reward model."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import PlainTextResponse

from preflab.collect import live
from preflab.collect.agreement import summary
from preflab.collect.deps import DB, Admin
from preflab.collect.export import export_rows, to_jsonl
from preflab.collect.schemas import TrainStatus

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/summary")
def get_summary(request: Request, db: DB, admin: Admin) -> dict:
    """Progress, votes per annotator, agreement (Cohen's kappa, Krippendorff's alpha) and biases with 95% CIs."""
    return summary(db, overlap=request.app.state.project.overlap)


@router.get("/export", response_class=PlainTextResponse)
def get_export(db: DB, admin: Admin, include_both_bad: bool = False) -> PlainTextResponse:
    """The comparison JSONL (as `preflab collect export` writes it)."""
    body = to_jsonl(export_rows(db, include_both_bad=include_both_bad))
    return PlainTextResponse(
        body,
        media_type="application/jsonl",
        headers={"Content-Disposition": 'attachment; filename="comparisons.jsonl"'},
    )


def status(job) -> TrainStatus:
    if job is None:
        return TrainStatus()
    return TrainStatus(
        id=job.id,
        status=job.status,
        votes=job.votes,
        held_out=job.held_out,
        accuracy=job.accuracy,
        message="" if job.message.startswith("pid ") else job.message,
    )


@router.get("/train", response_model=TrainStatus)
def get_train(db: DB, admin: Admin) -> TrainStatus:
    return status(live.latest_job(db))


@router.post("/train", response_model=TrainStatus, status_code=202)
def post_train(request: Request, db: DB, admin: Admin) -> TrainStatus:
    """Start retraining the reward model on the votes so far in a background process (voting goes on)."""
    try:
        job = live.start_job(db, project=request.app.state.project)
    except live.TrainBusy as err:
        raise HTTPException(409, str(err)) from None
    return status(job)
