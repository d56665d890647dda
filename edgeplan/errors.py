"""Errors edgeplan raises on bad input: each names the problem and the fix.

Torch-free, so the runtime on a device can raise the same types.
"""


class EdgeplanError(Exception):
    """Base class: a user-facing error with a message that says what to change."""


class CaptureError(EdgeplanError):
    """The model could not be captured or its inputs are unusable."""


class PlanError(EdgeplanError):
    """No valid plan: nothing fits, or a given plan does not match the model or fleet."""


class ArtifactError(EdgeplanError):
    """An artifact is missing, corrupt, or cannot be produced."""


class InputError(EdgeplanError):
    """Inputs handed to the runtime have a wrong name, shape or dtype."""


class StageError(EdgeplanError):
    """A stage failed while running; the message names the stage and its device."""


class RemoteError(EdgeplanError):
    """A worker on the network refused a call, failed, hung or could not be reached; the
    message names the device and its address."""


class MergeError(EdgeplanError):
    """Models of a workload cannot be merged as asked (a loader or metric missing or failing,
    a budget out of range); the message names the model."""
