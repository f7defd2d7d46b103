"""Diagnostics: token confidence, teacher/student compatibility, reports."""
