"""What the demo datasets' DICOM writers share: decimal strings and UIDs derived from the seed (so two
writes with the same seed give identical files)."""

from __future__ import annotations


def decimal_string(x: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return format(float(x), ".10g")


def demo_uid(seed: int, *parts) -> str:
    """A UID that is a function of the seed and ``parts`` only."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medjax-demo", str(seed), *map(str, parts)])
