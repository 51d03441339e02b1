"""MLC-LLM-style compiled backend (Apache TVM Relax); see backend.py and docs/backends/mlc.md."""
