"""Placeholder: filled in by the area owner."""
