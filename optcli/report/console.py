"""The two consoles everything is printed to: results on stdout, progress on stderr."""

from __future__ import annotations

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
