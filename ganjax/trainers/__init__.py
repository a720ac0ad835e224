"""One module per paper trainer; shared pieces live in `common`."""
