"""Surviving mutants that are *equivalent*: no input can tell them from the original code, so no test can
kill them. ``run_mutation.py`` leaves them out of the kill rate and names entries that no longer survive.

Key: mutmut's mutant name (``mutmut show NAME`` in the group's work folder prints the diff); value: why
it is equivalent, in a sentence. A mutant that a test *could* kill does not belong here: write the test.
"""

EQUIVALENT_MUTANTS: dict[str, str] = {}
