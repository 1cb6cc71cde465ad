"""The bad-input corpus: every input a user can get wrong, built by the tests themselves (see ``cases.py``)."""
