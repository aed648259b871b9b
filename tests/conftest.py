import os

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=int(os.environ.get("MEDU_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


def _memory_maps() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: nothing to watch
        return 0


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop jax's compiled programs once the worker holds many memory maps: each XLA CPU
    executable keeps ~6 maps, and a pytest-xdist worker that compiled the suite's programs segfaulted inside XLA's
    compiler near Linux's default limit of 65,530 maps (vm.max_map_count), in the last test module it ran."""
    yield
    if _memory_maps() > 40000:
        import gc

        import jax

        jax.clear_caches()
        gc.collect()
