"""The demo's one error type: a problem with its inputs (output folder, settings) that the user
can fix."""


class DemoError(Exception):
    """A problem with the demo's inputs (output folder, settings) that the user can fix."""
