"""The decode service: an aggregated LLM worker, or the decode half of a disaggregated pair."""
