"""Throughput and scaling benchmarks (run as scripts: ``python benchmarks/throughput.py --help``)."""
