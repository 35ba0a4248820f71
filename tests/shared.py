"""Values that test modules need while they are imported, where a fixture cannot serve: tables that
`@pytest.mark.parametrize` expands and paths that module-level tables are built from. Everything else the
folders share is a fixture in tests/conftest.py."""

from pathlib import Path

# The data files the data tests read, and the tiny tokenizer is trained on (tests/fixtures).
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The label value the losses ignore (the public code's -100).
IGNORE = -100

# The loss configurations every loss test covers: each variant, with and without weight_alignment where it
# applies, and js with gradient through its weights (the public code's behaviour).
# (variant, weight_alignment, js_detach)
LOSS_CONFIGS = [
    ("sft", False, True),
    ("context_sft", False, True),
    ("mce", False, True),
    ("mce", True, True),
    ("dce", False, True),
    ("js", False, True),
    ("js", False, False),
    ("nextquill", False, True),
    ("nextquill", True, True),
]
LOSS_CONFIG_IDS = [f"{v}{'-wa' if wa else ''}{'' if det else '-jsgrad'}" for v, wa, det in LOSS_CONFIGS]
