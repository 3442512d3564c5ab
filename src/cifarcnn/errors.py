"""The one exception type users see.

Anything that is the user's input being wrong (a missing file, a corrupt
image, a hostile archive, an unknown model name) is raised as `CifarError`
with a message that says what, where, and what to do. The CLI prints that
message on one line and exits non-zero; real bugs keep their traceback.
"""


class CifarError(Exception):
    """A problem with the user's input, explained in one line."""
