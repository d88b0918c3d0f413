"""The pipeline's exceptions: the public refusal (PipelineError) and the private signal hooks use to end a forward
early once what they needed is taken (StopForward)."""

from __future__ import annotations


class PipelineError(ValueError):
    """prune_model cannot run on this model or these arguments; the message names what and why."""


class StopForward(Exception):
    """Raised by a hook to end a forward early once the information it needed is taken."""
