"""The one exception type of hpcimage and the documented exit statuses."""

# Exit statuses (README "Exit statuses").
EXIT_FAILED = 1        # an operation failed (mount, copy, launch)
EXIT_USAGE = 2         # bad input: command line, site.yaml, image file
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class HpcimageError(Exception):
    """An error meant for the user: one line of text and an exit status."""

    def __init__(self, message, status=EXIT_FAILED):
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self):
        return self.message


class UsageError(HpcimageError):
    """Bad input (exit 2)."""

    def __init__(self, message):
        super().__init__(message, EXIT_USAGE)
