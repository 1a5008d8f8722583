"""The TP engine: per-rank layout, the SPD block math, the one place that communicates, injection."""
