"""The loss configurations every loss test covers: each variant, with and without weight_alignment where it
applies, and js with gradient through its weights (the public code's behaviour)."""

IGNORE = -100

# (variant, weight_alignment, js_detach)
CONFIGS = [
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
CONFIG_IDS = [f"{v}{'-wa' if wa else ''}{'' if det else '-jsgrad'}" for v, wa, det in CONFIGS]
