"""Engine side: export, build, time (heavy dependencies are imported lazily inside each module)."""
