.PHONY: style quality test demo docs-numbers docs-timings

check_dirs := src tests benchmarks recipes

style:
	ruff check --fix $(check_dirs)
	ruff format $(check_dirs)

quality:
	ruff check $(check_dirs)
	ruff format --check $(check_dirs)

test:
	python -m pytest

demo:
	hf-magmax demo

# rewrite every number the README and docs/ quote (<!-- n:KEY -->...<!-- /n -->) from its source: a fresh demo run and
# benchmarks/results/ (tests/test_docs.py fails until this is run after a change)
docs-numbers:
	OMP_NUM_THREADS=1 python benchmarks/docs_numbers.py

# the same, after re-measuring the demo's wall times (benchmarks/results/demo_timing.json)
docs-timings:
	python benchmarks/docs_numbers.py --timings --repeats 3
