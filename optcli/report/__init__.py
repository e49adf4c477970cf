"""Everything the user sees: Rich tables, progress displays and plots. The core never prints; this does."""
