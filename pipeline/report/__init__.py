"""Human-facing views of the artifacts: per-sample inspect pictures, the summary table and its HTML page."""
