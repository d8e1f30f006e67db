"""Why the model said what it said: attention maps, per-token probabilities, the logit lens."""
from .report import Explanation, explain, save_report

__all__ = ["Explanation", "explain", "save_report"]
