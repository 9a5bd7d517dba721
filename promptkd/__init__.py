"""promptkd: prompt-based knowledge distillation (PromptKD) with uncertainty-aware loss strategies."""

__version__ = "0.1.0"
