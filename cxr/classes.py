"""The two classes, in label order: index 1, PNEUMONIA, is the positive class.

Every stage's output depends on this order, so it lives alone: a module that holds it beside
other code would make each stage depend on that code too (tests/test_contracts.py).
"""

CLASSES = ("NORMAL", "PNEUMONIA")
