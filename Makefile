.PHONY: style quality test demo

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
