"""The one exception a user can fix: printed by the CLI as one clear message, exit status 2."""


class UserError(Exception):
    """An error the user can fix; printed as one clear message, exit status 2."""
