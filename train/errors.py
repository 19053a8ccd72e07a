"""Bad input is reported as one line from one process and exit code 2, never a traceback."""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Something the user can fix (config, command line, files); the message is the whole report."""

    agreed = False  # raised on every rank at once (train.dist.agree): they can exit together
