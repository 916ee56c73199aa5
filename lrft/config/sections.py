"""The base of every section of a config file's schema: strict, so a typo is an error, never ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A mapping of a config file: unknown keys refused, assignments validated too."""

    # NaN and Inf are no learning rate, dropout or scale: refused like any out-of-range value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
