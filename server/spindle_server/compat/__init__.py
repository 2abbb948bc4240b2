"""Facades that speak other vendors' assistant APIs over Spindle's own servicers."""
