"""File formats: the only place file layouts are defined (DESIGN.md §3)."""
