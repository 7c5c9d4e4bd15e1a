"""Hypothesis profiles: the suite (and CI) runs a fixed, derandomized set of examples so that a
green run stays green for the same code; ``HYPOTHESIS_PROFILE=explore`` draws fresh random
examples (more of them) to hunt for new counter-examples."""

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
