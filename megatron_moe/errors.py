"""User errors of the training job: a leaf module (imports nothing of ours) that every other one may use."""


class ConfigError(ValueError):
    """A user error in the command line or its inputs: printed as one line, exit status 2."""
