"""``index_array_and_repeats`` and ``has_repeats`` (kvxfer/spec.py): the one-sort check a pull makes of the ids it
writes gives what ``as_index_array`` + a counting pass give, errors included."""

from __future__ import annotations

import numpy as np
import pytest

from kvxfer.errors import DescriptorError
from kvxfer.spec import as_index_array, has_repeats, index_array_and_repeats

pytestmark = pytest.mark.timeout(60)


def _counting(ids: np.ndarray, upper: int) -> bool:
    return bool(ids.size) and int(np.bincount(ids, minlength=upper).max()) > 1


def _outcome(call, *args):
    try:
        result = call(*args)
    except (DescriptorError, ValueError, TypeError) as error:
        return type(error), str(error)
    return result


@pytest.mark.parametrize("seed", range(30))
def test_same_result_as_the_two_checks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    upper = int(rng.choice([1, 5, 300, 100_000]))
    n = int(rng.integers(0, 40))
    dtype = rng.choice([np.int64, np.int32, np.uint16, np.int8])
    values = rng.integers(-2 if seed % 5 == 0 else 0, min(upper + (seed % 7 == 0), 127), size=n).astype(dtype)
    for given in (values, values.tolist(), tuple(values.tolist())):
        expected = _outcome(lambda v: (lambda a: (a, _counting(a, upper)))(as_index_array(v, "ids", upper)), given)
        actual = _outcome(index_array_and_repeats, given, "ids", upper)
        if isinstance(expected, tuple) and isinstance(expected[0], np.ndarray):
            assert isinstance(actual, tuple) and isinstance(actual[0], np.ndarray)
            np.testing.assert_array_equal(actual[0], expected[0])
            assert actual[0].dtype == np.int64 and actual[1] == expected[1]
            assert has_repeats(expected[0], upper) == expected[1]
        else:
            assert actual == expected


@pytest.mark.parametrize(
    "given",
    [5, [], [True, False], [1.5, 2.0], np.array([[1, 2]]), np.array([2**63 + 5], dtype=np.uint64), [3, 3], [-1]],
)
def test_edge_inputs(given: object) -> None:
    expected = _outcome(lambda v: (lambda a: (a.tolist(), _counting(a, 10)))(as_index_array(v, "ids", 10)), given)
    actual = _outcome(lambda v: (lambda r: (r[0].tolist(), r[1]))(index_array_and_repeats(v, "ids", 10)), given)
    assert actual == expected
