"""User-facing errors. Every one of them is printed by the CLI as one line, with a non-zero exit."""


class DitqError(Exception):
    """Base class: a problem with what the user gave us, explained in one line."""

    exit_code = 2


class CheckpointError(DitqError):
    """The checkpoint is missing, corrupt, or not a model ditq supports."""


class ConfigError(DitqError):
    """A format, recipe, option or layer pattern that cannot be honoured."""


class CalibrationError(DitqError):
    """Calibration met non-finite values or produced unusable statistics."""


class TimestepError(DitqError):
    """A timestep outside the scheduler's range."""


class ArtifactError(DitqError):
    """An artifact directory that is missing, incomplete, or of an unknown format version."""


class PassPreconditionError(DitqError):
    """A pass was asked to run on a graph or context that does not meet its preconditions."""

    def __init__(self, pass_name: str, reason: str):
        super().__init__(f"pass '{pass_name}' cannot run: {reason}")
        self.pass_name = pass_name
