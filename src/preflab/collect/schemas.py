"""Request and response bodies of the JSON API (what the OpenAPI schema documents): create schemas for what a
client sends, public schemas for what it gets back. Unknown fields are refused, lengths are bounded."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Prompt = str | list[dict]


def storable(text: str) -> str:
    """Text every database stores: no NUL character (PostgreSQL refuses it) and no lone surrogate (not UTF-8).
    Found by the schemathesis fuzzer: a NUL in client_id was a 500 on PostgreSQL."""
    if "\x00" in text:
        raise ValueError("text may not contain the NUL character (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(storable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NextPair(BaseModel):
    """The caller's next pair, sides as they are to be shown. `done` is true when nothing is left."""

    done: bool = False
    pair_id: int | None = None
    prompt: Prompt | None = None
    left: str | None = None
    right: str | None = None
    rule: str | None = Field(None, description="how the pair was picked: random or active")


class VoteCreate(Strict):
    pair_id: int = Field(ge=1, le=2**31 - 1)
    choice: Literal["left", "right", "tie", "both_bad"]
    rationale: Text = Field("", max_length=4000)
    client_id: Text | None = Field(
        None,
        min_length=1,
        max_length=100,
        description="any id unique to this submission: a retry with it is stored once",
    )


class VotePublic(BaseModel):
    id: int
    pair_id: int
    choice: str
    left_is_a: bool = Field(description="true when response_a was shown on the left")
    rationale: str
    client_id: str | None
    rule: str
    created_at: float
    stored: bool = Field(True, description="false when this was a retry of an already stored submission")


class Stats(BaseModel):
    collected: int = Field(description="votes collected in the project, by everyone")
    mine: int = Field(description="votes by the caller")
    authored: int = Field(description="comparisons written in author mode, by everyone")


class AuthoredCreate(Strict):
    prompt: Text = Field(min_length=1, max_length=8000)
    better: Text = Field(min_length=1, max_length=8000, description="the better response")
    worse: Text = Field(min_length=1, max_length=8000, description="the worse response")
    teaches: Text = Field(min_length=1, max_length=2000, description="what behaviour this label teaches")
    bias: Text = Field("", max_length=2000, description="which bias it might introduce")


class AuthoredPublic(BaseModel):
    id: int
    created_at: float


class TrainStatus(BaseModel):
    id: int | None = None
    status: str = "never"
    votes: int = 0
    held_out: int = 0
    accuracy: float | None = None
    message: str = ""
