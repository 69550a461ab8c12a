"""The one base of every record: frozen (a record is a fact, never edited in place) and strict (an
unknown field is a mistake, not data to carry along). Records are plain pydantic: JSON in, JSON out."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
