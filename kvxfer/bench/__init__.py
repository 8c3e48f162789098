"""kvxfer-bench: bandwidth and latency measurements (each row carries a ceiling measured in the same run)."""
