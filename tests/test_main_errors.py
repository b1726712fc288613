"""medjax.main (through console.raised_by_medjax) tells a user's mistake (one sentence from a medjax check) from a bug (an error raised inside
a library), so a ValueError from numpy or orbax is shown with its traceback, not hidden as a one-liner."""

import numpy as np
import pytest

from medjax import console
from medjax.data.manifest import fold_splits


def _caught(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return info.value


def test_a_medjax_check_is_a_user_error():
    assert console.raised_by_medjax(_caught(lambda: fold_splits(1, 0)))


def test_a_value_error_inside_numpy_is_not():
    assert not console.raised_by_medjax(_caught(lambda: np.percentile([1.0], 200)))  # raised in numpy's code
