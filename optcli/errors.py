"""The tool's own error type. A UserError is a mistake the user can fix; the CLI prints its message."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str):
        # one line whatever the user typed: control characters in echoed input are shown escaped
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


class RunInterrupted(Exception):
    """Ctrl-C during training, after the last completed epoch was saved (exit code 130)."""

    exit_code = 130

    def __init__(self, run_dir: str):
        super().__init__(
            f"interrupted; the last completed epoch is saved in {run_dir} (resume with --resume {run_dir})"
        )
        self.run_dir = run_dir
