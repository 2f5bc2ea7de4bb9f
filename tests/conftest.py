"""Shared test helpers: the conformance data and the spec oracle live beside the tests."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
