"""The tool's own error types. A UserError is a mistake the user can fix; the CLI prints its message."""


def one_line(message: str) -> str:
    """Control characters in echoed input are shown escaped, so a message is always one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(one_line(message))


class SystemRefused(UserError):
    """The operating system said no (disk full, read-only, not a directory, name too long, in use by another
    process): one line naming the path and the reason, exit code 1."""

    exit_code = 1


class RunInterrupted(Exception):
    """Ctrl-C or another stop signal, after what was finished was saved (exit code 128 + the signal)."""

    def __init__(
        self, run_dir: str | None, signum: int = 2, *, saved: str | None = None, warnings: list[str] | None = None
    ):
        import signal

        self.warnings = list(warnings or [])  # lines to show before this one (a figure that could not be drawn)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        self.run_dir = run_dir
        if saved is None and run_dir:
            saved = f"the last completed epoch is saved in {run_dir} (resume with --resume {run_dir})"
        super().__init__(f"interrupted by {self.signal_name}" + (f"; {saved}" if saved else ""))
