"""Moved to adept_ds.model.expand (docs/ARCHITECTURE.md). This name keeps working for one release."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("adept_ds.model.expand")  # the same module object, private names and all
