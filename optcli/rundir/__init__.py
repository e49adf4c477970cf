"""One run on disk: the run itself (build, fit, save, resume), its files, lock, signals, loggers and provenance."""
