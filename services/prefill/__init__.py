"""The prefill service: the prefill half of a disaggregated pair."""
