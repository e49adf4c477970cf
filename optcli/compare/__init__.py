"""Comparisons: optimizer specs, trials and their runners, tuning, several tasks, merge, statistics and profiles."""
