"""Named record types that data files and indexes exchange.

Example:
    >>> Exemplar(id="train:1", text="1+1?", fields={"answer": "2"}).fields["answer"]
    '2'
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from detot_agent.errors import IndexDataError

__all__ = ["Exemplar"]


class Exemplar(BaseModel):
    """One record: a stable id, the text that is embedded, and any fields (question, rationale, answer, ...).

    `where=` filters in `ExemplarIndex.search` match on `fields`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str
    fields: dict[str, Any] = {}

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not v.strip():
            raise IndexDataError("id must be a non-empty string")
        return v

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        if not v.strip():
            raise IndexDataError("text must be non-empty (it is what gets embedded)")
        return v
