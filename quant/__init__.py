"""See README.md: this package is planned, not built yet."""
