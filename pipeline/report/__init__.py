"""Human-facing views of the artifacts: per-sample inspect pictures and the summary table."""
