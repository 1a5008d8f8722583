"""Measurement and reporting: latency bench, evaluation (and its evaluate module), plots, lm-eval."""
