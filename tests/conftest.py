"""Test setup: 4 fake CPU devices, set before jax is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Caches the code keeps in the user's home (the frame check's) go to a folder of this run.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="stmn_test_cache_")


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA without most optimisations for one test module (compile time dominates; values are
  unchanged), restored afterwards so other modules in the same worker are not affected.
  Use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax  # pylint: disable=g-import-not-at-top

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
