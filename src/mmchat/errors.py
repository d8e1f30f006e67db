"""The one exception type a user should ever see: a one-line message that says what to do."""


class MMChatError(Exception):
    """A user mistake or a missing resource. The CLI prints it as one line and exits with code 2;
    the server answers it with an HTTP 400 in OpenAI's error shape."""
