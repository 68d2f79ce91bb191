"""Running a search on Ray Tune: trial sources, the driver, Ray glue, schedulers and callbacks.

Ray reads these settings when it is imported, so they are set here, before any module of this package
imports Ray (a Ray worker imports this package to unpickle the trainable)."""

import os

# The legacy reporter honours verbose=0; we print our own live table instead of Ray's.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Diverged and out-of-memory trials report a last result without validation metrics.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# A reused actor waits for the previous trial's thread to stop (at its next report, i.e. up to one epoch)
# before the next trial; Ray gives up after 2 s and fails the *next* trial ("Trainable runner reuse
# requires reset_config() ...", seen under load when the scheduler stops a trial mid-epoch). Read by
# the worker at reset time.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
