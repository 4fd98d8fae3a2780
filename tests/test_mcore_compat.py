"""The supported megatron-core range, and which release a run is actually on."""

import os

import pytest

from megatron_dvpo.mcore_compat import MCORE_VERSION, check_supported


@pytest.mark.compat
def test_this_megatron_core_is_supported_and_the_one_expected():
    check_supported()
    expected = os.environ.get("MEGATRON_DVPO_EXPECT_MCORE")  # set by make test-compat
    if expected:
        assert MCORE_VERSION.split("+")[0] == expected, (MCORE_VERSION, expected)


@pytest.mark.parametrize("version, ok", [("0.16.1", True), ("0.19.2", True), ("0.19.0rc1", True),
                                         ("0.16.0", False), ("0.20.0", False), ("1.0.0", False)])
def test_the_range(version, ok):
    if ok:
        check_supported(version)
    else:
        with pytest.raises(ImportError, match=rf"megatron-core {version} is not supported"):
            check_supported(version)
